"""The prefix-shared varlen flash-attention kernel against `reference.attention`.

Oracle: the reference in float64 (inputs upcast). Tolerance (flash-attention's rule): the kernel's
max error on out, lse, dq, dk, dv is at most 2x the max error of the reference itself run in the
same precision on the same inputs, plus a floor: 1e-5 for float32 (and for lse, always float32);
for float16 / bfloat16 one unit of roundoff at the result's largest magnitude (eps * max|exact|).
That floor is needed because the reference accumulates in float32 internally, so its "low
precision" error is only the final rounding, while a flash kernel (as FlashAttention-2) rounds P and
dS to the input dtype before its tensor-core products and takes delta from the rounded output.
Without a GPU the kernels run under the Triton interpreter (tests/conftest.py), in float32 and
float16 only: Triton 3.9's interpreter computes tl.dot on bfloat16 wrongly, so bf16 is GPU-only.
"""


import pytest
import torch
from helpers import pack_groups, random_groups
from numerics import assert_2x_rule, eps_floor

from themis_engine import kernels
from themis_engine.kernels import attention_kernel as ak
from themis_engine.kernels import reference

SMALL = ak.AttentionBlocks(16, 16, 16, 16, 16, 16, 1, 1, 1)
# fwd BLOCK_M > BLOCK_N, dkdv keys > queries: the diagonal spans several inner tiles
UNEVEN = ak.AttentionBlocks(32, 16, 32, 16, 16, 32, 1, 1, 1)


def error_floor(name, dtype, exact):
    """What is added to 2x the reference's own error (see the module docstring)."""
    if name == "lse" or dtype == torch.float32:
        return 1e-5
    return eps_floor(dtype, exact)


# --------------------------------------------------------------------------------------------
# Metadata helpers: groups of one prefix + K suffixes, packed into one stream
# --------------------------------------------------------------------------------------------
def make_qkv(T, Hq, Hkv, D, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(T, h, D, generator=gen) for h in (Hq, Hkv, Hkv))
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)]


def run(fn, q, k, v, meta, dout, dlse=None, dtype=None, scale=None):
    """fn(...) -> (out, lse) and the gradients of sum(out * dout) [+ sum(lse * dlse)] wrt q, k, v,
    with the inputs cast to `dtype` first (the same values for every run)."""
    cu, ps, pl, max_seqlen = meta
    dtype = dtype or q.dtype
    xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    out, lse = fn(*xs, cu.to(q.device), ps.to(q.device), pl.to(q.device), max_seqlen, scale)
    loss = (out * dout.to(out.dtype)).sum()
    if dlse is not None:
        loss = loss + (lse * dlse).sum()
    loss.backward()
    return {"out": out, "lse": lse, "dq": xs[0].grad, "dk": xs[1].grad, "dv": xs[2].grad}


def kernel_fn(blocks):
    return lambda *args: ak.attention(*args, blocks=blocks)


def assert_close_to_reference(q, k, v, meta, blocks, with_dlse=False, seed=1):
    """Kernel vs float64 reference, with 2x the low-precision reference's error as the bound."""
    gen = torch.Generator().manual_seed(seed)
    dout = torch.randn(q.shape, generator=gen).to(device=q.device, dtype=q.dtype)  # same values for all runs
    dlse = torch.randn(q.shape[1], q.shape[0], generator=gen).to(q.device) if with_dlse else None
    got = run(kernel_fn(blocks), q, k, v, meta, dout, dlse)
    exact = run(reference.attention, q, k, v, meta, dout, dlse, dtype=torch.float64)
    low = run(reference.attention, q, k, v, meta, dout, dlse)
    for name in ("out", "lse", "dq", "dk", "dv"):
        # lse of rows in no segment is -inf in all three: the NaN policy matches those positions
        assert_2x_rule(name, got[name], low[name], exact[name], floor=error_floor(name, q.dtype, exact[name]))
    return got


# --------------------------------------------------------------------------------------------
# Interpreter-sized tests (float32 / float16)
# --------------------------------------------------------------------------------------------
CASES = {
    # name: (groups, Hq, Hkv, D)
    "plain_varlen": ([(0, [1, 17, 33, 5, 16])], 2, 2, 16),
    "pair_gqa4_d64": ([(37, [19, 1])], 4, 1, 64),
    "k16_gqa8": ([(9, [1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5, 6, 7, 8, 3])], 8, 1, 16),
    "many_groups": (random_groups(3, 20, 12, 4, n_groups=9, plain_every=3), 4, 2, 32),
    "length_one": ([(1, [1, 1, 1]), (0, [1, 1]), (1, [1])], 4, 4, 16),
    "long_prefix_short_suffixes": ([(70, [3, 1, 17]), (0, [40])], 4, 1, 32),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype, device):
    groups, Hq, Hkv, D = CASES[case]
    meta = pack_groups(groups)
    T = int(meta[0][-1])
    q, k, v = make_qkv(T, Hq, Hkv, D, dtype, device, seed=len(case))
    assert_close_to_reference(q, k, v, meta, SMALL)


@pytest.mark.parametrize("case", ["pair_gqa4_d64", "many_groups", "long_prefix_short_suffixes"])
def test_uneven_blocks(case, device):
    groups, Hq, Hkv, D = CASES[case]
    meta = pack_groups(groups)
    q, k, v = make_qkv(int(meta[0][-1]), Hq, Hkv, D, torch.float32, device, seed=5)
    assert_close_to_reference(q, k, v, meta, UNEVEN)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_random_k_up_to_16(dtype, device):
    groups = random_groups(11, 24, 6, 16, n_groups=4, plain_every=4)
    meta = pack_groups(groups)
    q, k, v = make_qkv(int(meta[0][-1]), 8, 2, 16, dtype, device, seed=2)
    assert_close_to_reference(q, k, v, meta, SMALL)


def test_lse_gradient(device):
    """A loss that also uses lse (e.g. a distillation term) gets the right gradients."""
    meta = pack_groups([(21, [5, 13]), (0, [9])])
    q, k, v = make_qkv(int(meta[0][-1]), 4, 2, 16, torch.float32, device, seed=3)
    assert_close_to_reference(q, k, v, meta, SMALL, with_dlse=True)


def test_small_max_seqlen_is_slow_not_wrong(device):
    """Programs loop over their segment's blocks with a grid stride: max_seqlen=1 still covers all."""
    cu, ps, pl, _ = pack_groups([(40, [35, 2]), (0, [50])])
    q, k, v = make_qkv(int(cu[-1]), 2, 1, 16, torch.float32, device, seed=4)
    assert_close_to_reference(q, k, v, (cu, ps, pl, 1), SMALL)


def test_rows_outside_segments(device):
    """Rows in no segment: out 0, lse -inf, no gradient; the rest unaffected."""
    cu, ps, pl, max_seqlen = pack_groups([(11, [6, 3]), (0, [7])], lead=5)
    T = int(cu[-1]) + 4
    q, k, v = make_qkv(T, 2, 2, 16, torch.float32, device, seed=6)
    got = assert_close_to_reference(q, k, v, (cu, ps, pl, max_seqlen), SMALL)
    outside = torch.ones(T, dtype=torch.bool)
    outside[int(cu[0]) : int(cu[-1])] = False
    assert (got["out"][outside] == 0).all() and torch.isneginf(got["lse"][:, outside]).all()
    for name in ("dq", "dk", "dv"):
        assert (got[name][outside] == 0).all(), name


def test_prefix_range_spanning_segments(device):
    """The general mask of the reference: a prefix range that covers part of one segment and part of
    the next (not a layout the planner makes, but the contract allows it)."""
    cu = torch.tensor([0, 10, 30, 45, 52], dtype=torch.int32)
    ps = torch.tensor([0, 0, 5, 12], dtype=torch.int32)
    pl = torch.tensor([0, 0, 12, 3], dtype=torch.int32)
    q, k, v = make_qkv(52, 2, 1, 16, torch.float32, device, seed=7)
    assert_close_to_reference(q, k, v, (cu, ps, pl, 20), SMALL)


def test_suffix_equals_standalone_sequence(device):
    """The engine's invariant: each suffix of a shared prefix gets what P + S_k alone gets."""
    prefix, suffixes = 23, [9, 1, 14]
    shared = pack_groups([(prefix, suffixes)])
    T = int(shared[0][-1])
    q, k, v = make_qkv(T, 4, 2, 16, torch.float32, device, seed=8)
    out, lse = ak.attention(q, k, v, *shared[:3], shared[3], 0.25, blocks=SMALL)
    start = prefix
    for n in suffixes:
        rows = torch.cat([torch.arange(prefix), torch.arange(start, start + n)]).to(device)
        cu = torch.tensor([0, prefix + n], dtype=torch.int32)
        zero = torch.zeros(1, dtype=torch.int32)
        out_alone, lse_alone = ak.attention(q[rows], k[rows], v[rows], cu, zero, zero, prefix + n, 0.25, blocks=SMALL)
        torch.testing.assert_close(out[start : start + n], out_alone[prefix:], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(lse[:, start : start + n], lse_alone[:, prefix:], atol=2e-6, rtol=1e-5)
        start += n


def test_inference_mode(device):
    meta = pack_groups([(13, [4, 6])])
    q, k, v = make_qkv(int(meta[0][-1]), 2, 2, 16, torch.float32, device)
    expected, _ = reference.attention(q, k, v, meta[0], meta[1], meta[2], meta[3], 0.25)
    with torch.inference_mode():
        cu, ps, pl = (x.clone() for x in meta[:3])
        out, _ = ak.attention(q, k, v, cu, ps, pl, meta[3], 0.25, blocks=SMALL)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


def test_viewer_table():
    """For each segment, the segments whose prefix range overlaps it (CSR)."""
    import numpy as np

    cu, ps, pl, _ = pack_groups([(4, [2, 3]), (0, [5]), (6, [1])])
    ptr, seg = ak._build_viewers(cu.numpy(), ps.numpy(), pl.numpy())
    viewers = [seg[ptr[s] : ptr[s + 1]].tolist() for s in range(len(ptr) - 1)]
    assert viewers == [[1, 2], [], [], [], [5], []]
    # a range across two segments, and no viewers at all
    ptr, seg = ak._build_viewers(np.array([0, 10, 30, 45]), np.array([0, 5, 0]), np.array([0, 12, 0]))
    assert [seg[ptr[s] : ptr[s + 1]].tolist() for s in range(3)] == [[1], [1], []]
    ptr, seg = ak._build_viewers(np.array([0, 3, 5]), np.zeros(2, dtype=int), np.zeros(2, dtype=int))
    assert ptr.tolist() == [0, 0, 0] and seg.size == 1


def test_viewer_table_cache_follows_in_place_edits():
    cu, ps, pl, _ = pack_groups([(4, [2, 3])])
    first = ak._viewer_table(cu, ps, pl, torch.device("cpu"))
    assert ak._viewer_table(cu, ps, pl, torch.device("cpu")) is first
    pl[2] = 0  # the second suffix no longer sees the prefix
    ptr, seg = ak._viewer_table(cu, ps, pl, torch.device("cpu"))
    assert ptr.tolist() == [0, 1, 1, 1] and seg[:1].tolist() == [1]


def test_rejects_bad_inputs(device):
    meta = pack_groups([(0, [8])])
    q, k, v = make_qkv(8, 3, 2, 16, torch.float32, device)
    with pytest.raises(ValueError, match="multiple"):
        ak.attention(q, k, v, *meta[:3], 8, 0.25)
    q, k, v = make_qkv(8, 2, 2, 24, torch.float32, device)
    with pytest.raises(ValueError, match="power of two"):
        ak.attention(q, k, v, *meta[:3], 8, 0.25)


def test_dispatch_picks_the_kernel(themis_kernels, device):
    q = torch.zeros(4, 2, 16, device=device)
    themis_kernels("triton")
    assert kernels.backend_for("attention", q) == "triton"
    assert kernels.implementation("attention", q) is ak.attention


def test_dispatch_sends_other_head_dims_to_the_reference(themis_kernels, device):
    """Head dim 24 (the demo preset's) or 8: the kernel refuses them, so the dispatch runs the
    reference, with one warning, and the result is the reference's."""
    themis_kernels("triton")
    meta = pack_groups([(5, [3, 2]), (0, [4])])
    T = int(meta[0][-1])
    for D in (24, 8):
        q, k, v = make_qkv(T, 2, 1, D, torch.float32, device, seed=D)
        kernels._warned_head_dims.discard(D)
        with pytest.warns(UserWarning, match=f"head dim {D} is not one the Triton kernel takes"):
            out, lse = kernels.attention(q, k, v, *meta[:3], meta[3], D**-0.5)
        ref_out, ref_lse = reference.attention(q, k, v, *meta[:3], meta[3], D**-0.5)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def test_torch_compile_traces_the_ops(device):
    meta = pack_groups([(12, [5, 1]), (0, [7])])
    q, k, v = make_qkv(int(meta[0][-1]), 4, 2, 16, torch.float32, device, seed=9)

    def loss_fn(q, k, v):
        out, lse = ak.attention(q, k, v, *meta[:3], meta[3], 0.25, blocks=SMALL)
        return (out * out).sum() + lse.sum()

    grads = []
    for fn in (loss_fn, torch.compile(loss_fn, backend="aot_eager", fullgraph=True)):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        fn(*xs).backward()
        grads.append([x.grad for x in xs])
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, atol=0, rtol=0)


def test_opcheck(device):
    meta = pack_groups([(6, [3, 2])])
    q, k, v = make_qkv(int(meta[0][-1]), 2, 1, 16, torch.float32, device)
    cu, ps, pl, max_seqlen = (x.to(device) if torch.is_tensor(x) else x for x in meta)
    blocks = SMALL.as_list()
    torch.library.opcheck(torch.ops.themis.attention_fwd.default, (q, k, v, cu, ps, pl, max_seqlen, 0.25, blocks))
    out, lse = torch.ops.themis.attention_fwd(q, k, v, cu, ps, pl, max_seqlen, 0.25, blocks)
    for dlse in (None, torch.randn_like(lse)):
        args = (torch.randn_like(out), q, k, v, out, lse, dlse, cu, ps, pl, max_seqlen, 0.25, blocks)
        torch.library.opcheck(torch.ops.themis.attention_bwd.default, args)


# --------------------------------------------------------------------------------------------
# GPU: bfloat16 and realistic sizes, default (GPU) block sizes
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("Hq,Hkv,D", [(8, 2, 128), (8, 1, 64), (4, 4, 128)])
def test_gpu_large(Hq, Hkv, D, dtype, device):
    meta = pack_groups(random_groups(D + Hkv, 1024, 300, 8, tokens=4096, plain_every=5))
    q, k, v = make_qkv(int(meta[0][-1]), Hq, Hkv, D, dtype, device, seed=D)
    assert_close_to_reference(q, k, v, meta, ak.default_blocks(D))


@pytest.mark.gpu
def test_gpu_k16_and_length_one_bf16(device):
    groups = [(700, [1] * 8 + [129, 64, 63, 1, 300, 2, 1000, 3]), (0, [1, 1, 255, 257]), (1, [1, 1])]
    meta = pack_groups(groups)
    q, k, v = make_qkv(int(meta[0][-1]), 8, 1, 128, torch.bfloat16, device, seed=12)
    assert_close_to_reference(q, k, v, meta, ak.default_blocks(128), with_dlse=True)
