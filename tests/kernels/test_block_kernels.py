"""The decoder-block kernels (RMSNorm [+ residual add], RoPE, fused q/k-norm + RoPE, SwiGLU) against
their references in kernels/reference.py.

Every check runs the kernel, the reference in the kernel's dtype and the reference in float64 (inputs
upcast), on the output and on EVERY input gradient:
* float32: the kernel is within ~1e-5 (relative to the tensor's scale) of the float64 reference;
* float16 / bfloat16: the kernel's error is at most 2x the error of the reference run in the same
  low precision, plus a small floor (a fraction of one ulp at the tensor's scale);
* the forward is also within a few ulps (at the tensor's scale) of the same-dtype reference run
  (the kernels keep Hugging Face's rounding points).
On a machine without a GPU the kernels run under the Triton interpreter (tests/conftest.py) at small
sizes in float32 / float16; bfloat16 at realistic sizes is @pytest.mark.gpu.
"""

from __future__ import annotations

import pytest
import torch
from numerics import assert_2x_rule, assert_close, eps_floor

from themis_engine.kernels import reference as ref
from themis_engine.kernels.rmsnorm_kernel import rms_norm
from themis_engine.kernels.rope_kernel import qk_norm_rope, rope
from themis_engine.kernels.swiglu_kernel import swiglu

FP32_TOL = 1e-5
LOW_FLOOR_ULPS = 0.125  # the floor of the 2x rule: 1/8 of the dtype's eps at the tensor's scale


# --------------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------------
def _run(fn, args, diff, grads_out):
    """fn(*args) with the args at indices `diff` as fresh leaves requiring grad; returns
    (outputs, gradients of those args) for the upstream gradients `grads_out`."""
    args = list(args)
    for i in diff:
        args[i] = args[i].detach().clone().requires_grad_(True)
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = torch.autograd.grad(outs, [args[i] for i in diff], [g.to(o.dtype) for g, o in zip(grads_out, outs)])
    return [o.detach() for o in outs], list(grads)


def _upcast(a):
    return a.double() if torch.is_tensor(a) and a.is_floating_point() else a


def _check(name, got, low, exact, dtype):
    """got / low: kernel / same-dtype reference result; exact: the float64 reference result."""
    assert got.dtype == low.dtype, f"{name}: dtype {got.dtype} != reference's {low.dtype}"
    if dtype == torch.float32:
        assert_close(got, exact, FP32_TOL, name)
    else:
        assert_2x_rule(name, got, low, exact, floor=eps_floor(dtype, exact, LOW_FLOOR_ULPS))


def _ulps_of_scale(got, expect):
    """max |got - expect| in ulps of expect's dtype at expect's largest magnitude (element-wise ulps
    mean nothing where a rotation cancels to near zero)."""
    scale = expect.abs().max().reshape(1)
    spacing = (torch.nextafter(scale, scale + 1).double() - scale.double()).item()
    return (got.double() - expect.double()).abs().max().item() / spacing


def compare(kernel_fn, ref_fn, args, diff, grads_out, dtype, names, max_ulps=None):
    """Run the kernel, the same-dtype reference and the float64 reference; check every output and
    every gradient (see _check), and that the forward is within `max_ulps` (default 4 in float32,
    1 in 16-bit types) ulps at its scale of the same-dtype reference run."""
    k_out, k_grad = _run(kernel_fn, args, diff, grads_out)
    l_out, l_grad = _run(ref_fn, args, diff, grads_out)
    e_out, e_grad = _run(ref_fn, [_upcast(a) for a in args], diff, [g.double() for g in grads_out])
    assert len(k_out) == len(e_out)
    for i, (g, l, e) in enumerate(zip(k_out, l_out, e_out)):
        _check(f"out[{i}]", g, l, e, dtype)
        limit = max_ulps if max_ulps is not None else (4.0 if dtype == torch.float32 else 1.0)
        ulps = _ulps_of_scale(g, l)
        assert ulps <= limit, f"out[{i}]: {ulps} ulps (at its scale) from the {dtype} reference run"
    for name, g, l, e in zip(names, k_grad, l_grad, e_grad):
        _check(f"grad {name}", g, l, e, dtype)


def _gen(seed, device):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, dtype=torch.float32, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dtype=dtype, device=device)

    return randn


def _inv_freq(D, base=10000.0, device="cpu"):
    return 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))


def _packed_positions(T, seed, device):
    """Positions of a packed stream: runs restarting at arbitrary values (prefix-shared suffixes
    restart at the prefix length, new sequences at 0)."""
    g = torch.Generator().manual_seed(seed)
    out, start = [], 0
    while len(out) < T:
        n = int(torch.randint(1, 12, (1,), generator=g))
        out.extend(range(start, start + n))
        start = int(torch.randint(0, 3000, (1,), generator=g))
    return torch.tensor(out[:T], dtype=torch.int64, device=device)


PACKED = [0, 1, 2, 3, 4, 5, 4, 5, 6]  # a prefix of 4, then two suffixes restarting at 4
LOW_DTYPES = [torch.float32, torch.float16]


# --------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("D", [48, 64, 100, 128])
@pytest.mark.parametrize("rows", [1, 7, 65])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_rms_norm(device, dtype, D, rows, residual):
    randn = _gen(rows * 1000 + D, device)
    x = randn(rows, D, dtype=dtype, scale=2.0)
    w = randn(D, dtype=dtype, scale=0.2, shift=1.0)
    eps = 1e-6
    if residual:
        r = randn(rows, D, dtype=dtype)
        grads = [randn(rows, D, dtype=dtype), randn(rows, D, dtype=dtype)]
        compare(
            lambda x, w, r: rms_norm(x, w, eps, r),
            lambda x, w, r: ref.rms_norm(x, w, eps, r),
            [x, w, r], [0, 1, 2], grads, dtype, ["x", "weight", "residual"],
        )
    else:
        compare(
            lambda x, w: rms_norm(x, w, eps),
            lambda x, w: ref.rms_norm(x, w, eps),
            [x, w], [0, 1], [randn(rows, D, dtype=dtype)], dtype, ["x", "weight"],
        )


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_rms_norm_strided_3d_and_mixed_weight(device, dtype):
    """x a non-contiguous [B, S, D] view; an fp32 weight on low-precision x (output promotes)."""
    randn = _gen(7, device)
    base = randn(2, 9, 160, dtype=dtype)
    x = base[:, :, 16:16 + 100]  # row stride 160, not contiguous
    w = randn(100, scale=0.2, shift=1.0)  # float32
    compare(
        lambda x, w: rms_norm(x, w, 1e-5),
        lambda x, w: ref.rms_norm(x, w, 1e-5),
        [x, w], [0, 1], [randn(2, 9, 100)], dtype, ["x", "weight"],
    )


def test_rms_norm_residual_partial_use(device):
    """Only the normalised output is used (the last layer): h gets no gradient; the weight needs none."""
    randn = _gen(11, device)
    x, r = randn(13, 100), randn(13, 100)
    w = randn(100, scale=0.2, shift=1.0)
    gy = randn(13, 100)
    xs = [t.clone().requires_grad_() for t in (x, r)]
    y, _ = rms_norm(xs[0], w, 1e-6, xs[1])
    dx, dr = torch.autograd.grad(y, xs, gy)
    x64 = [t.double().requires_grad_() for t in (x, r)]
    y64, _ = ref.rms_norm(x64[0], w.double(), 1e-6, x64[1])
    ex, er = torch.autograd.grad(y64, x64, gy.double())
    torch.testing.assert_close(dx.double(), ex, rtol=FP32_TOL, atol=FP32_TOL)
    torch.testing.assert_close(dr.double(), er, rtol=FP32_TOL, atol=FP32_TOL)
    # only h used: the gradient passes through unchanged
    xs = [t.clone().requires_grad_() for t in (x, r)]
    _, h = rms_norm(xs[0], w, 1e-6, xs[1])
    dx, dr = torch.autograd.grad(h, xs, gy)
    assert torch.equal(dx, gy) and torch.equal(dr, gy)


def test_rms_norm_residual_stream_across_layers(device):
    """Two fused add+norm layers chained as in a pre-norm decoder: the residual-stream gradient
    reaches the first layer's inputs through both outputs."""
    randn = _gen(12, device)
    x, r, x2 = randn(7, 64), randn(7, 64), randn(7, 64)
    w1, w2 = randn(64, scale=0.2, shift=1.0), randn(64, scale=0.2, shift=1.0)
    gy1, gy2 = randn(7, 64), randn(7, 64)

    def block(fn, x, r, x2, w1, w2):
        y1, h1 = fn(x, w1, 1e-6, r)
        y2, h2 = fn(x2 * y1, w2, 1e-6, h1)  # the next block's output depends on y1
        return (y1 * gy1).sum() + (y2 * gy2).sum() + h2.sum()

    args = [x, r, x2, w1, w2]
    k = [a.clone().requires_grad_() for a in args]
    e = [a.double().requires_grad_() for a in args]
    gk = torch.autograd.grad(block(rms_norm, *k), k)
    ge = torch.autograd.grad(block(ref.rms_norm, *e), e)
    for a, b in zip(gk, ge):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("D", [48, 64, 100, 128])
@pytest.mark.parametrize("H", [1, 3, 8])
@pytest.mark.parametrize("positions", ["packed9", "restarts65"])
def test_rope(device, dtype, D, H, positions):
    if positions == "packed9":
        pos = torch.tensor(PACKED, device=device)
    else:
        pos = _packed_positions(65, seed=D + H, device=device)
    T = pos.numel()
    scaling = 1.0 if H != 3 else 0.8  # attention_scaling != 1 (YaRN-style) on some cases
    randn = _gen(D * 100 + H, device)
    x = randn(T, H, D, dtype=dtype)
    inv_freq = _inv_freq(D, base=1e6 if D == 128 else 1e4, device=device)
    compare(
        lambda x: rope(x, pos, inv_freq, scaling),
        lambda x: ref.rope(x, pos, inv_freq, scaling),
        [x], [0], [randn(T, H, D, dtype=dtype)], dtype, ["x"],
    )


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_rope_strided_qkv_view(device, dtype):
    """q and k as views of a fused qkv projection (token stride > H * D), int32 positions."""
    T, Hq, Hkv, D = 21, 4, 2, 64
    randn = _gen(3, device)
    qkv = randn(T, (Hq + 2 * Hkv) * D, dtype=dtype)
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
    pos = _packed_positions(T, seed=5, device=device).to(torch.int32)
    inv_freq = _inv_freq(D, device=device)
    for x in (q, k):
        assert not x.is_contiguous()
        compare(
            lambda x: rope(x, pos, inv_freq),
            lambda x: ref.rope(x, pos, inv_freq),
            [x], [0], [randn(*x.shape, dtype=dtype)], dtype, ["x"],
        )


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("D", [48, 64, 100, 128])
@pytest.mark.parametrize("H", [1, 5])
@pytest.mark.parametrize("positions", ["packed9", "restarts65"])
def test_qk_norm_rope(device, dtype, D, H, positions):
    if positions == "packed9":
        pos = torch.tensor(PACKED, device=device)
    else:
        pos = _packed_positions(65, seed=D * H, device=device)
    T = pos.numel()
    scaling = 1.0 if H == 1 else 1.1
    eps = 1e-6
    randn = _gen(D * 10 + H, device)
    x = randn(T, H, D, dtype=dtype, scale=3.0)
    w = randn(D, dtype=dtype, scale=0.2, shift=1.0)
    inv_freq = _inv_freq(D, base=1e6, device=device)
    compare(
        lambda x, w: qk_norm_rope(x, w, eps, pos, inv_freq, scaling),
        lambda x, w: ref.rope(ref.rms_norm(x, w, eps), pos, inv_freq, scaling),
        [x, w], [0, 1], [randn(T, H, D, dtype=dtype)], dtype, ["x", "norm_weight"],
    )


def test_qk_norm_rope_strided_no_weight_grad(device):
    T, H, D = 17, 3, 64
    randn = _gen(4, device)
    qkv = randn(T, 5 * D)
    x = qkv[:, D : 4 * D].view(T, H, D)
    w = randn(D, scale=0.2, shift=1.0)  # a frozen norm: no weight gradient asked for
    pos = _packed_positions(T, seed=9, device=device)
    inv_freq = _inv_freq(D, device=device)
    gy = randn(T, H, D)
    xk = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(qk_norm_rope(xk, w, 1e-6, pos, inv_freq), xk, gy)
    xe = x.double().requires_grad_()
    (ex,) = torch.autograd.grad(ref.rope(ref.rms_norm(xe, w.double(), 1e-6), pos, inv_freq), xe, gy.double())
    torch.testing.assert_close(dx.double(), ex, rtol=FP32_TOL, atol=FP32_TOL)


# --------------------------------------------------------------------------------------------
# SwiGLU
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("N", [48, 100, 128, 3000])
@pytest.mark.parametrize("rows", [1, 7, 65])
def test_swiglu(device, dtype, N, rows):
    randn = _gen(rows * 7 + N, device)
    gate = randn(rows, N, dtype=dtype, scale=3.0)
    up = randn(rows, N, dtype=dtype)
    compare(swiglu, ref.swiglu, [gate, up], [0, 1], [randn(rows, N, dtype=dtype)], dtype, ["gate", "up"])


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_swiglu_fused_gate_up_view(device, dtype):
    """gate and up as the two halves of one [B, S, 2I] projection output (strided rows)."""
    randn = _gen(8, device)
    gu = randn(2, 5, 2 * 100, dtype=dtype, scale=2.0)
    gate, up = gu[..., :100], gu[..., 100:]
    compare(swiglu, ref.swiglu, [gate, up], [0, 1], [randn(2, 5, 100, dtype=dtype)], dtype, ["gate", "up"])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy, under the interpreter
def test_swiglu_extreme_gate(device):
    """silu at large |gate| (exp overflow side) stays finite and right."""
    gate = torch.tensor([[-200.0, -60.0, -20.0, 0.0, 20.0, 60.0, 200.0]], device=device)
    up = torch.ones_like(gate)
    compare(swiglu, ref.swiglu, [gate, up], [0, 1], [torch.ones_like(gate)], torch.float32, ["gate", "up"])


# --------------------------------------------------------------------------------------------
# torch.library registration: fake implementations and torch.compile tracing
# --------------------------------------------------------------------------------------------
def _opcheck_cases(device):
    randn = _gen(21, device)
    x, r, w = randn(5, 48), randn(5, 48), randn(48, shift=1.0)
    pos = torch.tensor([0, 1, 2, 0, 1], device=device)
    inv = _inv_freq(48, device=device)
    x3 = randn(5, 2, 48)
    rstd = torch.rand(5, device=device) + 0.5
    ops = torch.ops.themis
    return [
        (ops.rms_norm_fwd.default, (x, w, 1e-6)),
        (ops.add_rms_norm_fwd.default, (x, r, w, 1e-6)),
        (ops.rms_norm_bwd.default, (r, x, x, w, rstd, True)),
        (ops.rms_norm_bwd.default, (r, None, x, w, rstd, False)),
        (ops.rope_fwd.default, (x3, pos, inv, 1.0)),
        (ops.rope_bwd.default, (x3, pos, inv, 0.5)),
        (ops.qk_norm_rope_fwd.default, (x3, w, 1e-6, pos, inv, 1.0)),
        (ops.qk_norm_rope_bwd.default, (x3, x3, w, torch.rand(5, 2, device=device) + 0.5, pos, inv, 1.0, True)),
        (ops.swiglu_fwd.default, (x, r)),
        (ops.swiglu_bwd.default, (w.expand(5, 48), x, r)),
    ]


def test_custom_ops_opcheck(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_traces_block(device):
    """A miniature Qwen3 block path through all four ops compiles with fullgraph=True (the custom
    ops' fake implementations let Dynamo/AOTAutograd trace) and matches eager, gradients too."""
    T, H, D, I = 9, 2, 64, 96
    randn = _gen(31, device)
    pos = torch.tensor(PACKED, device=device)
    inv = _inv_freq(D, device=device)
    params = [randn(T, H * D), randn(T, H * D), randn(H * D, shift=1.0), randn(D, shift=1.0),
              randn(H * D, 2 * I, scale=0.1), randn(I, H * D, scale=0.1)]

    def block(x, res, w_norm, w_qk, w_gu, w_down):
        h_norm, h = rms_norm(x, w_norm, 1e-6, res)
        q = qk_norm_rope(h_norm.view(T, H, D), w_qk, 1e-6, pos, inv)
        k = rope(h_norm.view(T, H, D), pos, inv)
        gu = (q + k).reshape(T, H * D) @ w_gu
        out = swiglu(gu[:, :I], gu[:, I:]) @ w_down
        return (out * h).sum()

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    a = [p.clone().requires_grad_() for p in params]
    b = [p.clone().requires_grad_() for p in params]
    la = block(*a)
    lb = compiled(*b)
    torch.testing.assert_close(lb, la)
    for ga, gb in zip(torch.autograd.grad(la, a), torch.autograd.grad(lb, b)):
        torch.testing.assert_close(gb, ga)


def test_dispatcher_path_matches_direct_path(device, monkeypatch):
    """In plain eager mode the autograd Functions call the launchers directly (skipping the
    dispatcher's host cost); through the registered ops the results are bit-identical."""
    from themis_engine.kernels import _utils

    randn = _gen(51, device)
    T, H, D = 9, 2, 64
    pos = torch.tensor(PACKED, device=device)
    inv = _inv_freq(D, device=device)
    x, r, w, wq = randn(T, H * D), randn(T, H * D), randn(H * D, shift=1.0), randn(D, shift=1.0)

    def run():
        a = [t.clone().requires_grad_() for t in (x, r, w, wq)]
        y, h = rms_norm(a[0], a[2], 1e-6, a[1])
        z = qk_norm_rope(y.view(T, H, D), a[3], 1e-6, pos, inv) + rope(h.view(T, H, D), pos, inv)
        out = swiglu(z[..., : D // 2], z[..., D // 2 :]) * rms_norm(a[0], a[2], 1e-6).view(T, H, D)[..., : D // 2]
        return [out.detach()] + list(torch.autograd.grad(out.square().sum(), a))

    direct = run()
    monkeypatch.setattr(_utils, "ALWAYS_DISPATCH", True)
    via_ops = run()
    for a, b in zip(direct, via_ops):
        assert torch.equal(a, b)


def test_dispatch_routes_to_these_kernels(themis_kernels):
    """THEMIS_KERNELS=triton sends the block ops of themis_engine.kernels to these modules."""
    from themis_engine import kernels

    themis_kernels("triton")
    x = torch.zeros(2, 2, 4)
    assert kernels.implementation("rms_norm", x) is rms_norm
    assert kernels.implementation("add_rms_norm", x) is rms_norm
    assert kernels.implementation("rope", x) is rope
    assert kernels.implementation("swiglu", x) is swiglu


# --------------------------------------------------------------------------------------------
# bfloat16 at realistic sizes (GPU only: the interpreter's bf16 math is unreliable)
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_rms_norm_bf16_large(device):
    T, D = 8192, 4096
    randn = _gen(41, device)
    dt = torch.bfloat16
    x, r = randn(T, D, dtype=dt), randn(T, D, dtype=dt, scale=4.0)
    w = randn(D, dtype=dt, scale=0.2, shift=1.0)
    grads = [randn(T, D, dtype=dt), randn(T, D, dtype=dt)]
    compare(
        lambda x, w, r: rms_norm(x, w, 1e-6, r),
        lambda x, w, r: ref.rms_norm(x, w, 1e-6, r),
        [x, w, r], [0, 1, 2], grads, dt, ["x", "weight", "residual"],
    )
    compare(
        lambda x, w: rms_norm(x, w, 1e-6),
        lambda x, w: ref.rms_norm(x, w, 1e-6),
        [x, w], [0, 1], grads[:1], dt, ["x", "weight"],
    )


@pytest.mark.gpu
def test_rope_bf16_large(device):
    T, H, D = 8192, 32, 128
    randn = _gen(42, device)
    dt = torch.bfloat16
    pos = _packed_positions(T, seed=1, device=device)
    inv = _inv_freq(D, base=1e6, device=device)
    x = randn(T, H, D, dtype=dt)
    compare(
        lambda x: rope(x, pos, inv),
        lambda x: ref.rope(x, pos, inv),
        [x], [0], [randn(T, H, D, dtype=dt)], dt, ["x"],
    )
    w = randn(D, dtype=dt, scale=0.2, shift=1.0)
    compare(
        lambda x, w: qk_norm_rope(x, w, 1e-6, pos, inv),
        lambda x, w: ref.rope(ref.rms_norm(x, w, 1e-6), pos, inv),
        [x, w], [0, 1], [randn(T, H, D, dtype=dt)], dt, ["x", "norm_weight"],
    )


@pytest.mark.gpu
def test_swiglu_bf16_large(device):
    T, N = 8192, 12288
    randn = _gen(43, device)
    dt = torch.bfloat16
    gate, up = randn(T, N, dtype=dt, scale=3.0), randn(T, N, dtype=dt)
    compare(swiglu, ref.swiglu, [gate, up], [0, 1], [randn(T, N, dtype=dt)], dt, ["gate", "up"])
