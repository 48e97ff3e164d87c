"""Prefix-shared varlen flash attention in Triton: forward and backward.

Same contract as `reference.attention` (ARCHITECTURE.md section 3): one packed stream of T tokens cut
into segments by `cu_seqlens`; segment s is causal within itself and, when prefix_len[s] > 0, also
sees the rows prefix_start[s] .. prefix_start[s]+prefix_len[s]-1 (its group's prefix) in full:

    keys ->      prefix P        segment s
    query i   [ 1 1 1 1 1 1 | 1 0 0 0 ]      (i = first row of s)
    query i+1 [ 1 1 1 1 1 1 | 1 1 0 0 ]

Layers: `@triton.jit` kernels -> host launchers (`_forward`, `_backward`) -> custom ops
`themis::attention_fwd`, `themis::attention_bwd` (kernels._utils.custom_op, with fake
implementations for torch.compile) -> `_AttentionFunction` (autograd) -> the public `attention`.

Design (FlashAttention-2, online softmax in the log2 domain, fp32 accumulation):

* forward / dQ: one program per (query block of a segment, query head). Each program walks three
  key ranges: the segment's prefix (keys masked to the range only), the segment's keys before the
  block (no mask) and the diagonal keys (causal mask). Grid axis 0 is segments x ceil(max_seqlen /
  BLOCK_M); a program loops over its segment's blocks with a grid stride, so a too-small max_seqlen
  costs speed, never correctness.
* dK/dV: one program per (key block of a segment, kv head); it loops over the GROUP query heads of
  that kv head (no atomics) and over every query that sees the block: the block's own segment
  (causal, then unmasked), and every segment whose prefix range overlaps the block's segment
  (keys masked to that range). Those "viewer" lists are a small CSR table built on the host from
  cu_seqlens / prefix_start / prefix_len (O(segments) ints, never O(T^2)).
* The forward needs no host sync. The backward reads the three metadata tensors once to build the
  viewer table, cached per metadata tensor object (the layers of one step share it).
"""

import os
import weakref
from dataclasses import astuple, dataclass
from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl

from themis_engine.kernels._utils import custom_op, rowmajor

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _segment(CU, PSTART, PLEN, seg):
    """Rows seg_lo..seg_hi-1 of segment `seg`, and the prefix rows pre_lo..pre_hi-1 it also sees."""
    seg_lo = tl.load(CU + seg)
    seg_hi = tl.load(CU + seg + 1)
    pre_lo = tl.load(PSTART + seg)
    pre_hi = pre_lo + tl.load(PLEN + seg)
    return seg_lo, seg_hi, pre_lo, pre_hi


@triton.jit
def _query_program(CU, PSTART, PLEN, Q, K, V, stride_qh, stride_kh, stride_vh, GRID_M, GROUP: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    """What a forward / dQ program (grid: segments x GRID_M, query heads) works on: its query head h,
    its segment's rows and prefix range (as `_segment`), the Q base of head h and the K / V bases of
    its kv head, and the first row of its first query block (the next ones follow GRID_M * BLOCK_M
    rows apart)."""
    pid = tl.program_id(0)
    seg = pid // GRID_M
    h = tl.program_id(1)
    hk = h // GROUP
    seg_lo, seg_hi, pre_lo, pre_hi = _segment(CU, PSTART, PLEN, seg)
    m_first = seg_lo + (pid % GRID_M) * BLOCK_M
    return h, seg_lo, seg_hi, pre_lo, pre_hi, Q + h * stride_qh, K + hk * stride_kh, V + hk * stride_vh, m_first


@triton.jit
def _key_tile(K_h, V_h, stride_kt, stride_vt, start_n, key_hi, offs_d, MASK: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """(offs_n [BN], n_ok = offs_n < key_hi, k [BN, D], v [BN, D]) at the key rows start_n..; rows
    out of bounds read as zeros. MASK 0: every row is in bounds (unmasked loads)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < key_hi
    k_rows = offs_n.to(tl.int64)[:, None]
    if MASK == 0:
        k = tl.load(K_h + k_rows * stride_kt + offs_d[None, :])
        v = tl.load(V_h + k_rows * stride_vt + offs_d[None, :])
    else:
        k = tl.load(K_h + k_rows * stride_kt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        v = tl.load(V_h + k_rows * stride_vt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    return offs_n, n_ok, k, v


@triton.jit
def _visible(offs_m, offs_n, n_ok, MASK: tl.constexpr):
    """Which (query, key) pairs of a [BM, BN] score tile count. MASK 1: keys in bounds ([1, BN]);
    2: causal (key <= query) and in bounds ([BM, BN])."""
    if MASK == 2:
        vis = (offs_n[None, :] <= offs_m[:, None]) & n_ok[None, :]
    else:
        vis = n_ok[None, :]
    return vis


@triton.jit
def _query_tile(Q_h, DO_h, LSE_h, DELTA_h, stride_qt, stride_dot, offs_m, m_ok, offs_d):
    """The backward's inputs at the query rows offs_m of one head: q, dout [BM, D] (their dtype),
    lse in log2 units and delta [BM] (float32). Rows not m_ok read zeros and lse = +inf, hence p = 0."""
    rows = offs_m.to(tl.int64)[:, None]
    q = tl.load(Q_h + rows * stride_qt + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    do = tl.load(DO_h + rows * stride_dot + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    lse2 = tl.load(LSE_h + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA_h + offs_m, mask=m_ok, other=0.0)
    return q, do, lse2, delta


@triton.jit
def _fwd_keys(
    acc, l_i, m_i, q, offs_m, offs_d, K_h, V_h, stride_kt, stride_vt, key_lo, key_hi, qk_scale,
    MASK: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Online-softmax update of one query tile over keys key_lo..key_hi-1.

    MASK 0: all keys visible (and all in bounds); 1: keys < key_hi only; 2: causal (key <= query).
    """
    for start_n in range(key_lo, key_hi, BLOCK_N):
        offs_n, n_ok, k, v = _key_tile(K_h, V_h, stride_kt, stride_vt, start_n, key_hi, offs_d, MASK, BLOCK_N)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BM, BN], log2 units
        if MASK != 0:
            s = tl.where(_visible(offs_m, offs_n, n_ok, MASK), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU, PSTART, PLEN,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
    qk_scale, GRID_M,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    h, seg_lo, seg_hi, pre_lo, pre_hi, Q_h, K_h, V_h, m_first = _query_program(
        CU, PSTART, PLEN, Q, K, V, stride_qh, stride_kh, stride_vh, GRID_M, GROUP, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    for m_start in range(m_first, seg_hi, GRID_M * BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < seg_hi
        q_rows = offs_m.to(tl.int64)[:, None]
        q = tl.load(Q_h + q_rows * stride_qt + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        # m starts finite so that a row with nothing visible yet never computes -inf - -inf
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        # the prefix range (keys masked to it), the segment's keys before the block, the diagonal
        acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, offs_m, offs_d, K_h, V_h, stride_kt, stride_vt,
                                  pre_lo, pre_hi, qk_scale, 1, BLOCK_N, DOT_PREC)
        acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, offs_m, offs_d, K_h, V_h, stride_kt, stride_vt,
                                  seg_lo, m_start, qk_scale, 0, BLOCK_N, DOT_PREC)
        acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, offs_m, offs_d, K_h, V_h, stride_kt, stride_vt,
                                  m_start, tl.minimum(m_start + BLOCK_M, seg_hi), qk_scale, 2, BLOCK_N,
                                  DOT_PREC)
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # only padding rows (not stored) can have l == 0
        out = acc / l_safe[:, None]
        lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
        tl.store(O + h * stride_oh + q_rows * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=m_ok[:, None])
        tl.store(LSE + h * stride_lh + offs_m, lse, mask=m_ok)


@triton.jit
def _bwd_delta_kernel(
    O, DO, DLSE, DELTA, T,
    stride_ot, stride_oh, stride_dot, stride_doh, stride_lh,
    HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """delta[h, t] = sum_d out * dout (- dlse[h, t] when the lse output has a gradient)."""
    h = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_t.to(tl.int64)[:, None]
    o = tl.load(O + h * stride_oh + rows * stride_ot + offs_d[None, :], mask=t_ok[:, None], other=0.0)
    do = tl.load(DO + h * stride_doh + rows * stride_dot + offs_d[None, :], mask=t_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + h * stride_lh + offs_t, mask=t_ok, other=0.0)
    tl.store(DELTA + h * stride_lh + offs_t, delta, mask=t_ok)


@triton.jit
def _dq_keys(
    dq, q, do, lse2, delta, offs_m, offs_d, K_h, V_h, stride_kt, stride_vt, key_lo, key_hi, qk_scale,
    MASK: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dq (unscaled) of one query tile from keys key_lo..key_hi-1; MASK as in _fwd_keys."""
    for start_n in range(key_lo, key_hi, BLOCK_N):
        offs_n, n_ok, k, v = _key_tile(K_h, V_h, stride_kt, stride_vt, start_n, key_hi, offs_d, MASK, BLOCK_N)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASK != 0:
            p = tl.where(_visible(offs_m, offs_n, n_ok, MASK), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, CU, PSTART, PLEN,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lh,
    sm_scale, qk_scale, GRID_M,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    h, seg_lo, seg_hi, pre_lo, pre_hi, Q_h, K_h, V_h, m_first = _query_program(
        CU, PSTART, PLEN, Q, K, V, stride_qh, stride_kh, stride_vh, GRID_M, GROUP, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    DO_h = DO + h * stride_doh
    LSE_h = LSE + h * stride_lh
    DELTA_h = DELTA + h * stride_lh
    for m_start in range(m_first, seg_hi, GRID_M * BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < seg_hi
        q, do, lse2, delta = _query_tile(Q_h, DO_h, LSE_h, DELTA_h, stride_qt, stride_dot, offs_m, m_ok, offs_d)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        # the same three key ranges as the forward
        dq = _dq_keys(dq, q, do, lse2, delta, offs_m, offs_d, K_h, V_h, stride_kt, stride_vt,
                      pre_lo, pre_hi, qk_scale, 1, BLOCK_N, DOT_PREC)
        dq = _dq_keys(dq, q, do, lse2, delta, offs_m, offs_d, K_h, V_h, stride_kt, stride_vt,
                      seg_lo, m_start, qk_scale, 0, BLOCK_N, DOT_PREC)
        dq = _dq_keys(dq, q, do, lse2, delta, offs_m, offs_d, K_h, V_h, stride_kt, stride_vt,
                      m_start, tl.minimum(m_start + BLOCK_M, seg_hi), qk_scale, 2, BLOCK_N, DOT_PREC)
        rows = offs_m.to(tl.int64)[:, None]
        tl.store(DQ + h * stride_dqh + rows * stride_dqt + offs_d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None])


@triton.jit
def _dkdv_queries(
    dk, dv, k, v, offs_n, key_ok, offs_d, Q_h, DO_h, LSE_h, DELTA_h, stride_qt, stride_dot, q_lo, q_hi,
    qk_scale, MASK: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dk (unscaled), dv of one key tile from queries q_lo..q_hi-1 of one head.

    MASK 0: every (query, key) pair visible; 1: keys where key_ok; 2: causal (query >= key) and key_ok.
    Works on the transposed scores [BLOCK_N, BLOCK_M] so no tile is transposed twice.
    """
    for start_m in range(q_lo, q_hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < q_hi
        q, do, lse2, delta = _query_tile(Q_h, DO_h, LSE_h, DELTA_h, stride_qt, stride_dot, offs_m, m_ok, offs_d)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [BN, BM]
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if MASK == 1:
            p_t = tl.where(key_ok[:, None], p_t, 0.0)
        if MASK == 2:
            p_t = tl.where((offs_m[None, :] >= offs_n[:, None]) & key_ok[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU, PSTART, PLEN, VIEW_PTR, VIEW_SEG,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
    sm_scale, qk_scale, GRID_N,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    seg = pid // GRID_N
    hk = tl.program_id(1)
    seg_lo = tl.load(CU + seg)
    seg_hi = tl.load(CU + seg + 1)
    view_lo = tl.load(VIEW_PTR + seg)
    view_hi = tl.load(VIEW_PTR + seg + 1)
    offs_d = tl.arange(0, HEAD_DIM)
    for n_start in range(seg_lo + (pid % GRID_N) * BLOCK_N, seg_hi, GRID_N * BLOCK_N):
        offs_n, n_ok, k, v = _key_tile(K + hk * stride_kh, V + hk * stride_vh, stride_kt, stride_vt, n_start,
                                       seg_hi, offs_d, 1, BLOCK_N)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        diag_hi = tl.minimum(n_start + BLOCK_N, seg_hi)
        for g in range(GROUP):
            h = hk * GROUP + g
            Q_h = Q + h * stride_qh
            DO_h = DO + h * stride_doh
            LSE_h = LSE + h * stride_lh
            DELTA_h = DELTA + h * stride_lh
            # queries of the block's own segment: the diagonal (causal), then every later row
            dk, dv = _dkdv_queries(dk, dv, k, v, offs_n, n_ok, offs_d, Q_h, DO_h, LSE_h, DELTA_h,
                                   stride_qt, stride_dot, n_start, diag_hi, qk_scale, 2, BLOCK_M, DOT_PREC)
            dk, dv = _dkdv_queries(dk, dv, k, v, offs_n, n_ok, offs_d, Q_h, DO_h, LSE_h, DELTA_h,
                                   stride_qt, stride_dot, n_start + BLOCK_N, seg_hi, qk_scale, 0, BLOCK_M,
                                   DOT_PREC)
            # every query of each segment whose prefix range overlaps this segment
            for i in range(view_lo, view_hi):
                t_lo, t_hi, pre_lo, pre_hi = _segment(CU, PSTART, PLEN, tl.load(VIEW_SEG + i))
                key_ok = n_ok & (offs_n >= pre_lo) & (offs_n < pre_hi)
                overlaps = (pre_lo < n_start + BLOCK_N) & (pre_hi > n_start)
                t_hi = tl.where(overlaps, t_hi, t_lo)  # no query loop when the range misses the block
                dk, dv = _dkdv_queries(dk, dv, k, v, offs_n, key_ok, offs_d, Q_h, DO_h, LSE_h, DELTA_h,
                                       stride_qt, stride_dot, t_lo, t_hi, qk_scale, 1, BLOCK_M, DOT_PREC)
        k_rows = offs_n.to(tl.int64)[:, None]
        tl.store(DK + hk * stride_dkh + k_rows * stride_dkt + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=n_ok[:, None])
        tl.store(DV + hk * stride_dvh + k_rows * stride_dvt + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=n_ok[:, None])


# --------------------------------------------------------------------------------------------
# Block sizes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionBlocks:
    """Tile sizes and launch settings. fwd/dq tiles: BLOCK_M queries x BLOCK_N keys, with
    fwd_m % fwd_n == 0 and dq_m % dq_n == 0; dkdv tiles: dkv_n keys per program x dkv_m queries."""

    fwd_m: int = 128
    fwd_n: int = 64
    dq_m: int = 64
    dq_n: int = 64
    dkv_m: int = 64
    dkv_n: int = 64
    fwd_warps: int = 4
    bwd_warps: int = 4
    num_stages: int = 2

    def as_list(self) -> list[int]:
        return list(astuple(self))


def default_blocks(head_dim: int) -> AttentionBlocks:
    """Sane starting points (untuned); under the Triton interpreter, small tiles for speed."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return AttentionBlocks(16, 16, 16, 16, 16, 16, 1, 1, 1)
    if head_dim <= 64:
        return AttentionBlocks(128, 64, 64, 64, 32, 128, 4, 4, 3)
    if head_dim <= 128:
        return AttentionBlocks(128, 64, 64, 64, 64, 64, 8, 8, 2)
    return AttentionBlocks(64, 32, 32, 32, 32, 32, 8, 8, 1)


# --------------------------------------------------------------------------------------------
# Host side: checks, viewer table, launchers
# --------------------------------------------------------------------------------------------
def _check(q, k, v, cu_seqlens, prefix_start, prefix_len):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("attention: q, k, v must be [T, H, D]")
    T, Hq, D = q.shape
    if k.shape != v.shape or k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"attention: {Hq} query heads is not a multiple of {k.shape[1]} kv heads")
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"attention kernel: head dim must be a power of two in 16..256, got {D}")
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention kernel: q, k, v must share one dtype of {_SUPPORTED_DTYPES}")
    S = cu_seqlens.numel() - 1
    if S < 0 or prefix_start.numel() != S or prefix_len.numel() != S:
        raise ValueError("attention: cu_seqlens must have S + 1 entries and prefix_start / prefix_len S")


def _meta(x: torch.Tensor, device) -> torch.Tensor:
    return x.to(device=device, dtype=torch.int32).contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (tf32 would lose to the fp32 reference); others ignore it
    return "ieee" if dtype == torch.float32 else "tf32"


def _forward(q, k, v, cu_seqlens, prefix_start, prefix_len, max_seqlen, scale, blocks):
    b = AttentionBlocks(*blocks)
    assert b.fwd_m % b.fwd_n == 0, "fwd_m must be a multiple of fwd_n"
    T, Hq, D = q.shape
    q, k, v = rowmajor(q), rowmajor(k), rowmajor(v)
    cu, ps, pl = (_meta(x, q.device) for x in (cu_seqlens, prefix_start, prefix_len))
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    lse = torch.full((Hq, T), float("-inf"), dtype=torch.float32, device=q.device)
    S = cu.numel() - 1
    if S == 0 or T == 0:
        return out, lse
    grid_m = triton.cdiv(max(int(max_seqlen), 1), b.fwd_m)
    _attn_fwd_kernel[(S * grid_m, Hq)](
        q, k, v, out, lse, cu, ps, pl,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        scale * LOG2E, grid_m,
        GROUP=Hq // k.shape[1], HEAD_DIM=D, BLOCK_M=b.fwd_m, BLOCK_N=b.fwd_n,
        DOT_PREC=_dot_precision(q.dtype), num_warps=b.fwd_warps, num_stages=b.num_stages,
    )
    return out, lse


def _build_viewers(cu: np.ndarray, pstart: np.ndarray, plen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR (ptr [S+1], seg [nnz]): for each segment s, the segments t whose prefix range
    [pstart[t], pstart[t]+plen[t]) overlaps the rows of s (the suffixes of a prefix). O(S + nnz) ints."""
    S = plen.shape[0]
    viewers = np.nonzero(plen > 0)[0]
    lo, hi = pstart[viewers], pstart[viewers] + plen[viewers]
    # segment s overlaps [lo, hi) iff cu[s+1] > lo and cu[s] < hi
    first = np.searchsorted(cu[1:], lo, side="right")
    last = np.searchsorted(cu[:-1], hi, side="left")
    counts = np.maximum(last - first, 0)
    nnz = int(counts.sum())
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    owner = np.repeat(first, counts) + (np.arange(nnz) - starts)
    viewer = np.repeat(viewers, counts)
    order = np.argsort(owner, kind="stable")
    ptr = np.zeros(S + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner, minlength=S)[:S], out=ptr[1:])
    seg = viewer[order] if nnz else np.zeros(1, dtype=np.int64)  # never an empty device tensor
    return ptr.astype(np.int32), seg.astype(np.int32)


_VIEWER_CACHE: list = []  # [(weakrefs, versions, (ptr, seg))], most recent first
_VIEWER_CACHE_SIZE = 8


def _tensor_version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter
        return None


def _viewer_table(cu_seqlens, prefix_start, prefix_len, device):
    """The viewer CSR on `device`; one host read of the metadata per distinct metadata tensors."""
    metas = (cu_seqlens, prefix_start, prefix_len)
    versions = tuple(_tensor_version(t) for t in metas)
    for refs, vers, table in _VIEWER_CACHE:
        if vers == versions and all(r() is t for r, t in zip(refs, metas)) and table[0].device == device:
            return table
    host = torch.cat([x.reshape(-1).to(torch.int64) for x in metas]).cpu().numpy()
    S = prefix_len.numel()
    ptr, seg = _build_viewers(host[: S + 1], host[S + 1 : 2 * S + 1], host[2 * S + 1 :])
    table = (torch.from_numpy(ptr).to(device), torch.from_numpy(seg).to(device))
    _VIEWER_CACHE.insert(0, (tuple(weakref.ref(t) for t in metas), versions, table))
    del _VIEWER_CACHE[_VIEWER_CACHE_SIZE:]
    return table


def _backward(do, q, k, v, out, lse, dlse, cu_seqlens, prefix_start, prefix_len, max_seqlen, scale, blocks):
    b = AttentionBlocks(*blocks)
    assert b.dq_m % b.dq_n == 0, "dq_m must be a multiple of dq_n"
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    q, k, v, out, do = (rowmajor(x) for x in (q, k, v, out, do))
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
    dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
    dv = torch.zeros_like(v, memory_format=torch.contiguous_format)
    S = cu_seqlens.numel() - 1
    if S == 0 or T == 0:
        return dq, dk, dv
    cu, ps, pl = (_meta(x, q.device) for x in (cu_seqlens, prefix_start, prefix_len))
    lse = lse.contiguous()
    delta = torch.empty((Hq, T), dtype=torch.float32, device=q.device)
    has_dlse = dlse is not None
    dlse = dlse.to(torch.float32).contiguous() if has_dlse else delta
    block_t = 64
    _bwd_delta_kernel[(triton.cdiv(T, block_t), Hq)](
        out, do, dlse, delta, T,
        out.stride(0), out.stride(1), do.stride(0), do.stride(1), delta.stride(0),
        HAS_DLSE=has_dlse, HEAD_DIM=D, BLOCK_T=block_t,
    )
    group = Hq // Hkv
    prec = _dot_precision(q.dtype)
    qk_scale = scale * LOG2E
    grid_m = triton.cdiv(max(int(max_seqlen), 1), b.dq_m)
    _attn_bwd_dq_kernel[(S * grid_m, Hq)](
        q, k, v, do, dq, lse, delta, cu, ps, pl,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
        scale, qk_scale, grid_m,
        GROUP=group, HEAD_DIM=D, BLOCK_M=b.dq_m, BLOCK_N=b.dq_n, DOT_PREC=prec,
        num_warps=b.bwd_warps, num_stages=b.num_stages,
    )
    view_ptr, view_seg = _viewer_table(cu_seqlens, prefix_start, prefix_len, q.device)
    grid_n = triton.cdiv(max(int(max_seqlen), 1), b.dkv_n)
    _attn_bwd_dkdv_kernel[(S * grid_n, Hkv)](
        q, k, v, do, dk, dv, lse, delta, cu, ps, pl, view_ptr, view_seg,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
        scale, qk_scale, grid_n,
        GROUP=group, HEAD_DIM=D, BLOCK_M=b.dkv_m, BLOCK_N=b.dkv_n, DOT_PREC=prec,
        num_warps=b.bwd_warps, num_stages=b.num_stages,
    )
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile, with fake implementations) and autograd
# --------------------------------------------------------------------------------------------
@custom_op("attention_fwd")
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, prefix_start: torch.Tensor,
    prefix_len: torch.Tensor, max_seqlen: int, scale: float, blocks: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, cu_seqlens, prefix_start, prefix_len, max_seqlen, scale, blocks)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, cu_seqlens, prefix_start, prefix_len, max_seqlen, scale, blocks):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@custom_op("attention_bwd")
def attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dlse: Optional[torch.Tensor], cu_seqlens: torch.Tensor, prefix_start: torch.Tensor, prefix_len: torch.Tensor,
    max_seqlen: int, scale: float, blocks: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, out, lse, dlse, cu_seqlens, prefix_start, prefix_len, max_seqlen, scale, blocks)


@attention_bwd.register_fake
def _attention_bwd_fake(do, q, k, v, out, lse, dlse, cu_seqlens, prefix_start, prefix_len, max_seqlen, scale,
                        blocks):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, prefix_start, prefix_len, max_seqlen, scale, blocks):
        out, lse = attention_fwd(q, k, v, cu_seqlens, prefix_start, prefix_len, max_seqlen, scale, blocks)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, prefix_start, prefix_len)
        ctx.max_seqlen, ctx.scale, ctx.blocks = max_seqlen, scale, blocks
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_seqlens, prefix_start, prefix_len = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = attention_bwd(
            dout, q, k, v, out, lse, dlse, cu_seqlens, prefix_start, prefix_len, ctx.max_seqlen, ctx.scale,
            ctx.blocks,
        )
        return dq, dk, dv, None, None, None, None, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    prefix_start: torch.Tensor,
    prefix_len: torch.Tensor,
    max_seqlen: int,
    scale: float,
    *,
    blocks: Optional[AttentionBlocks] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix-shared varlen flash attention; the semantics of `reference.attention`.

    q: [T, Hq, D]; k, v: [T, Hkv, D] (Hq % Hkv == 0; D a power of two, 16..256), one dtype of
    float16 / bfloat16 / float32. cu_seqlens: int32 [S + 1] (non-decreasing); prefix_start,
    prefix_len: int32 [S]. max_seqlen: the longest segment (sizes the grid; a smaller value is slower,
    not wrong). Returns out [T, Hq, D] (dtype of q) and lse [Hq, T] float32 (natural log); rows in no
    segment get out 0 and lse -inf. Differentiable in q, k, v (and through lse).
    Precondition for the gradient of k, v: every row named by a prefix range lies in some segment.
    """
    _check(q, k, v, cu_seqlens, prefix_start, prefix_len)
    if blocks is None:
        blocks = default_blocks(q.shape[-1])
    return _AttentionFunction.apply(
        q, k, v, cu_seqlens, prefix_start, prefix_len, int(max_seqlen), float(scale), blocks.as_list()
    )


__all__ = ["AttentionBlocks", "attention", "attention_bwd", "attention_fwd", "default_blocks"]
