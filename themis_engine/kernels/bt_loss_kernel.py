"""Fused multi-head Bradley-Terry loss (Triton).

Semantics: exactly `reference.bt_loss` (see its docstring). Design:

* Forward, ONE kernel, one pass over hidden_chosen / hidden_rejected. Program p owns BLOCK_N pairs:
  it accumulates r_c = h_c @ W.T and r_r = h_r @ W.T in float32 over D in BLOCK_D tiles (H is tiny,
  so the product is a broadcast-multiply-reduce, not a tl.dot: no tensor-core / TF32 rounding and no
  bf16 tl.dot in the interpreter), then, per (pair, criterion) cell, the stable softplus(-d), the
  magnitude term, the cell gradients dloss/dr_c, dloss/dr_r (before the 1/normaliser and the
  upstream grad) and per-program partial sums (bt, magnitude, and per criterion count / correct /
  margin sum). The partials ([programs, 2 + 3*BLOCK_H] floats) are summed by torch: no atomics,
  deterministic, and no second pass over [N, D].
* Backward, ONE kernel over (D tiles, N splits): reads h_c, h_r once, writes dh = (s*g) @ W for both
  (H rank-1 updates from per-head loads) and a per-split partial of dW = (s*g_c)^T h_c + (s*g_r)^T h_r
  (s = grad_loss / normaliser, read from a device scalar: no host sync). The few split partials of
  dW [splits, H, D] are summed by torch.
* Registered as custom ops (themis::bt_loss_fwd / themis::bt_loss_bwd, kernels._utils.custom_op) with
  fake implementations, glued by a torch.autograd.Function; `bt_loss` is the public plain function.

margin is treated as data: no gradient flows to it. Accumulation is float32 whatever the input dtype
(float64 inputs are computed in float32 too).
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from themis_engine.kernels._utils import custom_op, empty_unless, rowmajor
from themis_engine.kernels.reference import MAGNITUDE_FORMS, BTOutput

Tensor = torch.Tensor

# the broadcast product BLOCK_N x BLOCK_H x BLOCK_D is kept at most this many elements
_TILE_ELEMS = 8192
_BLOCK_N = 16
# backward: aim for about this many programs (D tiles x N splits)
_BWD_TARGET_PROGRAMS = 256


@triton.jit
def _log1p_small(x):
    """log(1 + x) for x in [0, 1], accurate for tiny x (Goldberg's trick; no libdevice needed)."""
    u = 1.0 + x
    den = tl.where(u == 1.0, 1.0, u - 1.0)
    return tl.where(u == 1.0, x, tl.log(u) * (x / den))


@triton.jit
def _bt_fwd_kernel(
    hc_ptr, hr_ptr, w_ptr, mask_ptr, margin_ptr,
    rc_ptr, rr_ptr, gc_ptr, gr_ptr, part_ptr,
    N, H, D,
    stride_hc, stride_hr, stride_w, stride_mask, stride_margin, stride_out, stride_part,
    mu,
    HAS_MARGIN: tl.constexpr, ABS_FORM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    heads = tl.arange(0, BLOCK_H)
    row_ok = rows < N
    head_ok = heads < H
    rows64 = rows.to(tl.int64)

    acc_c = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        hmask = row_ok[:, None] & col_ok[None, :]
        hc = tl.load(hc_ptr + rows64[:, None] * stride_hc + cols[None, :], mask=hmask, other=0.0).to(tl.float32)
        hr = tl.load(hr_ptr + rows64[:, None] * stride_hr + cols[None, :], mask=hmask, other=0.0).to(tl.float32)
        # r[:, j] += hc @ w_j, one head at a time: 2-D tiles only (a 3-D broadcast-multiply-reduce is
        # right in the interpreter but its kind compiled wrongly on an H200, see the backward)
        for j in range(0, H):
            w_j = tl.load(w_ptr + j * stride_w + cols, mask=col_ok, other=0.0).to(tl.float32)
            rc_j = tl.sum(hc * w_j[None, :], axis=1)
            rr_j = tl.sum(hr * w_j[None, :], axis=1)
            acc_c = tl.where(heads[None, :] == j, acc_c + rc_j[:, None], acc_c)
            acc_r = tl.where(heads[None, :] == j, acc_r + rr_j[:, None], acc_r)

    cell_ok = row_ok[:, None] & head_ok[None, :]
    m = tl.load(mask_ptr + rows64[:, None] * stride_mask + heads[None, :], mask=cell_ok, other=0.0).to(tl.float32)
    diff = acc_c - acc_r
    if HAS_MARGIN:
        marg = tl.load(margin_ptr + rows64[:, None] * stride_margin + heads[None, :], mask=cell_ok, other=0.0)
        d = diff - marg.to(tl.float32)
    else:
        d = diff
    # softplus(-d) = max(-d, 0) + log1p(exp(-|d|)); sigmoid(-d) from the same exp: stable at any |d|
    e = tl.exp(-tl.abs(d))
    sp = tl.maximum(-d, 0.0) + _log1p_small(e)
    sig_neg = tl.where(d >= 0, e / (1.0 + e), 1.0 / (1.0 + e))
    if ABS_FORM:
        s = tl.abs(acc_c) + tl.abs(acc_r)
        sign_c = tl.where(acc_c > 0, 1.0, tl.where(acc_c < 0, -1.0, 0.0))
        sign_r = tl.where(acc_r > 0, 1.0, tl.where(acc_r < 0, -1.0, 0.0))
        dmag_c = 2.0 * s * sign_c
        dmag_r = 2.0 * s * sign_r
    else:
        s = acc_c + acc_r
        dmag_c = 2.0 * s
        dmag_r = 2.0 * s
    mag = s * s
    g_c = m * (mu * dmag_c - sig_neg)
    g_r = m * (mu * dmag_r + sig_neg)

    out_off = rows64[:, None] * stride_out + heads[None, :]
    tl.store(rc_ptr + out_off, acc_c, mask=cell_ok)
    tl.store(rr_ptr + out_off, acc_r, mask=cell_ok)
    tl.store(gc_ptr + out_off, g_c, mask=cell_ok)
    tl.store(gr_ptr + out_off, g_r, mask=cell_ok)

    # partial sums of this program (m is 0 on padding cells, so they add nothing)
    part = part_ptr + pid.to(tl.int64) * stride_part
    tl.store(part + 0, tl.sum(tl.sum(m * sp, axis=1), axis=0))
    tl.store(part + 1, tl.sum(tl.sum(m * mag, axis=1), axis=0))
    correct = tl.where(diff > 0, m, 0.0)
    tl.store(part + 2 + heads, tl.sum(m, axis=0))
    tl.store(part + 2 + BLOCK_H + heads, tl.sum(correct, axis=0))
    tl.store(part + 2 + 2 * BLOCK_H + heads, tl.sum(m * diff, axis=0))


@triton.jit
def _bt_bwd_kernel(
    hc_ptr, hr_ptr, w_ptr, gc_ptr, gr_ptr, scale_ptr,
    dhc_ptr, dhr_ptr, dw_part_ptr,
    N, H, D, ROWS_PER_SPLIT,
    stride_hc, stride_hr, stride_w, stride_g, stride_dhc, stride_dhr, stride_dwp_split, stride_dwp_h,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    heads = tl.arange(0, BLOCK_H)
    head_ok = heads < H
    scale = tl.load(scale_ptr).to(tl.float32)

    dw_acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    start = pid_s * ROWS_PER_SPLIT
    end = tl.minimum(start + ROWS_PER_SPLIT, N)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < end
        rows64 = rows.to(tl.int64)
        hmask = row_ok[:, None] & col_ok[None, :]
        if COMPUTE_DH:
            # dh = g @ W as H rank-1 updates from per-head loads. (A broadcast-multiply-reduce over the
            # middle axis, tl.sum(g[:, :, None] * w[None, :, :], axis=1), is right in the interpreter
            # but gave wrong dh on an H200 with triton 3.6, so it is not used.)
            dhc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            dhr = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            for j in range(0, H):
                w_j = tl.load(w_ptr + j * stride_w + cols, mask=col_ok, other=0.0).to(tl.float32)
                gc_j = tl.load(gc_ptr + rows64 * stride_g + j, mask=row_ok, other=0.0) * scale
                gr_j = tl.load(gr_ptr + rows64 * stride_g + j, mask=row_ok, other=0.0) * scale
                dhc += gc_j[:, None] * w_j[None, :]
                dhr += gr_j[:, None] * w_j[None, :]
            tl.store(
                dhc_ptr + rows64[:, None] * stride_dhc + cols[None, :], dhc.to(dhc_ptr.dtype.element_ty), mask=hmask
            )
            tl.store(
                dhr_ptr + rows64[:, None] * stride_dhr + cols[None, :], dhr.to(dhr_ptr.dtype.element_ty), mask=hmask
            )
        if COMPUTE_DW:
            # dW[j] += g[:, j] @ h, one head at a time (2-D tiles only, as for dh)
            hc = tl.load(hc_ptr + rows64[:, None] * stride_hc + cols[None, :], mask=hmask, other=0.0).to(tl.float32)
            hr = tl.load(hr_ptr + rows64[:, None] * stride_hr + cols[None, :], mask=hmask, other=0.0).to(tl.float32)
            for j in range(0, H):
                gc_j = tl.load(gc_ptr + rows64 * stride_g + j, mask=row_ok, other=0.0) * scale
                gr_j = tl.load(gr_ptr + rows64 * stride_g + j, mask=row_ok, other=0.0) * scale
                dw_j = tl.sum(gc_j[:, None] * hc + gr_j[:, None] * hr, axis=0)
                dw_acc = tl.where(heads[:, None] == j, dw_acc + dw_j[None, :], dw_acc)
    if COMPUTE_DW:
        tl.store(
            dw_part_ptr + pid_s.to(tl.int64) * stride_dwp_split + heads[:, None] * stride_dwp_h + cols[None, :],
            dw_acc,
            mask=head_ok[:, None] & col_ok[None, :],
        )


def _blocks(H: int, D: int) -> Tuple[int, int, int]:
    block_h = max(2, triton.next_power_of_2(H))
    block_d = max(16, min(256, triton.next_power_of_2(D), _TILE_ELEMS // (_BLOCK_N * block_h)))
    return _BLOCK_N, block_h, block_d


# --------------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------------
@custom_op("bt_loss_fwd")
def _bt_loss_fwd(
    hidden_chosen: Tensor,
    hidden_rejected: Tensor,
    weight: Tensor,
    mask: Tensor,
    margin: Optional[Tensor],
    mu: float,
    abs_form: bool,
    normalizer: Optional[float],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, bt, mag, r_c, r_r, accuracy, mean_margin, count, norm, g_c, g_r); g_* = d(sum)/dr, unnormalised."""
    N, D = hidden_chosen.shape
    H = weight.shape[0]
    dev = hidden_chosen.device
    f32 = torch.float32
    hc, hr, w = rowmajor(hidden_chosen), rowmajor(hidden_rejected), rowmajor(weight)
    m = mask.to(f32).contiguous()
    marg = margin.contiguous() if margin is not None else None
    block_n, block_h, block_d = _blocks(H, D)
    programs = triton.cdiv(N, block_n)
    ncols = 2 + 3 * block_h
    rc = torch.empty((N, H), dtype=f32, device=dev)
    rr = torch.empty((N, H), dtype=f32, device=dev)
    gc = torch.empty((N, H), dtype=f32, device=dev)
    gr = torch.empty((N, H), dtype=f32, device=dev)
    part = torch.zeros((programs, ncols), dtype=f32, device=dev)
    if programs > 0:
        _bt_fwd_kernel[(programs,)](
            hc, hr, w, m, marg if marg is not None else m,
            rc, rr, gc, gr, part,
            N, H, D,
            hc.stride(0), hr.stride(0), w.stride(0), m.stride(0), marg.stride(0) if marg is not None else 0,
            rc.stride(0), part.stride(0),
            float(mu),
            HAS_MARGIN=marg is not None, ABS_FORM=bool(abs_form),
            BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_D=block_d,
            num_warps=4,
        )
    sums = part.sum(0)
    bt_sum, mag_sum = sums[0], sums[1]
    count = sums[2 : 2 + H].clone()
    correct = sums[2 + block_h : 2 + block_h + H]
    margin_sum = sums[2 + 2 * block_h : 2 + 2 * block_h + H]
    if normalizer is None:
        norm = count.sum().clamp(min=1.0)
    else:
        norm = torch.full((), max(float(normalizer), 1.0), dtype=f32, device=dev)
    bt = bt_sum / norm
    mag = mag_sum / norm
    loss = bt + float(mu) * mag
    accuracy = correct / count
    mean_margin = margin_sum / count
    return loss, bt, mag, rc, rr, accuracy, mean_margin, count, norm, gc, gr


@_bt_loss_fwd.register_fake
def _bt_loss_fwd_fake(hidden_chosen, hidden_rejected, weight, mask, margin, mu, abs_form, normalizer):
    N = hidden_chosen.shape[0]
    H = weight.shape[0]

    def f(*shape):
        return hidden_chosen.new_empty(shape, dtype=torch.float32)

    return f(), f(), f(), f(N, H), f(N, H), f(H), f(H), f(H), f(), f(N, H), f(N, H)


@custom_op("bt_loss_bwd")
def _bt_loss_bwd(
    hidden_chosen: Tensor,
    hidden_rejected: Tensor,
    weight: Tensor,
    grad_rc: Tensor,
    grad_rr: Tensor,
    scale: Tensor,
    need_dh: bool,
    need_dw: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(d hidden_chosen, d hidden_rejected, d weight) for cell grads scale * grad_r*; empty where not needed."""
    N, D = hidden_chosen.shape
    H = weight.shape[0]
    hc, hr, w = rowmajor(hidden_chosen), rowmajor(hidden_rejected), rowmajor(weight)
    gc, gr = grad_rc.contiguous(), grad_rr.contiguous()
    scale = scale.to(torch.float32).reshape(1).contiguous()
    block_n, block_h, block_d = _blocks(H, D)
    d_tiles = triton.cdiv(D, block_d)
    n_blocks = triton.cdiv(N, block_n)
    splits = max(1, min(n_blocks, _BWD_TARGET_PROGRAMS // max(1, d_tiles)))
    rows_per_split = triton.cdiv(n_blocks, splits) * block_n if N > 0 else block_n
    splits = max(1, triton.cdiv(N, rows_per_split))
    dhc = torch.empty_like(hc, memory_format=torch.contiguous_format) if need_dh else hc.new_empty((0,))
    dhr = torch.empty_like(hr, memory_format=torch.contiguous_format) if need_dh else hr.new_empty((0,))
    dw_part = (
        torch.zeros((splits, H, D), dtype=torch.float32, device=w.device) if need_dw
        else w.new_empty((0,), dtype=torch.float32)
    )
    if (need_dh or need_dw) and N > 0:
        _bt_bwd_kernel[(d_tiles, splits)](
            hc, hr, w, gc, gr, scale,
            dhc if need_dh else hc, dhr if need_dh else hr, dw_part,
            N, H, D, rows_per_split,
            hc.stride(0), hr.stride(0), w.stride(0), gc.stride(0),
            dhc.stride(0) if need_dh else 0, dhr.stride(0) if need_dh else 0,
            dw_part.stride(0) if need_dw else 0, dw_part.stride(1) if need_dw else 0,
            COMPUTE_DH=need_dh, COMPUTE_DW=need_dw,
            BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_D=block_d,
            num_warps=4,
        )
    if need_dw:
        dw = (dw_part[0] if splits == 1 else dw_part.sum(0)).to(weight.dtype)
        if splits == 1 and dw.dtype == torch.float32:
            dw = dw.clone()  # an output may not be a view of another tensor we hand out
    else:
        dw = w.new_empty((0,))
    return dhc, dhr, dw


@_bt_loss_bwd.register_fake
def _bt_loss_bwd_fake(hidden_chosen, hidden_rejected, weight, grad_rc, grad_rr, scale, need_dh, need_dw):
    return empty_unless(need_dh, hidden_chosen), empty_unless(need_dh, hidden_rejected), empty_unless(need_dw, weight)


class _BTLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_chosen, hidden_rejected, weight, mask, margin, mu, abs_form, normalizer):
        (loss, bt, mag, rc, rr, acc, mean_margin, count, norm, gc, gr) = _bt_loss_fwd(
            hidden_chosen, hidden_rejected, weight, mask, margin, mu, abs_form, normalizer
        )
        ctx.save_for_backward(hidden_chosen, hidden_rejected, weight, gc, gr, norm)
        ctx.mark_non_differentiable(bt, mag, rc, rr, acc, mean_margin, count)
        return loss, bt, mag, rc, rr, acc, mean_margin, count

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        hc, hr, w, gc, gr, norm = ctx.saved_tensors
        need_hc, need_hr, need_w = ctx.needs_input_grad[:3]
        need_dh = bool(need_hc or need_hr)
        scale = grad_loss.to(torch.float32) / norm
        dhc, dhr, dw = _bt_loss_bwd(hc, hr, w, gc, gr, scale, need_dh, bool(need_w))
        return (
            dhc if need_hc else None,
            dhr if need_hr else None,
            dw if need_w else None,
            None, None, None, None, None,
        )


def bt_loss(
    hidden_chosen: Tensor,
    hidden_rejected: Tensor,
    weight: Tensor,
    mask: Tensor,
    margin: Optional[Tensor] = None,
    mu: float = 0.0,
    magnitude: str = "centering",
    normalizer: Optional[float] = None,
) -> BTOutput:
    """Multi-head Bradley-Terry loss, fused; same signature and results as reference.bt_loss."""
    if magnitude not in MAGNITUDE_FORMS:
        raise ValueError(f"bt_loss: magnitude must be one of {MAGNITUDE_FORMS}, got {magnitude!r}")
    if hidden_chosen.dim() != 2 or hidden_chosen.shape != hidden_rejected.shape:
        raise ValueError("bt_loss: hidden_chosen and hidden_rejected must both be [N, D]")
    N, D = hidden_chosen.shape
    if weight.dim() != 2 or weight.shape[1] != D:
        raise ValueError(f"bt_loss: weight must be [H, {D}], got {tuple(weight.shape)}")
    H = weight.shape[0]
    if tuple(mask.shape) != (N, H):
        raise ValueError(f"bt_loss: mask must be [{N}, {H}], got {tuple(mask.shape)}")
    if margin is not None and tuple(margin.shape) != (N, H):
        raise ValueError(f"bt_loss: margin must be [{N}, {H}], got {tuple(margin.shape)}")
    outs = _BTLossFunction.apply(
        hidden_chosen,
        hidden_rejected,
        weight,
        mask,
        margin,
        float(mu),
        magnitude == "abs",
        None if normalizer is None else float(normalizer),
    )
    return BTOutput(*outs)


__all__ = ["bt_loss"]
