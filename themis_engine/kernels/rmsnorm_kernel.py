"""RMSNorm (optionally fused with the residual add) as Triton kernels.

`rms_norm(x, weight, eps, residual=None)` has the signature and the numerics of
`reference.rms_norm`: statistics in float32, the normalised value cast to x.dtype before the
weight multiply (Hugging Face Qwen3/Llama order), output in promote(x.dtype, weight.dtype).
With `residual`, h = x + residual is rounded to x.dtype first and the norm is taken of that
rounded h; it returns (norm(h), h), and the residual-stream gradient flows through both outputs.

Layers (ARCHITECTURE.md section 5):
* `_rms_norm_fwd_kernel`: one tile of BLOCK_M rows x BLOCK_D columns per program, one pass
  (load x [+ residual], store y [+ h], store rstd[row] in float32 for the backward).
* `_rms_norm_bwd_kernel`: persistent programs walk the row tiles (grid stride); each program keeps
  its partial sum of dweight in registers and writes one float32 row of a [programs, D] buffer,
  summed on the host afterwards (no atomics, deterministic).
* custom ops `themis::rms_norm_fwd`, `themis::add_rms_norm_fwd`, `themis::rms_norm_bwd`
  (kernels._utils.custom_op + register_fake, so torch.compile traces them as opaque nodes);
* `torch.autograd.Function`s `_RMSNorm` and `_AddRMSNorm`; `rms_norm` picks one.

`score_head(hidden, score_index, norm_weight, head_weight, eps)` is the model's last step on this
backend: this RMSNorm at the score rows, then the reward head as a cuBLAS product (F.linear).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from themis_engine.kernels._utils import (
    as_rows,
    custom_op,
    empty_unless,
    num_warps_for,
    row_tile,
    weight_grad,
    weight_grad_partials,
)

__all__ = ["rms_norm", "score_head"]


# --------------------------------------------------------------------------------------------
# Launch configuration (host side; the kernels only see constexprs)
# --------------------------------------------------------------------------------------------
_TILE_ELEMS = 4096  # elements per program tile: 16 per thread at 8 warps, i.e. 2 x 16-byte loads in bf16


def _config(D: int) -> dict:
    """The tile for rows of D elements, as launch keywords: BLOCK_M, BLOCK_D, num_warps."""
    block_m, block_d = row_tile(D, _TILE_ELEMS)
    return dict(BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps_for(block_m * block_d))


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, H, RSTD,
    n_rows, D,
    stride_x, stride_r, stride_y, stride_h,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)

    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        # h = x + residual, rounded to x.dtype (as torch's add), and the norm is of the rounded h
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H + rows64[:, None] * stride_h + cols[None, :], x, mask=mask)

    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=1) / D
    rstd = tl.math.rsqrt(var + eps)
    normed = (xf * rstd[:, None]).to(X.dtype.element_ty)  # cast to x.dtype before the weight
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    # the product of two <=16-bit floats is exact in float32: one rounding, as torch's mul
    y = w[None, :] * normed.to(tl.float32)
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, DH, X, W, RSTD, DX, DW_PARTIAL,
    n_rows, D,
    stride_dy, stride_dh, stride_x, stride_dx,
    HAS_DH: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dx = rstd * (g - n * mean(g * n)) [+ dh], with n = x * rstd and g = dy * w (float32);
    dweight partial = sum over this program's rows of dy * n (n cast to x.dtype, as forward)."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_tiles = tl.cdiv(n_rows, BLOCK_M)
    for tile in range(pid, n_tiles, n_programs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)

        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)

        n = x.to(tl.float32) * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * n, axis=1) / D
        dx = (g - n * c[:, None]) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(DH + rows64[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * n.to(X.dtype.element_ty).to(tl.float32)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * D + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


# --------------------------------------------------------------------------------------------
# Host launchers, registered as custom ops
# --------------------------------------------------------------------------------------------
def _launch_fwd(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} for rows of {D}")
    x2 = as_rows(x, D)
    rows = x2.shape[0]
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if residual is not None:
        r2 = as_rows(residual, D)
        h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        r2, h = x2, y  # unused placeholders (HAS_RESIDUAL=False)
    if rows > 0:
        tile = _config(D)
        h2 = h.view(-1, D)
        _rms_norm_fwd_kernel[(triton.cdiv(rows, tile["BLOCK_M"]),)](
            x2, r2, weight.contiguous(), y, h2, rstd,
            rows, D,
            x2.stride(0), r2.stride(0), D, h2.stride(0),
            float(eps),
            HAS_RESIDUAL=residual is not None,
            **tile,
        )
    return y, (h if residual is not None else None), rstd


@custom_op("rms_norm_fwd")
def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y in promote(x, weight) dtype, rstd [...] float32)."""
    y, _, rstd = _launch_fwd(x, None, weight, eps)
    return y, rstd


@_rms_norm_fwd.register_fake
def _(x, weight, eps):
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


@custom_op("add_rms_norm_fwd")
def _add_rms_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h = x + residual in x.dtype, rstd float32)."""
    y, h, rstd = _launch_fwd(x, residual, weight, eps)
    return y, h, rstd


@_add_rms_norm_fwd.register_fake
def _(x, residual, weight, eps):
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    return (
        x.new_empty(x.shape, dtype=out_dtype),
        x.new_empty(x.shape),
        x.new_empty(x.shape[:-1], dtype=torch.float32),
    )


@custom_op("rms_norm_bwd")
def _rms_norm_bwd(
    dy: torch.Tensor,
    dh: Optional[torch.Tensor],
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    compute_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight); dweight is an empty tensor when not compute_dw. x is the normalised input
    (h when the residual was fused); dh, when given, is added to dx."""
    D = x.shape[-1]
    x2 = as_rows(x, D)
    dy2 = as_rows(dy, D)
    rows = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dx2 = dx.view(-1, D)
    dh2 = as_rows(dh, D) if dh is not None else dy2
    tile = _config(D)
    n_programs, partial = weight_grad_partials(x, triton.cdiv(rows, tile["BLOCK_M"]), D, compute_dw)
    if n_programs > 0:
        _rms_norm_bwd_kernel[(n_programs,)](
            dy2, dh2, x2, weight.contiguous(), rstd.reshape(-1).contiguous(), dx2, partial,
            rows, D,
            dy2.stride(0), dh2.stride(0), x2.stride(0), dx2.stride(0),
            HAS_DH=dh is not None,
            COMPUTE_DW=compute_dw,
            **tile,
        )
    return dx, weight_grad(partial, weight, compute_dw)


@_rms_norm_bwd.register_fake
def _(dy, dh, x, weight, rstd, compute_dw):
    return x.new_empty(x.shape), empty_unless(compute_dw, weight)


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = _rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_bwd(dy, None, x, weight, rstd, ctx.needs_input_grad[1])
        return dx, (dw if ctx.needs_input_grad[1] else None), None


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        y, h, rstd = _add_rms_norm_fwd(x, residual, weight, eps)
        ctx.save_for_backward(h, weight, rstd)
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        h, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_bwd(dy, dh, h, weight, rstd, ctx.needs_input_grad[2])
        # d/dx and d/dresidual of h = x + residual are the same tensor
        return dx, dx, (dw if ctx.needs_input_grad[2] else None), None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, optionally fused with the residual add; see reference.rms_norm."""
    if residual is None:
        return _RMSNorm.apply(x, weight, float(eps))
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"rms_norm: residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}"
        )
    return _AddRMSNorm.apply(x, residual, weight, float(eps))



def score_head(
    hidden: torch.Tensor, score_index: torch.Tensor, norm_weight: torch.Tensor, head_weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """Final RMSNorm at the score rows and the reward head: F.linear(rms_norm(hidden[score_index]),
    head_weight), the norm in this module's kernel; see reference.score_head."""
    return F.linear(rms_norm(hidden[score_index], norm_weight, eps), head_weight)
