"""Rotary embedding at packed positions, and Qwen3's per-head q/k RMSNorm fused with it, in Triton.

`rope(x, position_ids, inv_freq, attention_scaling=1.0)` has the signature and numerics of
`reference.rope`: x [T, H, D] in the rotate-half layout; cos/sin of position_ids[t] * inv_freq are
computed in the kernel in float32, scaled, and cast to x.dtype; each product is rounded to x.dtype
and so is their sum (torch's order). The backward is the rotation by the negative angle (float32
math, one rounding). Only x gets a gradient (position_ids are integers, inv_freq is a buffer).

`qk_norm_rope(x, norm_weight, eps, position_ids, inv_freq, attention_scaling=1.0)` is
rope(rms_norm(x, norm_weight, eps), ...) in one pass: the norm is over D within each head
(Qwen3's q_norm / k_norm), with the rounding points of the two references composed; its backward
gives x and norm_weight their gradients (dweight: per-program partial sums, summed on the host).

Tiles are [BLOCK_T tokens, BLOCK_H heads, BLOCK_HALF]: the two halves of each head are loaded as
two tiles, cos/sin are computed once per (token, frequency) and shared by all heads. x may be a
strided view (e.g. q of a fused qkv projection): token and head strides are passed, the last dim
must be contiguous (it is made so otherwise). Outputs are contiguous [T, H, D].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from themis_engine.kernels._utils import (
    custom_op,
    empty_unless,
    num_warps_for,
    rowmajor,
    weight_grad,
    weight_grad_partials,
)

__all__ = ["rope", "qk_norm_rope"]

_TILE_PAIRS = 4096  # (token, head, frequency) pairs per program: 8192 elements


def _config(H: int, half: int) -> dict:
    """The tile of every kernel here, as launch keywords: BLOCK_T, BLOCK_H, BLOCK_HALF, num_warps."""
    block_half = triton.next_power_of_2(half)
    block_h = triton.next_power_of_2(H)
    block_t = max(1, min(64, _TILE_PAIRS // (block_h * block_half)))
    return dict(BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=block_half,
                num_warps=num_warps_for(2 * block_t * block_h * block_half))


def _check(x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    if x.dim() != 3:
        raise ValueError(f"rope: x must be [T, H, D], got {tuple(x.shape)}")
    T, _, D = x.shape
    if D % 2:
        raise ValueError(f"rope: head dim {D} must be even")
    if position_ids.shape != (T,):
        raise ValueError(f"rope: position_ids of shape {tuple(position_ids.shape)} for {T} tokens")
    if inv_freq.shape != (D // 2,):
        raise ValueError(f"rope: inv_freq of shape {tuple(inv_freq.shape)} for head dim {D}")
    return rowmajor(x)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _cos_sin(POS, INV, t, j, t_mask, j_mask, scaling, dtype: tl.constexpr):
    """cos, sin [BLOCK_T, BLOCK_HALF] of position * inv_freq in float32, scaled, rounded to `dtype`
    (rope_cos_sin's order), returned as float32 for the products."""
    pos = tl.load(POS + t, mask=t_mask, other=0).to(tl.float32)
    inv = tl.load(INV + j, mask=j_mask, other=0.0).to(tl.float32)
    f = pos[:, None] * inv[None, :]
    c = (tl.cos(f) * scaling).to(dtype).to(tl.float32)
    s = (tl.sin(f) * scaling).to(dtype).to(tl.float32)
    return c, s


@triton.jit
def _tokens(POS, INV, tile, T, j, j_mask, h_mask, scaling, dtype: tl.constexpr, BLOCK_T: tl.constexpr):
    """Token tile `tile` (BLOCK_T tokens) of a [tokens, heads, frequencies] tile: its tokens t as
    int64 [BLOCK_T], t < T, the in-bounds mask [BLOCK_T, BLOCK_H, BLOCK_HALF], and cos, sin
    [BLOCK_T, 1, BLOCK_HALF] (as _cos_sin), shared by the heads."""
    t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < T
    c, s = _cos_sin(POS, INV, t, j, t_mask, j_mask, scaling, dtype)
    mask = t_mask[:, None, None] & h_mask[None, :, None] & j_mask[None, None, :]
    return t.to(tl.int64), t_mask, mask, c[:, None, :], s[:, None, :]


@triton.jit
def _offsets(t64, h, j, stride_t, stride_h):
    """Offsets [BLOCK_T, BLOCK_H, BLOCK_HALF] of the first halves of heads h of tokens t64."""
    return t64[:, None, None] * stride_t + h[None, :, None] * stride_h + j[None, None, :]


@triton.jit
def _load_halves(P, off, HALF, mask):
    """The first and second halves (elements off and off + HALF) in float32; zeros where not mask."""
    first = tl.load(P + off, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(P + off + HALF, mask=mask, other=0.0).to(tl.float32)
    return first, second


@triton.jit
def _store_halves(P, off, HALF, mask, first, second):
    """Store the two float32 halves at off and off + HALF, rounded to P's dtype."""
    tl.store(P + off, first.to(P.dtype.element_ty), mask=mask)
    tl.store(P + off + HALF, second.to(P.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    X, Y, POS, INV,
    T, H, HALF,
    stride_xt, stride_xh, stride_yt, stride_yh,
    scaling,
    BACKWARD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Forward: y1 = x1 c - x2 s, y2 = x2 c + x1 s, each product and the sum rounded to the dtype.
    BACKWARD: dx1 = dy1 c + dy2 s, dx2 = dy2 c - dy1 s in float32, rounded once."""
    h = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    dtype = X.dtype.element_ty
    t64, t_mask, mask, c, s = _tokens(POS, INV, tl.program_id(0), T, j, j < HALF, h < H, scaling, dtype, BLOCK_T)
    x1, x2 = _load_halves(X, _offsets(t64, h, j, stride_xt, stride_xh), HALF, mask)
    if BACKWARD:
        y1 = x1 * c + x2 * s
        y2 = x2 * c - x1 * s
    else:
        y1 = (x1 * c).to(dtype).to(tl.float32) - (x2 * s).to(dtype).to(tl.float32)
        y2 = (x2 * c).to(dtype).to(tl.float32) + (x1 * s).to(dtype).to(tl.float32)
    _store_halves(Y, _offsets(t64, h, j, stride_yt, stride_yh), HALF, mask, y1, y2)


@triton.jit
def _qk_norm_rope_fwd_kernel(
    X, W, Y, RSTD, POS, INV,
    T, H, HALF,
    stride_xt, stride_xh, stride_yt, stride_yh,
    eps, scaling,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """y = rope(weight * cast_x(x * rstd)); the normalised value is rounded to x.dtype, the weight
    product to y.dtype, then rope's rounding points in y.dtype."""
    h = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    h_mask = h < H
    j_mask = j < HALF
    x_dtype = X.dtype.element_ty
    y_dtype = Y.dtype.element_ty
    t64, t_mask, mask, c, s = _tokens(POS, INV, tl.program_id(0), T, j, j_mask, h_mask, scaling, y_dtype, BLOCK_T)
    x1, x2 = _load_halves(X, _offsets(t64, h, j, stride_xt, stride_xh), HALF, mask)
    w1, w2 = _load_halves(W, j, HALF, j_mask)
    w1 = w1[None, None, :]
    w2 = w2[None, None, :]

    var = (tl.sum(x1 * x1, axis=2) + tl.sum(x2 * x2, axis=2)) / (2 * HALF)
    rstd = tl.math.rsqrt(var + eps)  # [BLOCK_T, BLOCK_H]
    n1 = (x1 * rstd[:, :, None]).to(x_dtype).to(tl.float32)
    n2 = (x2 * rstd[:, :, None]).to(x_dtype).to(tl.float32)
    y1 = (w1 * n1).to(y_dtype).to(tl.float32)
    y2 = (w2 * n2).to(y_dtype).to(tl.float32)
    o1 = (y1 * c).to(y_dtype).to(tl.float32) - (y2 * s).to(y_dtype).to(tl.float32)
    o2 = (y2 * c).to(y_dtype).to(tl.float32) + (y1 * s).to(y_dtype).to(tl.float32)
    _store_halves(Y, _offsets(t64, h, j, stride_yt, stride_yh), HALF, mask, o1, o2)
    tl.store(RSTD + t64[:, None] * H + h[None, :], rstd, mask=t_mask[:, None] & h_mask[None, :])


@triton.jit
def _qk_norm_rope_bwd_kernel(
    DO, X, W, RSTD, POS, INV, DX, DW_PARTIAL,
    T, H, HALF,
    stride_dot, stride_doh, stride_xt, stride_xh, stride_dxt, stride_dxh,
    scaling,
    COMPUTE_DW: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """dy = rotation of dout by -angle; then the RMSNorm backward of each head row:
    dx = rstd * (g - n * mean(g * n)), g = dy * w, n = x * rstd; dweight += dy * cast_x(n)."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    h = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    h_mask = h < H
    j_mask = j < HALF
    x_dtype = X.dtype.element_ty
    w1, w2 = _load_halves(W, j, HALF, j_mask)
    w1 = w1[None, None, :]
    w2 = w2[None, None, :]
    dw1 = tl.zeros([BLOCK_H, BLOCK_HALF], dtype=tl.float32)
    dw2 = tl.zeros([BLOCK_H, BLOCK_HALF], dtype=tl.float32)
    n_tiles = tl.cdiv(T, BLOCK_T)
    for tile in range(pid, n_tiles, n_programs):
        t64, t_mask, mask, c, s = _tokens(POS, INV, tile, T, j, j_mask, h_mask, scaling, DO.dtype.element_ty,
                                          BLOCK_T)
        do1, do2 = _load_halves(DO, _offsets(t64, h, j, stride_dot, stride_doh), HALF, mask)
        x1, x2 = _load_halves(X, _offsets(t64, h, j, stride_xt, stride_xh), HALF, mask)
        rstd = tl.load(RSTD + t64[:, None] * H + h[None, :], mask=t_mask[:, None] & h_mask[None, :], other=0.0)
        rstd = rstd[:, :, None]

        dy1 = do1 * c + do2 * s
        dy2 = do2 * c - do1 * s
        n1 = x1 * rstd
        n2 = x2 * rstd
        g1 = dy1 * w1
        g2 = dy2 * w2
        dot = (tl.sum(g1 * n1, axis=2) + tl.sum(g2 * n2, axis=2)) / (2 * HALF)
        dot = dot[:, :, None]
        dx1 = (g1 - n1 * dot) * rstd
        dx2 = (g2 - n2 * dot) * rstd
        _store_halves(DX, _offsets(t64, h, j, stride_dxt, stride_dxh), HALF, mask, dx1, dx2)
        if COMPUTE_DW:
            dw1 += tl.sum(dy1 * n1.to(x_dtype).to(tl.float32), axis=0)
            dw2 += tl.sum(dy2 * n2.to(x_dtype).to(tl.float32), axis=0)
    if COMPUTE_DW:
        out = DW_PARTIAL + pid * (2 * HALF)
        tl.store(out + j, tl.sum(dw1, axis=0), mask=j_mask)
        tl.store(out + HALF + j, tl.sum(dw2, axis=0), mask=j_mask)


# --------------------------------------------------------------------------------------------
# Host launchers, registered as custom ops
# --------------------------------------------------------------------------------------------
def _launch_rope(x: torch.Tensor, position_ids, inv_freq, attention_scaling: float, backward: bool):
    T, H, D = x.shape
    y = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    if T > 0 and H > 0:
        tile = _config(H, D // 2)
        _rope_kernel[(triton.cdiv(T, tile["BLOCK_T"]),)](
            x, y, position_ids.contiguous(), inv_freq.contiguous(),
            T, H, D // 2,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            float(attention_scaling),
            BACKWARD=backward,
            **tile,
        )
    return y


def _rope_op(name: str, backward: bool):
    """The custom op `themis::<name>` rotating x [T, H, D] by the angle (forward) or by its negative
    (backward, x being the output gradient); out [T, H, D] contiguous, x's dtype."""

    @custom_op(name)
    def op(
        x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float
    ) -> torch.Tensor:
        return _launch_rope(_check(x, position_ids, inv_freq), position_ids, inv_freq, attention_scaling, backward)

    @op.register_fake
    def _(x, position_ids, inv_freq, attention_scaling):
        return x.new_empty(x.shape)

    return op


_rope_fwd = _rope_op("rope_fwd", backward=False)
_rope_bwd = _rope_op("rope_bwd", backward=True)


@custom_op("qk_norm_rope_fwd")
def _qk_norm_rope_fwd(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [T, H, D] in promote(x, weight) dtype, rstd [T, H] float32)."""
    x = _check(x, position_ids, inv_freq)
    T, H, D = x.shape
    if norm_weight.shape != (D,):
        raise ValueError(f"qk_norm_rope: norm_weight of shape {tuple(norm_weight.shape)} for head dim {D}")
    y = torch.empty((T, H, D), dtype=torch.promote_types(x.dtype, norm_weight.dtype), device=x.device)
    rstd = torch.empty((T, H), dtype=torch.float32, device=x.device)
    if T > 0 and H > 0:
        tile = _config(H, D // 2)
        _qk_norm_rope_fwd_kernel[(triton.cdiv(T, tile["BLOCK_T"]),)](
            x, norm_weight.contiguous(), y, rstd, position_ids.contiguous(), inv_freq.contiguous(),
            T, H, D // 2,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            float(eps), float(attention_scaling),
            **tile,
        )
    return y, rstd


@_qk_norm_rope_fwd.register_fake
def _(x, norm_weight, eps, position_ids, inv_freq, attention_scaling):
    T, H, _ = x.shape
    out_dtype = torch.promote_types(x.dtype, norm_weight.dtype)
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty((T, H), dtype=torch.float32)


@custom_op("qk_norm_rope_bwd")
def _qk_norm_rope_bwd(
    dout: torch.Tensor,
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    rstd: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    compute_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight); dweight is empty when not compute_dw."""
    x = _check(x, position_ids, inv_freq)
    dout = rowmajor(dout)
    T, H, D = x.shape
    dx = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    tile = _config(H, D // 2)
    n_tiles = triton.cdiv(T, tile["BLOCK_T"]) if H > 0 else 0
    n_programs, partial = weight_grad_partials(x, n_tiles, D, compute_dw)
    if n_programs > 0:
        _qk_norm_rope_bwd_kernel[(n_programs,)](
            dout, x, norm_weight.contiguous(), rstd.contiguous(), position_ids.contiguous(), inv_freq.contiguous(),
            dx, partial,
            T, H, D // 2,
            dout.stride(0), dout.stride(1), x.stride(0), x.stride(1), dx.stride(0), dx.stride(1),
            float(attention_scaling),
            COMPUTE_DW=compute_dw,
            **tile,
        )
    return dx, weight_grad(partial, norm_weight, compute_dw)


@_qk_norm_rope_bwd.register_fake
def _(dout, x, norm_weight, rstd, position_ids, inv_freq, attention_scaling, compute_dw):
    return x.new_empty(x.shape), empty_unless(compute_dw, norm_weight)


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------
class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, position_ids, inv_freq, attention_scaling):
        ctx.save_for_backward(position_ids, inv_freq)
        ctx.attention_scaling = attention_scaling
        return _rope_fwd(x, position_ids, inv_freq, attention_scaling)

    @staticmethod
    def backward(ctx, dy):
        position_ids, inv_freq = ctx.saved_tensors
        dx = _rope_bwd(dy, position_ids, inv_freq, ctx.attention_scaling)
        return dx, None, None, None


class _QKNormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, eps, position_ids, inv_freq, attention_scaling):
        y, rstd = _qk_norm_rope_fwd(x, norm_weight, eps, position_ids, inv_freq, attention_scaling)
        ctx.save_for_backward(x, norm_weight, rstd, position_ids, inv_freq)
        ctx.attention_scaling = attention_scaling
        return y

    @staticmethod
    def backward(ctx, dout):
        x, norm_weight, rstd, position_ids, inv_freq = ctx.saved_tensors
        compute_dw = ctx.needs_input_grad[1]
        dx, dw = _qk_norm_rope_bwd(dout, x, norm_weight, rstd, position_ids, inv_freq, ctx.attention_scaling,
                                   compute_dw)
        return dx, (dw if compute_dw else None), None, None, None, None


def rope(
    x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0
) -> torch.Tensor:
    """Rotary embedding of x [T, H, D] at the packed position_ids [T]; see reference.rope."""
    return _Rope.apply(x, position_ids, inv_freq, float(attention_scaling))


def qk_norm_rope(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
) -> torch.Tensor:
    """rope(rms_norm(x, norm_weight, eps), position_ids, inv_freq, attention_scaling) in one kernel:
    Qwen3's per-head q/k norm (over D of each head of x [T, H, D]) followed by the rotary embedding."""
    return _QKNormRope.apply(x, norm_weight, float(eps), position_ids, inv_freq, float(attention_scaling))
