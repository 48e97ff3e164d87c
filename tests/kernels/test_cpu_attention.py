"""The CPU attention path (kernels/cpu_attention.py, backend "sdpa") against `reference.attention`.

Oracle: the reference in float64 (inputs upcast). Tolerance (ARCHITECTURE.md section 5, the rule of
tests/numerics.py): the error of out, lse, dq, dk, dv is at most 2x the error of the reference
itself run in the same precision on the same inputs, plus a floor: 1e-5 for float32 and for lse
(always float32; the float32 reference's own error on the gradients is 1e-6 and below, so a plain
2x would be a bound on rounding noise); for bfloat16 one unit of roundoff at the result's largest
magnitude (eps * max|exact|). Both dtypes run here: the path is plain PyTorch on the CPU.
Then the model: a tiny RewardModel's rewards and parameter gradients with THEMIS_KERNELS=auto (this
path) equal THEMIS_KERNELS=reference's (the oracle).
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers import pack_groups, random_groups
from numerics import assert_2x_rule, eps_floor

import themis_engine as te
from themis_engine import kernels
from themis_engine.kernels import cpu_attention, reference
from themis_engine.packing.planner import flatten_groups, plan_python


def make_qkv(T, Hq, Hkv, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(T, h, D, generator=gen) for h in (Hq, Hkv, Hkv)]


def run(fn, q, k, v, meta, dout, dlse=None, dtype=None):
    """fn's (out, lse) and the gradients of sum(out * dout) [+ sum(lse * dlse)] wrt q, k, v, the
    inputs cast to `dtype` first (the same values for every run)."""
    cu, ps, pl, max_seqlen = meta
    xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out, lse = fn(*xs, cu, ps, pl, max_seqlen, q.shape[-1] ** -0.5)
    loss = (out * dout.to(out.dtype)).sum()
    if dlse is not None:
        loss = loss + (lse * dlse).sum()
    loss.backward()
    return {"out": out, "lse": lse, "dq": xs[0].grad, "dk": xs[1].grad, "dv": xs[2].grad}


def check(q, k, v, meta, dtype, with_dlse=False, seed=1):
    """cpu_attention in `dtype` vs the float64 reference, bounded by 2x the `dtype` reference's error."""
    gen = torch.Generator().manual_seed(seed)
    dout = torch.randn(q.shape, generator=gen).to(dtype)
    dlse = torch.randn(q.shape[1], q.shape[0], generator=gen) if with_dlse else None
    got = run(cpu_attention.attention, q, k, v, meta, dout, dlse, dtype)
    exact = run(reference.attention, q, k, v, meta, dout, dlse, torch.float64)
    low = run(reference.attention, q, k, v, meta, dout, dlse, dtype)
    assert got["out"].dtype == dtype and got["lse"].dtype == torch.float32
    assert got["out"].shape == q.shape and got["lse"].shape == (q.shape[1], q.shape[0])
    for name in ("out", "lse", "dq", "dk", "dv"):
        floor = 1e-5 if name == "lse" or dtype == torch.float32 else eps_floor(dtype, exact[name])
        assert_2x_rule(name, got[name], low[name], exact[name], floor=floor)
    return got


CASES = {
    # name: (groups, Hq, Hkv, D)
    "plain_varlen_len1": ([(0, [1, 17, 33, 5, 1, 16])], 4, 4, 64),
    "pair_gqa4_d128": ([(37, [19, 1])], 8, 2, 128),
    "k16_gqa8_d64": ([(9, [1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5, 6, 7, 8, 3])], 8, 1, 64),
    "many_groups_gqa4_d128": (random_groups(3, 40, 30, 4, n_groups=9, plain_every=3), 8, 2, 128),
    "length_one": ([(1, [1, 1, 1]), (0, [1, 1]), (1, [1])], 4, 1, 64),
    "long_prefix_short_suffixes_gqa8": ([(70, [3, 1, 17]), (0, [40])], 8, 1, 64),
    "k16_random_gqa1_d128": (random_groups(11, 50, 23, 16, n_groups=3), 2, 2, 128),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype):
    groups, Hq, Hkv, D = CASES[case]
    meta = pack_groups(groups)
    q, k, v = make_qkv(int(meta[0][-1]), Hq, Hkv, D, seed=len(case))
    check(q, k, v, meta, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_suffix_not_after_its_prefix(dtype):
    """No suffix follows its prefix: every suffix runs as two calls (prefix keys, own keys) merged."""
    meta = pack_groups([(13, [7, 1, 29]), (0, [5]), (1, [1, 2])], prefix_last=True)
    assert [c[0] for c in cpu_attention._plan(*meta[:3])] == ["split"] * 3 + ["causal"] * 2 + ["split"] * 2 + [
        "causal"]
    q, k, v = make_qkv(int(meta[0][-1]), 8, 2, 64, seed=9)
    check(q, k, v, meta, dtype)


def test_plan_splits_every_suffix():
    """The planner's layout: the prefix alone (causal), every suffix split, the first one too."""
    cu, ps, pl, _ = pack_groups([(5, [3, 4]), (0, [2]), (6, [1])])
    assert cpu_attention._plan(cu, ps, pl) == [("causal", 0, 5), ("split", 5, 8, 0, 5), ("split", 8, 12, 0, 5),
                                                ("causal", 12, 14), ("causal", 14, 20), ("split", 20, 21, 14, 6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_identical_suffixes_are_bitwise_identical(dtype):
    """Two identical answers to one prompt (a tie in an evaluation) get the same bits, whichever
    comes first after the prefix."""
    prefix, n = 19, 11
    cu, ps, pl, max_seqlen = pack_groups([(prefix, [n, n, n])])
    q, k, v = (x.to(dtype) for x in make_qkv(int(cu[-1]), 8, 2, 64, seed=12))
    for x in (q, k, v):  # the three suffixes' rows equal
        x[prefix + n : prefix + 2 * n] = x[prefix : prefix + n]
        x[prefix + 2 * n :] = x[prefix : prefix + n]
    out, lse = cpu_attention.attention(q, k, v, cu, ps, pl, max_seqlen, 0.125)
    first = slice(prefix, prefix + n)
    for other in (slice(prefix + n, prefix + 2 * n), slice(prefix + 2 * n, prefix + 3 * n)):
        assert torch.equal(out[first], out[other]) and torch.equal(lse[:, first], lse[:, other])


def test_head_dim_not_a_power_of_two():
    meta = pack_groups([(21, [5, 13]), (0, [9])])
    q, k, v = make_qkv(int(meta[0][-1]), 6, 3, 80, seed=2)
    check(q, k, v, meta, torch.float32)


def test_lse_gradient():
    """A loss that also uses lse gets its gradients (through the reference, the rare path)."""
    meta = pack_groups([(21, [5, 13]), (0, [9])])
    q, k, v = make_qkv(int(meta[0][-1]), 4, 2, 64, seed=3)
    check(q, k, v, meta, torch.float32, with_dlse=True)


def test_rows_outside_segments_and_empty_segments():
    """Rows in no segment: out 0, lse -inf, no gradient; an empty segment changes nothing."""
    cu, ps, pl, max_seqlen = pack_groups([(11, [6, 3]), (0, [7])], lead=5)
    cu = torch.cat([cu[:3], cu[2:]])  # an empty segment after the first suffix
    ps, pl = torch.cat([ps[:2], ps[1:2], ps[2:]]), torch.cat([pl[:2], torch.zeros(1, dtype=torch.int32), pl[2:]])
    T = int(cu[-1]) + 4
    q, k, v = make_qkv(T, 4, 2, 64, seed=6)
    got = check(q, k, v, (cu, ps, pl, max_seqlen), torch.float32)
    outside = torch.ones(T, dtype=torch.bool)
    outside[int(cu[0]) : int(cu[-1])] = False
    assert (got["out"][outside] == 0).all() and torch.isneginf(got["lse"][:, outside]).all()
    for name in ("dq", "dk", "dv"):
        assert (got[name][outside] == 0).all(), name


def test_prefix_range_spanning_segments():
    """The reference's general mask: a prefix range over parts of two segments."""
    cu = torch.tensor([0, 10, 30, 45, 52], dtype=torch.int32)
    ps = torch.tensor([0, 0, 5, 12], dtype=torch.int32)
    pl = torch.tensor([0, 0, 12, 3], dtype=torch.int32)
    q, k, v = make_qkv(52, 4, 1, 64, seed=7)
    check(q, k, v, (cu, ps, pl, 20), torch.float32)


def test_suffix_equals_standalone_sequence():
    """The engine's invariant, on this path: each suffix of a shared prefix gets what P + S_k alone gets."""
    prefix, suffixes = 23, [9, 1, 14]
    cu, ps, pl, max_seqlen = pack_groups([(prefix, suffixes)])
    q, k, v = make_qkv(int(cu[-1]), 8, 2, 64, seed=8)
    out, lse = cpu_attention.attention(q, k, v, cu, ps, pl, max_seqlen, 0.125)
    start, zero = prefix, torch.zeros(1, dtype=torch.int32)
    for n in suffixes:
        rows = torch.cat([torch.arange(prefix), torch.arange(start, start + n)])
        alone = cpu_attention.attention(q[rows], k[rows], v[rows], torch.tensor([0, prefix + n], dtype=torch.int32),
                                        zero, zero, prefix + n, 0.125)
        torch.testing.assert_close(out[start : start + n], alone[0][prefix:], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse[:, start : start + n], alone[1][:, prefix:], rtol=1e-5, atol=1e-6)
        start += n


def test_dispatch(themis_kernels, monkeypatch):
    """auto on the CPU: attention runs here, the other ops on their references; reference forces the
    reference; the choice is backend_for's alone."""
    x = torch.zeros(3, 2, 64)
    themis_kernels("auto")
    assert kernels.backend_for("attention", x) == "sdpa" and kernels.SDPA_OPS == ("attention",)
    assert kernels.implementation("attention", x) is cpu_attention.attention
    assert kernels.backend_for("rms_norm", x) == "reference"
    themis_kernels("cuda")
    assert kernels.backend_for("attention", x) == "sdpa"
    themis_kernels("reference")
    assert kernels.backend_for("attention", x) == "reference"
    assert kernels.implementation("attention", x) is reference.attention
    calls = []
    monkeypatch.setattr(cpu_attention, "attention", lambda *a: calls.append(1) or reference.attention(*a))
    meta = pack_groups([(3, [2, 2])])
    q, k, v = make_qkv(7, 2, 1, 64)
    kernels.attention(q, k, v, *meta[:3], meta[3], 0.125)
    assert not calls
    themis_kernels("auto")
    kernels.attention(q, k, v, *meta[:3], meta[3], 0.125)
    assert calls == [1]


# --------------------------------------------------------------------------------------------
# The model: rewards and training gradients equal the reference backend's
# --------------------------------------------------------------------------------------------
def _model_batch(seed=0):
    """Groups of token ids (a shared prompt, K = 1..4 responses) packed by the planner."""
    rng = random.Random(seed)
    groups = []
    for k in (2, 1, 4, 2, 3):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randint(1, 40))]
        groups.append([prompt + [rng.randrange(3, 500) for _ in range(rng.randint(1, 30))] for _ in range(k)])
    groups.append([[rng.randrange(3, 500)]])  # a one-token sequence
    (batch,) = plan_python(*flatten_groups(groups), budget=10_000)
    return batch.to_torch()


def _rewards_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    rewards = model(**inputs)
    (rewards * torch.linspace(-1, 1, rewards.numel()).view_as(rewards)).sum().backward()
    return rewards.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_model_matches_reference_backend(tiny_rm_dir, themis_kernels):
    model = te.RewardModel.from_pretrained(tiny_rm_dir, dtype=torch.float32, keep_lm_head=False)
    inputs = _model_batch()
    assert int(inputs["meta"].prefix_len.gt(0).sum()) >= 8  # suffixes that share a prompt
    themis_kernels("reference")
    ref, ref_grads = _rewards_and_grads(model, inputs)
    themis_kernels("auto")
    assert kernels.backend_for("attention", inputs["input_ids"].float()) == "sdpa"
    got, grads = _rewards_and_grads(model, inputs)
    assert ref.std() > 1e-2  # not trivially equal
    assert (got - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item()), (got - ref).abs().max()
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        err, scale = (g - ref_grads[name]).abs().max().item(), ref_grads[name].abs().max().item()
        assert err <= 1e-4 * scale + 1e-6, (name, err, scale)


def test_scorer_matches_reference_backend(tiny_rm_dir, themis_kernels):
    """Scorer.score_pairs / score_groups (prefix-shared batches) give the reference backend's scores."""
    scorer = te.Scorer.from_pretrained(tiny_rm_dir, device="cpu", dtype=torch.float32)
    rng = random.Random(4)
    words = "def return for while if else int main print list sum value index buffer".split()

    def text(lo, hi):
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    prompts = [text(3, 30) for _ in range(4)]
    chosen, rejected = [text(1, 40) for _ in prompts], [text(1, 40) for _ in prompts]
    completions = [[text(1, 30) for _ in range(k)] for k in (1, 3, 5, 2)]
    results = {}
    for backend in ("reference", "auto"):
        themis_kernels(backend)
        results[backend] = (*scorer.score_pairs(prompts, chosen, rejected),
                            *scorer.score_groups(prompts, completions))
    for got, ref in zip(results["auto"], results["reference"]):
        assert (got - ref).abs().max().item() <= 1e-5, (got - ref).abs().max()


def test_expanded_gradient_and_strided_inputs():
    """out.sum() hands the backward an expanded gradient (stride 0) and q, k, v may be views with a
    strided last dimension: the kernel reads neither as laid out, so both are copied first; the
    gradients equal the reference's."""
    meta = pack_groups([(9, [4, 6]), (0, [5])])
    T = int(meta[0][-1])
    base = torch.randn(T, 4, 2 * 32, dtype=torch.float64)
    grads = {}
    for name, fn in (("sdpa", cpu_attention.attention), ("reference", reference.attention)):
        leaf = base.clone().requires_grad_()
        q = leaf[..., ::2]  # a strided last dimension
        k, v = leaf[:, :2, 1::2], leaf[:, 2:, 1::2]
        out, _ = fn(q, k, v, *meta[:3], meta[3], 0.2)
        out.sum().backward()
        grads[name] = leaf.grad
    torch.testing.assert_close(grads["sdpa"], grads["reference"], rtol=1e-9, atol=1e-9)


def test_no_rows():
    empty = torch.zeros(0, 4, 16)
    cu = torch.zeros(1, dtype=torch.int32)
    none = torch.zeros(0, dtype=torch.int32)
    out, lse = cpu_attention.attention(empty, empty[:, :2], empty[:, :2], cu, none, none, 0, 0.25)
    assert out.shape == (0, 4, 16) and lse.shape == (4, 0)
