"""Prefix-shared varlen attention on the CPU through PyTorch's fused (flash) CPU attention.

`attention` has the signature and the results of `reference.attention` (out [T, Hq, D] in q's dtype,
lse [Hq, T] float32; rows in no segment: 0 and -inf), computed with
`aten._scaled_dot_product_flash_attention_for_cpu`, the kernel behind
`torch.nn.functional.scaled_dot_product_attention` on CPU tensors, called directly because it also
returns the log-sum-exp. It is tiled (no [n, p + n] score matrix), multithreaded, skips the blocks
above a causal diagonal, and its backward (`..._for_cpu_backward`) recomputes the probabilities
from the saved lse, as FlashAttention does.

How the mask of ARCHITECTURE.md section 3 maps onto plain causal calls, with no copies (every
operand is a view of q, k, v) and no masked-out work:

* a segment with no prefix (a group's prefix, or plain varlen): one causal call on its rows;
* a suffix S (rows a..b, prefix rows ps..ps+p): two calls, split along the keys:
  S's queries against P's keys (no mask) and S's queries against S's keys (causal, square), merged
  with their log-sum-exps: lse = logaddexp(lse_s, lse_p), out = out_p + w (out_s - out_p) with
  w = exp(lse_s - lse) = sigmoid(lse_s - lse_p).

The calls' rows are then concatenated into out and lse (one copy each; a write per call only for
overlapping segments). Precision: float64 inputs run in float64; everything else in float32 (bfloat16
and float16 inputs are upcast, as the reference computes them: the CPU kernel's own bf16 path rounds
the probabilities to bf16 and its lse is 100x less accurate), out cast back to q's dtype.

Backward: for a key partition, the gradients of flash attention need only the final out and lse
(P_ij = exp(s_ij - lse_i), delta_i = rowsum(dout_i * out_i)), so each call of the forward is
differentiated by the CPU backward kernel given the merged out and lse, and the partitions' dq add.
dk, dv of a prefix add over its suffixes (in the compute dtype, cast to the inputs' at the end).

GQA: query heads h = g * G + j read kv head g; the calls see q as [Hkv, G, n, D] and k, v expanded
(stride 0) to the same shape, so kv heads are never repeated in memory.

The gradient of lse (no caller in the model uses it) is computed, when one is asked for, with the
reference's autograd (dense per segment: correct, not fast).
"""

from __future__ import annotations

import torch

from themis_engine.kernels import reference

_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _plan(cu_seqlens: torch.Tensor, prefix_start: torch.Tensor, prefix_len: torch.Tensor) -> list[tuple]:
    """The calls that cover every segment: ("causal", a, b) runs rows a..b causally on themselves;
    ("split", a, b, ps, p) runs rows a..b against keys ps..ps+p (no mask) and a..b (causal), merged.

    Every suffix is split, the one stored right after its prefix too (fusing it with its prefix
    into one causal call would be one call fewer, but would round that suffix differently from its
    siblings: two identical answers to one prompt must score identically, bit for bit)."""
    bounds = cu_seqlens.tolist()
    pstart = prefix_start.tolist()
    plen = prefix_len.tolist()
    calls = []
    for s in range(len(bounds) - 1):
        a, b, p = bounds[s], bounds[s + 1], plen[s]
        if b <= a:
            continue
        calls.append(("causal", a, b) if p <= 0 else ("split", a, b, pstart[s], p))
    return calls


def _heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """Rows [n, Hkv, D] of k or v as the kernel's [Hkv, G, n, D], expanded (a view, stride 0 on G)."""
    n, h, d = x.shape
    return x.permute(1, 0, 2).unsqueeze(1).expand(h, group, n, d)


def _q_view(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """Rows [n, Hq, D] of q (or of out, dout) as the kernel's [Hkv, G, n, D] (a view)."""
    n, hq, d = x.shape
    return x.view(n, hkv, hq // hkv, d).permute(1, 2, 0, 3)


def _o_rows(x: torch.Tensor) -> torch.Tensor:
    """The kernel's [Hkv, G, n, D] back to rows [n, Hkv * G, D] (a view)."""
    hkv, g, n, d = x.shape
    return x.permute(2, 0, 1, 3).reshape(n, hkv * g, d)


def _kv_rows(x: torch.Tensor) -> torch.Tensor:
    """A [Hkv, G, n, D] gradient of expanded k / v summed over G: rows [n, Hkv, D]."""
    return x.sum(1).permute(1, 0, 2)


def _assemble(pieces: list, T: int, shape, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """out [T, Hq, D] and lse [Hq, T] from the calls' rows: one concatenation each where the calls
    do not overlap (the planner's streams: they tile the rows in order; a gap is rows in no segment:
    0 and -inf), else a write per call."""
    Hq = shape[1]
    pieces = sorted(pieces, key=lambda piece: piece[0])
    outs, lses, row = [], [], 0
    for a, o, l in pieces:
        if a < row:  # overlapping segments (the contract allows them): write the calls in order
            out = torch.zeros(shape, dtype=dtype, device=device)
            lse = torch.full((Hq, T), float("-inf"), dtype=dtype, device=device)
            for a, o, l in pieces:
                out[a : a + o.shape[0]] = o
                lse[:, a : a + o.shape[0]] = l
            return out, lse
        if a > row:
            outs.append(torch.zeros((a - row, *shape[1:]), dtype=dtype, device=device))
            lses.append(torch.full((Hq, a - row), float("-inf"), dtype=dtype, device=device))
        outs.append(o)
        lses.append(l)
        row = a + o.shape[0]
    if row < T or not outs:  # rows after the last segment (or no rows at all: empty out and lse)
        outs.append(torch.zeros((T - row, *shape[1:]), dtype=dtype, device=device))
        lses.append(torch.full((Hq, T - row), float("-inf"), dtype=dtype, device=device))
    return torch.cat(outs), torch.cat(lses, dim=1)


def _rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`, with the layout the CPU kernels read: each row's last dimension contiguous and
    no zero strides (an expanded gradient); a copy only where x is not already so."""
    x = x.to(dtype)
    if x.stride(-1) != 1 or 0 in x.stride():
        x = x.contiguous()
    return x


class _CPUAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, prefix_start, prefix_len, scale):
        T, Hq, D = q.shape
        Hkv = k.shape[1]
        if Hq % Hkv != 0:
            raise ValueError(f"attention: {Hq} query heads is not a multiple of {Hkv} kv heads")
        G = Hq // Hkv
        calls = _plan(cu_seqlens, prefix_start, prefix_len)
        cdt = reference._acc_dtype(q)  # float64 stays float64; the rest runs in float32, as the reference
        # the CPU kernels read the last dimension as contiguous (stride 1) and take the other
        # strides as given: a copy only for inputs that are not laid out so (no copy for float32 rows)
        cq, ck, cv = (_rows(x, cdt) for x in (q, k, v))
        pieces = []  # (first row, out rows [n, Hq, D], lse [Hq, n]) per call
        for call in calls:
            a, b = call[1], call[2]
            qa = _q_view(cq[a:b], Hkv)
            o, l = _FWD(qa, _heads(ck[a:b], G), _heads(cv[a:b], G), 0.0, True, scale=scale)
            if call[0] == "split":  # the keys of the prefix, then the merge by log-sum-exp
                ps, p = call[3], call[4]
                o_p, l_p = _FWD(qa, _heads(ck[ps:ps + p], G), _heads(cv[ps:ps + p], G), 0.0, False, scale=scale)
                w = torch.sigmoid(l - l_p)  # exp(l - logaddexp(l, l_p)): the weight of the own keys
                o = torch.lerp(o_p, o, w[..., None])
                l = torch.logaddexp(l, l_p)
            pieces.append((a, _o_rows(o), l.reshape(Hq, b - a)))
        out, lse = _assemble(pieces, T, q.shape, cdt, q.device)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, prefix_start, prefix_len)
        ctx.calls, ctx.scale = calls, scale
        ctx.set_materialize_grads(False)
        return out.to(q.dtype), lse.float()

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_seqlens, prefix_start, prefix_len = ctx.saved_tensors
        scale = ctx.scale
        Hkv = k.shape[1]
        G = q.shape[1] // Hkv
        cdt = out.dtype
        dq, dk, dv = (torch.zeros(x.shape, dtype=cdt, device=x.device) for x in (q, k, v))
        if dout is not None:
            # dout may come expanded (stride 0, from out.sum()): laid out as the kernel reads it first
            cq, ck, cv, cdout = (_rows(x, cdt) for x in (q, k, v, dout))
            for call in ctx.calls:
                a, b = call[1], call[2]
                qa, do, o = (_q_view(x[a:b], Hkv) for x in (cq, cdout, out))
                l = lse[:, a:b].reshape(Hkv, G, b - a)
                parts = [(a, b, True)] + ([(call[3], call[3] + call[4], False)] if call[0] == "split" else [])
                for start, stop, causal in parts:
                    gq, gk, gv = _BWD(do, qa, _heads(ck[start:stop], G), _heads(cv[start:stop], G), o, l, 0.0,
                                      causal, scale=scale)
                    dq[a:b] += _o_rows(gq)
                    dk[start:stop] += _kv_rows(gk)
                    dv[start:stop] += _kv_rows(gv)
        if dlse is not None and bool((dlse[torch.isfinite(lse)] != 0).any()):
            with torch.enable_grad():
                xs = [x.detach().requires_grad_() for x in (q, k, v)]
                _, lse_ref = reference.attention(*xs, cu_seqlens, prefix_start, prefix_len, 0, scale)
                grads = torch.autograd.grad(lse_ref, xs, dlse.to(lse_ref.dtype), allow_unused=True)
            for acc, g in zip((dq, dk, dv), grads):
                if g is not None:
                    acc += g
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    prefix_start: torch.Tensor,
    prefix_len: torch.Tensor,
    max_seqlen: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix-shared varlen attention (see reference.attention and the module docstring).
    Returns out [T, Hq, D] (dtype of q) and lse [Hq, T] (float32)."""
    del max_seqlen
    return _CPUAttention.apply(q, k, v, cu_seqlens, prefix_start, prefix_len, float(scale))
