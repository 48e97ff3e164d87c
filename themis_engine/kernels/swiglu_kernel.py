"""SwiGLU activation, silu(gate) * up, as Triton kernels.

`swiglu(gate, up)` has the signature and numerics of `reference.swiglu`: silu in float32
(x / (1 + exp(-x)), torch's formula), rounded to gate.dtype, times up, rounded to the output dtype
(promote(gate.dtype, up.dtype)). The backward recomputes silu from gate (nothing but the inputs is
saved) and does its math in float32:

    dgate = dout * up * sigmoid(g) * (1 + g * (1 - sigmoid(g)))     (one rounding)
    dup   = dout * silu(g)                                          (silu rounded as in forward)

gate and up are [..., N] with a contiguous last dim and any row stride, so the two halves of a fused
gate_up projection (gate_up[..., :N], gate_up[..., N:]) are read in place. Tiles of
BLOCK_M rows x BLOCK_N columns, one per program, on a 2-D grid (rows on axis 0). Custom ops
`themis::swiglu_fwd` / `themis::swiglu_bwd` (+ fakes), glued by the autograd Function `_SwiGLU`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from themis_engine.kernels._utils import as_rows, custom_op, num_warps_for, row_tile

__all__ = ["swiglu"]

_TILE_ELEMS = 4096


def _config(N: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps); wide rows are split over grid axis 1 in BLOCK_N <= 2048."""
    block_m, block_n = row_tile(N, _TILE_ELEMS, max_block_cols=2048)
    return block_m, block_n, num_warps_for(block_m * block_n, max_warps=8)


@triton.jit
def _tile(n_rows, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile of the [n_rows, N] view: (row offsets [BLOCK_M, 1] int64, columns
    [1, BLOCK_N], in-bounds mask [BLOCK_M, BLOCK_N])."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
    return rows.to(tl.int64)[:, None], cols[None, :], mask


@triton.jit
def _load_f32(P, rows64, cols, stride, mask):
    """The tile of P (row stride `stride`) in float32; zeros out of bounds."""
    return tl.load(P + rows64 * stride + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store(P, rows64, cols, stride, mask, value):
    """Store the float32 tile `value` into P, rounded to P's dtype."""
    tl.store(P + rows64 * stride + cols, value.to(P.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_fwd_kernel(
    G, U, O,
    n_rows, N,
    stride_g, stride_u, stride_o,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows64, cols, mask = _tile(n_rows, N, BLOCK_M, BLOCK_N)
    g = _load_f32(G, rows64, cols, stride_g, mask)
    u = _load_f32(U, rows64, cols, stride_u, mask)
    act = (g / (1.0 + tl.exp(-g))).to(G.dtype.element_ty).to(tl.float32)
    _store(O, rows64, cols, stride_o, mask, act * u)


@triton.jit
def _swiglu_bwd_kernel(
    DO, G, U, DG, DU,
    n_rows, N,
    stride_do, stride_g, stride_u, stride_dg, stride_du,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows64, cols, mask = _tile(n_rows, N, BLOCK_M, BLOCK_N)
    do = _load_f32(DO, rows64, cols, stride_do, mask)
    g = _load_f32(G, rows64, cols, stride_g, mask)
    u = _load_f32(U, rows64, cols, stride_u, mask)
    sig = 1.0 / (1.0 + tl.exp(-g))
    act = (g * sig).to(G.dtype.element_ty).to(tl.float32)
    dg = do * u * (sig * (1.0 + g * (1.0 - sig)))
    du = do * act
    _store(DG, rows64, cols, stride_dg, mask, dg)
    _store(DU, rows64, cols, stride_du, mask, du)


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")


@custom_op("swiglu_fwd")
def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _check(gate, up)
    N = gate.shape[-1]
    out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if out.numel() == 0:
        return out
    g2, u2, o2 = as_rows(gate, N), as_rows(up, N), out.view(-1, N)
    rows = g2.shape[0]
    block_m, block_n, num_warps = _config(N)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(N, block_n))
    _swiglu_fwd_kernel[grid](
        g2, u2, o2, rows, N, g2.stride(0), u2.stride(0), o2.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return out


@_swiglu_fwd.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))


@custom_op("swiglu_bwd")
def _swiglu_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check(gate, up)
    N = gate.shape[-1]
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if dgate.numel() == 0:
        return dgate, dup
    do2, g2, u2 = as_rows(dout, N), as_rows(gate, N), as_rows(up, N)
    dg2, du2 = dgate.view(-1, N), dup.view(-1, N)
    rows = g2.shape[0]
    block_m, block_n, num_warps = _config(N)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(N, block_n))
    _swiglu_bwd_kernel[grid](
        do2, g2, u2, dg2, du2, rows, N,
        do2.stride(0), g2.stride(0), u2.stride(0), dg2.stride(0), du2.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return dgate, dup


@_swiglu_bwd.register_fake
def _(dout, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dgate, dup = _swiglu_bwd(dout, gate, up)
        return dgate, dup


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise; see reference.swiglu."""
    return _SwiGLU.apply(gate, up)
