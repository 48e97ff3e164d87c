"""Fused linear cross-entropy: chunked torch matmuls + a Triton softmax / softmax-gradient kernel.

Semantics: `reference.linear_cross_entropy` (sum of token losses / normaliser), without ever holding
the [T, V] logits. Design (Liger style: the gradients are made DURING the forward):

* Rows of `hidden` are taken in chunks of C rows, C chosen so that the [C, V] logits chunk stays under
  CHUNK_BYTES. For each chunk: logits = h_c @ W.T (torch.mm, cuBLAS; in the inputs' dtype, float32
  accumulation inside the GEMM), then ONE Triton launch, one program per row, makes two sweeps over
  V: an online max / sum-of-exp (lse, float32) and the row loss lse - z[label], then overwrites the
  logits chunk in place with dloss/dlogits = (softmax - onehot) / normaliser (zero for ignored rows).
  Then dh_c = G @ W (written once per row) and dW += G^T @ h_c (addmm into a buffer in the weight's
  dtype: one rounding per chunk in bf16, exact float32 accumulation for float32 weights).
  So the matmuls are torch's, the softmax / lse / gradient part is Triton; 3 GEMMs, like unfused.
* The forward keeps dh [T, D] and dW [V, D] (already divided by the normaliser); the backward only
  multiplies them by the upstream scalar grad. When no gradient is wanted (no_grad, or neither
  hidden nor weight requires grad), the forward only computes the loss (1 GEMM).
* Registered as the custom op themis::linear_ce_fwd (+ fake, kernels._utils.custom_op), glued by a
  torch.autograd.Function; `linear_cross_entropy` is the public plain function.

The loss is computed from the logits rounded to the inputs' dtype (as Hugging Face / Liger do). A label
outside [0, V) that is not ignore_index is an error naming the row (one host sync per call, small next
to a [T, D] x [D, V] product), as in the reference: nothing is dropped silently.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from themis_engine.kernels._utils import custom_op, empty_unless

Tensor = torch.Tensor

# upper bound on the bytes of one [C, V] logits chunk (tests lower it to force many chunks)
CHUNK_BYTES = 512 * 1024 * 1024
_MAX_BLOCK_V = 8192


@triton.jit
def _ce_rows_kernel(
    logits_ptr, stride_row, labels_ptr, loss_ptr, scale_ptr,
    V, ignore_index,
    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    offs0 = tl.arange(0, BLOCK_V)

    # sweep 1: online max / sum of exp over V (float32)
    m = float("-inf")
    s = 0.0
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + offs0
        z = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)

    valid = (label != ignore_index) & (label >= 0) & (label < V)
    z_label = tl.load(base + label, mask=valid, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_label, 0.0))

    if WRITE_GRAD:
        # sweep 2: overwrite the logits with (softmax - onehot) * scale (0 on ignored rows)
        coef = tl.where(valid, tl.load(scale_ptr).to(tl.float32), 0.0)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + offs0
            ok = offs < V
            z = tl.load(base + offs, mask=ok, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) - tl.where(offs == label, 1.0, 0.0)
            tl.store(base + offs, (g * coef).to(logits_ptr.dtype.element_ty), mask=ok)


def _chunk_rows(T: int, V: int, elem_bytes: int) -> int:
    """Rows per chunk: as many as fit CHUNK_BYTES, then evened out over the chunks."""
    if T <= 0:
        return 1
    rows = max(1, CHUNK_BYTES // max(1, V * elem_bytes))
    if rows >= T:
        return T
    chunks = triton.cdiv(T, rows)
    return triton.cdiv(T, chunks)


@custom_op("linear_ce_fwd")
def _linear_ce_fwd(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int,
    normalizer: Optional[float],
    need_dh: bool,
    need_dw: bool,
    chunk_rows: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss, dloss/dhidden or empty, dloss/dweight or empty)."""
    T, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    h = hidden.to(dtype).contiguous()
    w = weight.to(dtype).contiguous()
    lab = labels.contiguous()
    bad = (lab != ignore_index) & ((lab < 0) | (lab >= V))
    if bool(bad.any()):  # inside the op, so torch.compile sees no data-dependent branch
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"linear_cross_entropy: label {int(lab[row])} at row {row} is outside [0, {V}) "
            f"and is not ignore_index ({ignore_index})"
        )
    if normalizer is None:
        norm = (lab != ignore_index).sum().to(torch.float32).clamp(min=1.0)
    else:
        norm = torch.full((), max(float(normalizer), 1.0), dtype=torch.float32, device=dev)
    scale = (1.0 / norm).reshape(1)
    need_grad = need_dh or need_dw
    loss_rows = torch.zeros((T,), dtype=torch.float32, device=dev)
    dh = torch.empty((T, D), dtype=dtype, device=dev) if need_dh else None
    dw = torch.zeros((V, D), dtype=dtype, device=dev) if need_dw and T == 0 else None
    block_v = min(_MAX_BLOCK_V, triton.next_power_of_2(max(V, 1)))
    chunk_rows = max(1, int(chunk_rows))
    for start in range(0, T, chunk_rows):
        end = min(T, start + chunk_rows)
        h_c = h[start:end]
        logits = torch.mm(h_c, w.t())  # [c, V]
        _ce_rows_kernel[(end - start,)](
            logits, logits.stride(0), lab[start:end], loss_rows[start:end], scale,
            V, ignore_index,
            WRITE_GRAD=need_grad, BLOCK_V=block_v,
            num_warps=8,
        )
        if need_dh:
            torch.mm(logits, w, out=dh[start:end])
        if need_dw:
            if dw is None:
                dw = torch.mm(logits.t(), h_c)
            else:
                dw.addmm_(logits.t(), h_c)
        del logits
    loss = loss_rows.sum() / norm
    dh_out = dh.to(hidden.dtype) if need_dh else hidden.new_empty((0,))
    dw_out = dw.to(weight.dtype) if need_dw else weight.new_empty((0,))
    return loss, dh_out, dw_out


@_linear_ce_fwd.register_fake
def _linear_ce_fwd_fake(hidden, weight, labels, ignore_index, normalizer, need_dh, need_dw, chunk_rows):
    return hidden.new_empty((), dtype=torch.float32), empty_unless(need_dh, hidden), empty_unless(need_dw, weight)


class _LinearCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, normalizer, need_dh, need_dw, chunk_rows):
        loss, dh, dw = _linear_ce_fwd(
            hidden, weight, labels, ignore_index, normalizer, need_dh, need_dw, chunk_rows
        )
        ctx.save_for_backward(dh, dw)
        ctx.need = (need_dh, need_dw)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        need_dh, need_dw = ctx.need
        g = grad_loss.to(torch.float32)
        # a 0-dim float32 factor keeps dh / dw in their own dtype
        return (
            dh * g if need_dh and ctx.needs_input_grad[0] else None,
            dw * g if need_dw and ctx.needs_input_grad[1] else None,
            None, None, None, None, None, None,
        )


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    normalizer: Optional[float] = None,
) -> Tensor:
    """Cross-entropy of hidden @ weight.T against labels, chunked; same results as the reference."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden [T, D] and weight [V, D] expected, got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}"
        )
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"linear_cross_entropy: labels must be [{hidden.shape[0]}], got {tuple(labels.shape)}")
    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and hidden.requires_grad
    need_dw = grad_on and weight.requires_grad
    elem = torch.promote_types(hidden.dtype, weight.dtype).itemsize
    rows = _chunk_rows(hidden.shape[0], weight.shape[0], elem)
    return _LinearCEFunction.apply(
        hidden,
        weight,
        labels,
        int(ignore_index),
        None if normalizer is None else float(normalizer),
        need_dh,
        need_dw,
        rows,
    )


__all__ = ["linear_cross_entropy", "CHUNK_BYTES"]
