"""The packing planner: shared prefixes, first-fit decreasing under the budget, the stream layout."""

from __future__ import annotations

import numpy as np
import pytest

from themis_engine.packing.planner import PackingError, first_fit_decreasing, flatten_groups, plan, shared_prefix_len


def test_shared_prefix_is_capped_and_zero_for_single():
    assert shared_prefix_len([[1, 2, 3]]) == 0
    assert shared_prefix_len([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter keeps one suffix token
    assert shared_prefix_len([[1, 2], [1, 2]]) == 1
    assert shared_prefix_len([[7], [7, 8]]) == 0
    assert shared_prefix_len([[1, 2, 3], [9, 2, 3]]) == 0
    assert shared_prefix_len([[1, 2, 3, 4], [1, 2, 9], [1, 2, 3, 4, 5]]) == 2


def test_ffd_is_first_fit_decreasing():
    bins = first_fit_decreasing([3, 7, 2, 5, 4, 1], budget=8)
    sizes = [3, 7, 2, 5, 4, 1]
    assert sorted(g for b in bins for g in b) == list(range(6))
    assert all(sum(sizes[g] for g in b) <= 8 for b in bins)
    # FFD by hand: 7->A(1 left); 5->B(3); 4->C(4); 3->B(0); 2->C(2); 1->A(0)
    assert bins == [[1, 5], [3, 0], [4, 2]]


def test_group_over_budget_is_an_error():
    with pytest.raises(PackingError, match=r"group 1 needs 9 tokens, over the token budget of 8"):
        first_fit_decreasing([3, 9], budget=8)


def test_empty_sequence_is_an_error():
    with pytest.raises(PackingError, match="sequence 1 is empty"):
        plan(*flatten_groups([[[1, 2]], [[]]]), budget=10)


def _standalone_view(batch, seq_id):
    """Reassemble the standalone sequence of a scored row from the stream: its prefix + its segment."""
    row = int(np.nonzero(batch.seq_ids == seq_id)[0][0])
    end = int(batch.score_index[row]) + 1
    s = int(np.searchsorted(batch.cu_seqlens, end, side="left")) - 1
    a = int(batch.cu_seqlens[s])
    ps, pl = int(batch.prefix_start[s]), int(batch.prefix_len[s])
    ids = np.concatenate([batch.input_ids[ps : ps + pl], batch.input_ids[a:end]])
    pos = np.concatenate([batch.position_ids[ps : ps + pl], batch.position_ids[a:end]])
    return ids, pos


@pytest.mark.parametrize("seed", range(6))
def test_stream_reproduces_every_standalone_sequence(seed):
    rng = np.random.default_rng(seed)
    groups = []
    for _ in range(rng.integers(1, 12)):
        k = int(rng.integers(1, 17))
        prompt = rng.integers(0, 50, size=int(rng.integers(0, 20))).tolist()
        group = []
        for _ in range(k):
            group.append(prompt + rng.integers(0, 50, size=int(rng.integers(1, 15))).tolist())
        groups.append(group)
    tokens, so, go = flatten_groups(groups)
    budget = int(max(sum(len(s) for s in g) for g in groups))
    batches = plan(tokens, so, go, budget)
    seen = []
    for b in batches:
        assert b.num_tokens <= budget
        assert b.cu_seqlens[0] == 0 and b.cu_seqlens[-1] == b.num_tokens
        assert b.max_seqlen == int(np.diff(b.cu_seqlens).max())
        assert b.cu_seqlens.dtype == np.int32 and b.prefix_len.dtype == np.int32
        for sid in b.seq_ids.tolist():
            ids, pos = _standalone_view(b, sid)
            want = tokens[so[sid] : so[sid + 1]]
            assert ids.tolist() == want.tolist()
            assert pos.tolist() == list(range(len(want)))
            seen.append(sid)
        # every prefix segment is seen only by suffixes of its own group, which follow it
        for s in range(len(b.prefix_len)):
            if b.prefix_len[s] > 0:
                assert b.prefix_start[s] + b.prefix_len[s] <= b.cu_seqlens[s]
    assert sorted(seen) == list(range(len(so) - 1))
    # prefixes are shared: fewer tokens than the sequences alone, whenever some group shares
    total = sum(b.num_tokens for b in batches)
    assert total <= len(tokens)


def test_plan_is_deterministic():
    groups = [[[1, 2, 3, 4], [1, 2, 3, 5]], [[9, 9]], [[4] * 5]]
    a = plan(*flatten_groups(groups), budget=8)
    b = plan(*flatten_groups(groups), budget=8)
    for x, y in zip(a, b):
        assert all(np.array_equal(getattr(x, f), getattr(y, f)) for f in ("input_ids", "cu_seqlens", "seq_ids"))
