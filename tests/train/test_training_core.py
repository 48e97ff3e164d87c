"""The trainer's core on CPU: a step's gradient does not depend on how pairs were packed, and equals
an unpacked, unshared reference step; LM targets land on the chosen response tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from train_helpers import tiny_objective, token_pairs

from themis_engine.packing.batch import SegmentMeta
from themis_engine.train import microbatch

H = 3


def _pairs(n=7, seed=0):
    return token_pairs(n, seed, shared_answer=True, margins=[0.0, 0.5])


def _objective(lm_coef=0.3, mu=0.05, seed=0):
    return tiny_objective(lm_coef, mu, seed).double()


def _packed_grads(obj, pairs, budget):
    obj.zero_grad()
    ids = list(range(len(pairs)))
    bt_norm, lm_norm = microbatch.global_counts(pairs, ids, H, True)
    total = 0.0
    mbs = microbatch.build_micro_batches(pairs, ids, budget, H, True)
    for mb in mbs:
        loss, _, _ = obj(**mb.to_torch("cpu"), bt_normalizer=bt_norm, lm_normalizer=lm_norm)
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad.clone() for n, p in obj.named_parameters()}, len(mbs)


def _alone(rm, seq):
    """Hidden states [L, D] of one standalone sequence (one segment, no prefix sharing)."""
    ids = torch.tensor(seq)
    L = len(seq)
    meta = SegmentMeta(torch.tensor([0, L], dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                       torch.zeros(1, dtype=torch.int32), L)
    return rm.hidden_states(ids, torch.arange(L), meta)


def _reference_grads(obj, pairs):
    """The same objective written the plain way: every sequence alone, per-pair loops."""
    obj.zero_grad()
    rm = obj.rm
    cells = lm_tokens = 0
    bt_sum = mag_sum = lm_sum = 0.0
    for p in pairs:
        hc, hr = _alone(rm, p.chosen_ids), _alone(rm, p.rejected_ids)
        rc = rm.score(rm.model.norm(hc[-1]))
        rr = rm.score(rm.model.norm(hr[-1]))
        heads = range(H) if p.aspect_index < 0 else [p.aspect_index]
        for h in heads:
            cells += 1
            bt_sum = bt_sum - F.logsigmoid(rc[h] - rr[h] - p.margin)
            mag_sum = mag_sum + (rc[h] + rr[h]) ** 2
        s = p.chosen_response_start
        logits = rm.lm_head(rm.model.norm(hc[s - 1 : -1]))
        lm_sum = lm_sum + F.cross_entropy(logits, torch.tensor(p.chosen_ids[s:]), reduction="sum")
        lm_tokens += len(p.chosen_ids) - s
    loss = bt_sum / cells + obj.magnitude_coef * mag_sum / cells + obj.lm_coef * lm_sum / lm_tokens
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in obj.named_parameters()}


def test_step_gradient_is_packing_invariant_and_equals_unshared_reference():
    pairs = _pairs()
    obj = _objective()
    big_loss, big, n_big = _packed_grads(obj, pairs, budget=10_000)
    small_loss, small, n_small = _packed_grads(obj, pairs, budget=40)
    ref_loss, ref = _reference_grads(obj, pairs)
    assert n_big == 1 and n_small > 2
    assert abs(big_loss - ref_loss) < 1e-10 and abs(small_loss - ref_loss) < 1e-10
    for name in ref:
        torch.testing.assert_close(big[name], ref[name], rtol=1e-9, atol=1e-11, msg=name)
        torch.testing.assert_close(small[name], ref[name], rtol=1e-9, atol=1e-11, msg=name)
    assert any(float(g.abs().max()) > 0 for g in ref.values())


def test_lm_targets_follow_the_chosen_standalone_sequence():
    pairs = _pairs(5, seed=3)
    (mb,) = microbatch.build_micro_batches(pairs, range(5), 10_000, H, True)
    ids = mb.packed.input_ids
    # each target row holds token t of its standalone chosen sequence and the label is token t+1
    expected = []
    for p in (pairs[i] for i in mb.pair_ids):
        expected += p.chosen_ids[p.chosen_response_start:]
    assert sorted(mb.lm_labels.tolist()) == sorted(expected)
    pos = mb.packed.position_ids[mb.lm_rows]
    k = 0
    for p in (pairs[i] for i in mb.pair_ids):
        n = len(p.chosen_ids) - p.chosen_response_start
        assert pos[k : k + n].tolist() == list(range(p.chosen_response_start - 1, len(p.chosen_ids) - 1))
        assert ids[mb.lm_rows[k : k + n]].tolist() == p.chosen_ids[p.chosen_response_start - 1 : -1]
        k += n


def test_masks_follow_aspects():
    assert microbatch.pair_mask(-1, 3).tolist() == [True, True, True]
    assert microbatch.pair_mask(1, 3).tolist() == [False, True, False]
    assert microbatch.pair_mask(2, 1).tolist() == [True]
