"""The C++ packing planner (csrc/planner.cpp) gives exactly the Python planner's output and errors.

Property tests over random inputs: every field of every micro-batch, same bin order, same dtypes,
same PackingError messages. Skipped where the extension was not built (THEMIS_NO_EXT=1, no compiler).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from themis_engine import packing
from themis_engine.packing import planner
from themis_engine.packing.planner import PackedBatch, PackingError, flatten_groups, plan_python

try:
    from themis_engine import _planner
except ImportError:
    _planner = None

pytestmark = pytest.mark.skipif(
    _planner is None,
    reason="C++ planner themis_engine._planner not built (THEMIS_NO_EXT=1, no C++ compiler or no pybind11 at "
    "install time; reinstall with `pip install -e .` where one is)",
)

FIELDS = ("input_ids", "position_ids", "cu_seqlens", "prefix_start", "prefix_len", "max_seqlen",
          "score_index", "seq_ids", "group_ids")


def plan_cpp(tokens, seq_offsets, group_offsets, budget):
    """packing.plan on the C++ path (whatever THEMIS_PLANNER says in the environment)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("THEMIS_PLANNER", raising=False)
        return packing.plan(tokens, seq_offsets, group_offsets, budget)


def assert_same(got: list[PackedBatch], want: list[PackedBatch]) -> None:
    assert len(got) == len(want)
    for b, (x, y) in enumerate(zip(got, want)):
        assert isinstance(x, PackedBatch)
        for f in FIELDS:
            gx, gy = getattr(x, f), getattr(y, f)
            if f == "max_seqlen":
                assert type(gx) is int and gx == gy, (b, f)
                continue
            assert isinstance(gx, np.ndarray), (b, f)
            assert gx.dtype == gy.dtype and gx.shape == gy.shape, (b, f, gx.dtype, gy.dtype, gx.shape, gy.shape)
            assert gx.flags.c_contiguous and gx.flags.writeable, (b, f)
            np.testing.assert_array_equal(gx, gy, err_msg=f"batch {b} field {f}")


def random_groups(rng: np.random.Generator, n_groups: int, vocab: int) -> list[list[list[int]]]:
    """Groups of K = 1..16 sequences: a common prompt of 0..n tokens, then random or partly shared
    responses of >= 1 token (some shorter than the prompt, some equal to each other)."""
    groups = []
    for _ in range(n_groups):
        k = int(rng.integers(1, 17))
        prompt = rng.integers(0, vocab, size=int(rng.integers(0, 40))).tolist()
        mode = rng.integers(0, 4)
        group = []
        for _ in range(k):
            if mode == 0:  # plain: prompt + a response
                seq = prompt + rng.integers(0, vocab, size=int(rng.integers(1, 30))).tolist()
            elif mode == 1:  # some sequences cut inside the prompt (the cap on the shared prefix)
                seq = (prompt + rng.integers(0, vocab, size=int(rng.integers(0, 10))).tolist())[
                    : int(rng.integers(1, len(prompt) + 11))
                ]
            elif mode == 2:  # identical sequences (the prefix is capped at len - 1)
                seq = list(prompt) or [int(rng.integers(0, vocab))]
            else:  # no shared prompt at all, tiny vocabulary (accidental common tokens)
                seq = rng.integers(0, 3, size=int(rng.integers(1, 12))).tolist()
            group.append(seq or [0])
        groups.append(group)
    return groups


def _budgets(rng, sizes: np.ndarray) -> list[int]:
    big = int(sizes.max())
    return [big, big + int(rng.integers(1, 8)), 2 * big, int(sizes.sum()), int(rng.integers(big, 4 * big + 1))]


@pytest.mark.parametrize("seed", range(60))
def test_random_inputs_match_python(seed):
    rng = np.random.default_rng(1000 + seed)
    groups = random_groups(rng, int(rng.integers(1, 40)), vocab=int(rng.choice([2, 5, 50, 50_000])))
    tokens, so, go = flatten_groups(groups)
    prefix = packing.group_prefix_lengths(tokens, so, go)
    sizes = packing.group_token_counts(so, go, prefix)
    for budget in _budgets(rng, sizes):  # 60 seeds x 5 budgets: tight (the largest group) to loose
        assert_same(plan_cpp(tokens, so, go, budget), plan_python(tokens, so, go, budget))


@pytest.mark.parametrize("seed", range(4))
def test_many_groups_match_python(seed):
    rng = np.random.default_rng(seed)
    groups = random_groups(rng, 2000, vocab=100)
    tokens, so, go = flatten_groups(groups)
    for budget in (512, 1000, 4096):
        assert_same(plan_cpp(tokens, so, go, budget), plan_python(tokens, so, go, budget))


def test_many_equal_sizes_keep_index_order():
    # every group the same size: ties go by group index, bins fill in index order
    groups = [[[g, 1, 2], [g, 1, 3]] for g in range(500)]
    tokens, so, go = flatten_groups(groups)
    for budget in (4, 5, 8, 9, 12, 100, 10_000):
        assert_same(plan_cpp(tokens, so, go, budget), plan_python(tokens, so, go, budget))


def test_ffd_fills_earlier_bins_first():
    # first fit, not best fit: the hand-worked example of test_packing (sizes 3 7 2 5 4 1, budget 8)
    groups = [[[7] * n] for n in (3, 7, 2, 5, 4, 1)]
    got = plan_cpp(*flatten_groups(groups), budget=8)
    assert [b.group_ids.tolist() for b in got] == [[1, 5], [3, 0], [4, 2]]
    assert_same(got, plan_python(*flatten_groups(groups), budget=8))


def test_inputs_of_other_dtypes_and_lists():
    groups = [[[1, 2, 3, 4], [1, 2, 3, 5]], [[9, 9]], [[4] * 5]]
    tokens, so, go = flatten_groups(groups)
    want = plan_python(tokens, so, go, 8)
    assert_same(plan_cpp(tokens.astype(np.int32), so.astype(np.int32), go.astype(np.uint16), np.int64(8)), want)
    assert_same(plan_cpp(tokens.tolist(), so.tolist(), go.tolist(), 8), want)
    assert_same(plan_cpp(tokens[::-1][::-1], so, go, 8), want)  # a non-contiguous view
    assert_same(plan_cpp(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64), 8), [])


def _errors(*args):
    """The PackingError messages of both planners on the same input (None where none is raised)."""
    out = []
    for fn in (plan_cpp, plan_python):
        try:
            fn(*args)
        except PackingError as err:
            out.append(str(err))
        else:
            out.append(None)
    return out


def test_over_budget_is_the_same_error():
    groups = [[[1, 2, 3]], [[5] * 9], [[6] * 9], [[1, 2, 3, 4], [1, 2, 3, 5]]]
    args = flatten_groups(groups)
    cpp, py = _errors(*args, 8)
    assert cpp == py == ("group 1 needs 9 tokens, over the token budget of 8 per micro-batch; "
                         "raise max_tokens_per_batch (or lower max_length)")
    for budget in (0, -5, 4):
        cpp, py = _errors(*args, budget)
        assert cpp == py and cpp is not None


@pytest.mark.parametrize("seed", range(40))
def test_random_errors_match(seed):
    rng = np.random.default_rng(seed)
    groups = random_groups(rng, int(rng.integers(1, 20)), vocab=10)
    tokens, so, go = flatten_groups(groups)
    sizes = packing.group_token_counts(so, go, packing.group_prefix_lengths(tokens, so, go))
    budget = int(rng.integers(0, int(sizes.max())))  # below the largest group
    cpp, py = _errors(tokens, so, go, budget)
    assert cpp == py and cpp is not None and "over the token budget" in cpp


def test_layout_errors_are_the_same():
    tokens, so, go = flatten_groups([[[1, 2]], [[3, 4, 5], [3, 6]]])
    cases = {
        "empty sequence": (np.array([1, 2, 3]), np.array([0, 2, 2, 3]), np.array([0, 1, 3])),
        "seq_offsets end": (tokens, so[:-1], go),
        "seq_offsets start": (tokens, so + 1, go),
        "seq_offsets empty": (tokens, np.zeros(0, np.int64), go),
        "group_offsets end": (tokens, so, np.array([0, 1, 2])),
        "group_offsets start": (tokens, so, np.array([1, 3])),
        "group_offsets empty": (tokens, so, np.zeros(0, np.int64)),
        "group with no sequences": (tokens, so, np.array([0, 1, 1, 3])),
        "decreasing offsets": (np.arange(5), np.array([0, 3, 2, 5]), np.array([0, 3])),
    }
    for name, args in cases.items():
        cpp, py = _errors(*args, 100)
        assert cpp == py and cpp is not None, (name, cpp, py)
    assert _errors(*flatten_groups([[[1, 2]], [[]]]), 10) == ["sequence 1 is empty: every sequence needs at "
                                                             "least one token"] * 2


def test_error_is_a_value_error_from_the_extension():
    with pytest.raises(ValueError, match="over the token budget of 2"):
        _planner.plan(*flatten_groups([[[1, 2, 3]]]), 2)


def test_dispatch_and_log_once(monkeypatch, caplog):
    args = flatten_groups([[[1, 2, 3], [1, 2, 4]]])
    monkeypatch.setattr(planner, "_announced", set())
    calls = []
    real = _planner.plan
    monkeypatch.setattr(planner._planner, "plan", lambda *a: calls.append(1) or real(*a))
    monkeypatch.delenv("THEMIS_PLANNER", raising=False)
    with caplog.at_level(logging.INFO, logger="themis_engine"):
        packing.plan(*args, 10)
        packing.plan(*args, 10)
        monkeypatch.setenv("THEMIS_PLANNER", "python")
        packing.plan(*args, 10)
    assert len(calls) == 2  # THEMIS_PLANNER=python kept the third call off the extension
    msgs = [r.getMessage() for r in caplog.records if r.name == "themis_engine"]
    assert msgs == ["packing planner: C++ (themis_engine._planner)", "packing planner: pure Python"]
