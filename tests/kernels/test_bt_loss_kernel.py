"""The fused Bradley-Terry loss kernel against reference.bt_loss run in float64 (max-norm relative
errors with tests/numerics.py's NaN policy: accuracy / mean_margin are NaN for a criterion with no
labelled pair, in the kernel exactly where in the reference).

Under no GPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), in
float32 / float16; bf16 at realistic sizes is GPU-only.
"""

import math

import pytest
import torch
from numerics import assert_close

from themis_engine.kernels import reference
from themis_engine.kernels.bt_loss_kernel import bt_loss

FIELDS = (
    "loss",
    "bt_loss",
    "magnitude_loss",
    "reward_chosen",
    "reward_rejected",
    "accuracy",
    "mean_margin",
    "count",
)


def _make(N, H, D, device, dtype=torch.float32, seed=0, p_label=0.7, unlabelled_row=True, dead_criterion=True):
    g = torch.Generator().manual_seed(seed)
    hc = torch.randn(N, D, generator=g)
    hr = torch.randn(N, D, generator=g)
    w = torch.randn(H, D, generator=g) / math.sqrt(D)
    mask = torch.rand(N, H, generator=g) < p_label
    if unlabelled_row and N > 1:
        mask[N // 2] = False  # a pair labelled for nothing
    if dead_criterion and H > 1:
        mask[:, H - 1] = False  # a criterion with no labelled pair
    margin = torch.rand(N, H, generator=g) * 0.5
    return (
        hc.to(device=device, dtype=dtype),
        hr.to(device=device, dtype=dtype),
        w.to(device=device, dtype=dtype),
        mask.to(device),
        margin.to(device=device, dtype=dtype),
    )


def _run(fn, hc, hr, w, mask, margin, mu, magnitude, normalizer, upcast=False):
    """Outputs and (hc, hr, w) grads of fn; upcast=True runs on float64 copies."""
    leaves = [x.detach().clone() for x in (hc, hr, w)]
    if upcast:
        leaves = [x.double() for x in leaves]
        margin = margin.double() if margin is not None else None
    for x in leaves:
        x.requires_grad_(True)
    out = fn(*leaves, mask, margin, mu, magnitude, normalizer)
    out.loss.backward()
    return out, [x.grad for x in leaves]


def _check_all(out, grads, ref, ref_grads, rtol):
    for f in FIELDS:
        assert_close(getattr(out, f), getattr(ref, f), rtol, f)
    for name, a, e in zip(("d hidden_chosen", "d hidden_rejected", "d weight"), grads, ref_grads):
        assert_close(a, e, rtol, name)


@pytest.mark.parametrize("N", [1, 7, 33])
@pytest.mark.parametrize("H", [1, 5])
@pytest.mark.parametrize("D", [48, 100])
@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("mu", [0.0, 0.3])
@pytest.mark.parametrize("magnitude", ["centering", "abs"])
def test_matches_reference_fp32(device, N, H, D, with_margin, mu, magnitude):
    hc, hr, w, mask, margin = _make(N, H, D, device, seed=N * 100 + H * 10 + D)
    if not mask.any():
        mask[0, 0] = True
    margin = margin if with_margin else None
    out, grads = _run(bt_loss, hc, hr, w, mask, margin, mu, magnitude, None)
    ref, ref_grads = _run(reference.bt_loss, hc, hr, w, mask, margin, mu, magnitude, None, upcast=True)
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert out.reward_chosen.dtype == torch.float32
    assert grads[0].dtype == hc.dtype and grads[2].dtype == w.dtype
    _check_all(out, grads, ref, ref_grads, 1e-5)


@pytest.mark.parametrize("magnitude", ["centering", "abs"])
def test_fp16_inputs(device, magnitude):
    hc, hr, w, mask, margin = _make(33, 5, 100, device, dtype=torch.float16, seed=3)
    out, grads = _run(bt_loss, hc, hr, w, mask, margin, 0.2, magnitude, None)
    ref, ref_grads = _run(reference.bt_loss, hc, hr, w, mask, margin, 0.2, magnitude, None, upcast=True)
    # forward accumulates in float32 from the same fp16 values: as tight as float32
    for f in FIELDS:
        assert_close(getattr(out, f), getattr(ref, f), 1e-5, f)
    # gradients are stored in float16
    for a, e in zip(grads, ref_grads):
        assert a.dtype == torch.float16
        assert_close(a, e, 2e-3)


def test_all_unlabelled(device):
    hc, hr, w, mask, margin = _make(7, 5, 48, device)
    mask = torch.zeros_like(mask)
    for mu in (0.0, 0.5):
        out, grads = _run(bt_loss, hc, hr, w, mask, margin, mu, "centering", None)
        ref, ref_grads = _run(reference.bt_loss, hc, hr, w, mask, margin, mu, "centering", None, upcast=True)
        assert out.loss.item() == 0.0 and out.bt_loss.item() == 0.0 and out.magnitude_loss.item() == 0.0
        assert torch.isnan(out.accuracy).all() and torch.isnan(out.mean_margin).all()
        assert (out.count == 0).all()
        for gr in grads:
            assert torch.isfinite(gr).all() and (gr == 0).all()
        _check_all(out, grads, ref, ref_grads, 1e-5)


@pytest.mark.parametrize("magnitude", ["centering", "abs"])
def test_micro_batches_with_global_normalizer(device, magnitude):
    """Two micro-batches with the global normaliser sum to the whole batch (loss and gradients)."""
    hc, hr, w, mask, margin = _make(33, 5, 100, device, seed=7)
    total = float(mask.sum())
    mu = 0.25
    whole, (dhc, dhr, dw) = _run(bt_loss, hc, hr, w, mask, margin, mu, magnitude, None)
    cut = 13
    parts = [
        _run(bt_loss, hc[a:b], hr[a:b], w, mask[a:b], margin[a:b], mu, magnitude, total)
        for a, b in ((0, cut), (cut, 33))
    ]
    (o1, g1), (o2, g2) = parts
    assert_close(o1.loss + o2.loss, whole.loss, 1e-6, "loss")
    assert_close(o1.bt_loss + o2.bt_loss, whole.bt_loss, 1e-6, "bt")
    assert_close(o1.magnitude_loss + o2.magnitude_loss, whole.magnitude_loss, 1e-6, "magnitude")
    assert_close(torch.cat([g1[0], g2[0]]), dhc, 1e-6, "d hidden_chosen")
    assert_close(torch.cat([g1[1], g2[1]]), dhr, 1e-6, "d hidden_rejected")
    assert_close(g1[2] + g2[2], dw, 1e-6, "d weight")
    # and the normaliser passed in matches the reference too
    ref, ref_grads = _run(reference.bt_loss, hc[:cut], hr[:cut], w, mask[:cut], margin[:cut], mu, magnitude, total,
                          True)
    _check_all(o1, g1, ref, ref_grads, 1e-5)


def test_normalizer_below_one_is_clamped(device):
    hc, hr, w, mask, margin = _make(7, 5, 48, device, seed=11)
    out, grads = _run(bt_loss, hc, hr, w, mask, margin, 0.1, "abs", 0.0)
    ref, ref_grads = _run(reference.bt_loss, hc, hr, w, mask, margin, 0.1, "abs", 0.0, upcast=True)
    _check_all(out, grads, ref, ref_grads, 1e-5)


@pytest.mark.parametrize("magnitude", ["centering", "abs"])
@pytest.mark.parametrize("mu", [0.0, 1e-3])
def test_stable_at_large_delta(device, magnitude, mu):
    """|r_c - r_r - margin| = 1e4 both ways: from the margin, and from the rewards themselves."""
    N, H, D = 7, 5, 48
    hc, hr, w, mask, margin = _make(N, H, D, device, seed=5, dead_criterion=False)
    sign = torch.where(torch.arange(N * H, device=device).reshape(N, H) % 2 == 0, 1.0, -1.0)
    # (a) huge margin of both signs
    big_margin = sign * 1e4
    out, grads = _run(bt_loss, hc, hr, w, mask, big_margin, mu, magnitude, None)
    ref, ref_grads = _run(reference.bt_loss, hc, hr, w, mask, big_margin, mu, magnitude, None, upcast=True)
    assert torch.isfinite(out.loss) and all(torch.isfinite(gr).all() for gr in grads)
    _check_all(out, grads, ref, ref_grads, 1e-5)
    # (b) huge rewards: h_c = h_r + 1e4 * s * u with u the unit direction of the (single) head
    w1 = w[:1]
    u = w1[0] / w1[0].pow(2).sum()
    s = sign[:, :1]
    hc1 = hr + 1e4 * s * u
    out, grads = _run(bt_loss, hc1, hr, w1, mask[:, :1], None, mu, magnitude, None)
    ref, ref_grads = _run(reference.bt_loss, hc1, hr, w1, mask[:, :1], None, mu, magnitude, None, upcast=True)
    assert torch.isfinite(out.loss) and all(torch.isfinite(gr).all() for gr in grads)
    assert out.mean_margin.abs().item() > 1e3
    # the huge rewards are only representable to float32 rounding (~1e4 * 6e-8 per term)
    _check_all(out, grads, ref, ref_grads, 1e-4)


def test_non_contiguous_and_frozen_head(device):
    hc, hr, w, mask, margin = _make(33, 5, 100, device, seed=2)
    hc_t = hc.t().contiguous().t()  # column-major view: same values, other strides
    leaves = [hc_t.detach().clone().requires_grad_(), hr.detach().clone().requires_grad_()]
    out = bt_loss(leaves[0], leaves[1], w, mask, margin, 0.1, "centering")
    out.loss.backward()
    ref, ref_grads = _run(reference.bt_loss, hc, hr, w, mask, margin, 0.1, "centering", None, upcast=True)
    assert_close(out.loss, ref.loss, 1e-5, "loss")
    assert_close(leaves[0].grad, ref_grads[0], 1e-5, "d hidden_chosen")
    assert_close(leaves[1].grad, ref_grads[1], 1e-5, "d hidden_rejected")


def test_loss_upstream_grad_and_no_grad(device):
    hc, hr, w, mask, margin = _make(7, 5, 48, device, seed=4)
    a = [x.detach().clone().requires_grad_() for x in (hc, hr, w)]
    (3.0 * bt_loss(*a, mask, margin, 0.2, "abs").loss).backward()
    ref, ref_grads = _run(reference.bt_loss, hc, hr, w, mask, margin, 0.2, "abs", None, upcast=True)
    for x, e in zip(a, ref_grads):
        assert_close(x.grad, 3.0 * e, 1e-5)
    with torch.no_grad():
        out = bt_loss(hc, hr, w, mask, margin, 0.2, "abs")
    assert_close(out.loss, ref.loss, 1e-5)
    assert not out.loss.requires_grad


def test_bad_magnitude():
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError):
        bt_loss(x, x, torch.zeros(1, 4), torch.ones(2, 1, dtype=torch.bool), magnitude="square")


def test_custom_op_checks(device):
    # every criterion labelled: opcheck compares outputs with NaN != NaN
    hc, hr, w, mask, margin = _make(7, 5, 48, device, seed=9, dead_criterion=False, p_label=1.0)
    torch.library.opcheck(torch.ops.themis.bt_loss_fwd.default, (hc, hr, w, mask, margin, 0.1, True, None))
    gc = torch.randn(7, 5, device=device)
    scale = torch.tensor(0.5, device=device)
    torch.library.opcheck(torch.ops.themis.bt_loss_bwd.default, (hc, hr, w, gc, gc, scale, True, True))


def test_torch_compile_traces(device):
    hc, hr, w, mask, margin = _make(7, 5, 48, device, seed=6)

    def step(hc, hr, w):
        out = bt_loss(hc, hr, w, mask, margin, 0.1, "abs")
        return out.loss, out.accuracy

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    a = [x.detach().clone().requires_grad_() for x in (hc, hr, w)]
    loss, acc = compiled(*a)
    loss.backward()
    ref, ref_grads = _run(reference.bt_loss, hc, hr, w, mask, margin, 0.1, "abs", None, upcast=True)
    assert_close(loss, ref.loss, 1e-5, "loss")
    assert_close(acc, ref.accuracy, 1e-5, "accuracy")
    for x, e in zip(a, ref_grads):
        assert_close(x.grad, e, 1e-5)


# --------------------------------------------------------------------------------------------
# GPU only: realistic sizes, bf16 and float32
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N,H,D", [(4096, 5, 4096), (2048, 8, 5120), (3000, 1, 1024)])
@pytest.mark.parametrize("magnitude", ["centering", "abs"])
def test_gpu_realistic(N, H, D, dtype, magnitude):
    device = torch.device("cuda")
    hc, hr, w, mask, margin = _make(N, H, D, device, dtype=dtype, seed=N + D)
    out, grads = _run(bt_loss, hc, hr, w, mask, margin, 0.05, magnitude, None)
    ref, ref_grads = _run(reference.bt_loss, hc, hr, w, mask, margin, 0.05, magnitude, None, upcast=True)
    # the forward reads the very same values and accumulates in float32
    for f in FIELDS:
        if f == "accuracy":
            # a pair with |r_c - r_r| ~ 1e-6 may flip sign between float32 and float64 sums
            err = (out.accuracy.double().cpu() - ref.accuracy.double().cpu()).nan_to_num().abs().max().item()
            assert err <= 2.0 / max(1.0, ref.count[ref.count > 0].min().item())
            continue
        assert_close(getattr(out, f), getattr(ref, f), 2e-5, f)
    # gradients come back in the input dtype: bf16 rounding is 2^-9 relative
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    for name, a, e in zip(("dhc", "dhr", "dw"), grads, ref_grads):
        assert a.dtype == dtype
        assert_close(a, e, tol, name)
