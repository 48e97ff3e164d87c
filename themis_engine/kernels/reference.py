"""Plain-PyTorch references: one per op.

Each function here is, at once, the CPU path of the engine, the oracle of the kernel tests and the
baseline of the kernel benchmarks. They are written to be obviously right, not fast: every loop is
over segments, every reduction is in float32 (or the dtype of the input when that is wider).

Shapes use T = tokens of the packed stream, Hq / Hkv = query / key-value heads, D = head dim,
N = pairs (or scored sequences), H = criteria (reward heads), V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (the tests' oracle); everything else accumulates in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Attention over the packed, prefix-shared stream
# --------------------------------------------------------------------------------------------
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
    """Prefix-shared varlen attention, the mask of ARCHITECTURE.md section 3.

    q: [T, Hq, D]; k, v: [T, Hkv, D] with Hq % Hkv == 0 (GQA: query head h reads kv head
    h // (Hq // Hkv)). cu_seqlens: int32 [S + 1], segment s is the rows cu_seqlens[s] ..
    cu_seqlens[s+1]-1 of the stream. prefix_start, prefix_len: int32 [S]; a segment with
    prefix_len[s] > 0 (a suffix) also sees the rows prefix_start[s] .. prefix_start[s]+prefix_len[s]-1
    (its group's prefix) in full. Within the segment the mask is causal:

        keys ->      prefix P        segment s
        query i   [ 1 1 1 1 1 1 | 1 0 0 0 ]      (i = first row of s)
        query i+1 [ 1 1 1 1 1 1 | 1 1 0 0 ]
        ...

    max_seqlen: the longest segment (unused here; kept for the kernels' signature).
    Returns out [T, Hq, D] (dtype of q) and lse [Hq, T] (float32, natural log of the softmax
    denominator of the scaled scores), which the backward pass of a kernel needs.
    Rows not covered by any segment are left zero (out) and -inf (lse).
    """
    del max_seqlen
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv != 0:
        raise ValueError(f"attention: {Hq} query heads is not a multiple of {Hkv} kv heads")
    acc = _acc_dtype(q)
    group = Hq // Hkv
    out = torch.zeros_like(q)
    lse = torch.full((Hq, T), float("-inf"), dtype=torch.float32, device=q.device)
    bounds = cu_seqlens.tolist()
    pstart = prefix_start.tolist()
    plen = prefix_len.tolist()
    for s in range(len(bounds) - 1):
        a, b = bounds[s], bounds[s + 1]
        n = b - a
        if n == 0:
            continue
        kv_rows = torch.arange(a, b, device=q.device)
        p = plen[s]
        if p > 0:
            kv_rows = torch.cat([torch.arange(pstart[s], pstart[s] + p, device=q.device), kv_rows])
        qs = q[a:b].to(acc).transpose(0, 1)  # [Hq, n, D]
        ks = k[kv_rows].to(acc).repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, p+n, D]
        vs = v[kv_rows].to(acc).repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (qs @ ks.transpose(1, 2)) * scale  # [Hq, n, p+n]
        i = torch.arange(n, device=q.device)[:, None]
        j = torch.arange(p + n, device=q.device)[None, :]
        visible = (j < p) | (j - p <= i)  # whole prefix, then causal within the segment
        scores = scores.masked_fill(~visible, float("-inf"))
        seg_lse = torch.logsumexp(scores, dim=-1)  # [Hq, n]
        probs = torch.exp(scores - seg_lse[..., None])
        out[a:b] = (probs @ vs).transpose(0, 1).to(q.dtype)
        lse[:, a:b] = seg_lse.float()
    return out, lse


# --------------------------------------------------------------------------------------------
# Decoder block ops (Hugging Face numerics: statistics in float32, products in the input dtype)
# --------------------------------------------------------------------------------------------
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim: weight * (x / sqrt(mean(x^2) + eps)).

    With `residual`, first h = x + residual, then returns (rms_norm(h), h): the fused
    "add the block output to the residual stream, then normalise" of a pre-norm decoder.
    Statistics in float32; the normalised value is cast back to x.dtype before the weight
    multiply, as transformers' Qwen3/Llama RMSNorm does.
    """
    if residual is not None:
        h = x + residual
        return rms_norm(h, weight, eps), h
    xf = x.to(_acc_dtype(x))
    var = xf.pow(2).mean(-1, keepdim=True)
    y = (xf * torch.rsqrt(var + eps)).to(x.dtype)
    return weight * y


def rope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, D] for the rotate-half (non-interleaved) RoPE layout, computed in float32 and
    cast to `dtype` (transformers' order of operations)."""
    freqs = position_ids.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]  # [T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def rope(
    x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0
) -> torch.Tensor:
    """Rotary embedding of x [T, H, D] at the packed position_ids [T] (rotate-half layout)."""
    cos, sin = rope_cos_sin(position_ids, inv_freq, attention_scaling, x.dtype)
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def qk_norm_rope(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
) -> torch.Tensor:
    """Qwen3's per-head q/k RMSNorm (over D of x [T, H, D]) followed by the rotary embedding."""
    return rope(rms_norm(x, norm_weight, eps), position_ids, inv_freq, attention_scaling)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise (the MLP activation of Qwen/Llama)."""
    return F.silu(gate) * up


def score_head(
    hidden: torch.Tensor, score_index: torch.Tensor, norm_weight: torch.Tensor, head_weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """The reward model's last step: the final RMSNorm at the score rows, then the reward head.

    hidden: [T, D], the residual stream after the last block; score_index: int64 [N], the rows whose
    rewards are read; norm_weight: [D]; head_weight: [H, D] (no bias). Returns [N, H] in the dtype of
    the product (the model's dtype): F.linear(rms_norm(hidden[score_index], norm_weight, eps), head_weight).
    """
    return F.linear(rms_norm(hidden[score_index], norm_weight, eps), head_weight)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------
@dataclass
class BTOutput:
    """What the Bradley-Terry loss returns. loss is a 0-dim float32 tensor; the rest are detached."""

    loss: torch.Tensor  # [] = bt + mu * magnitude
    bt_loss: torch.Tensor  # [] the Bradley-Terry part (already divided by the normaliser)
    magnitude_loss: torch.Tensor  # [] the magnitude part, before mu (divided by the normaliser)
    reward_chosen: torch.Tensor  # [N, H] float32
    reward_rejected: torch.Tensor  # [N, H] float32
    accuracy: torch.Tensor  # [H] fraction of labelled pairs with r_c > r_r (NaN where none)
    mean_margin: torch.Tensor  # [H] mean of r_c - r_r over labelled pairs (NaN where none)
    count: torch.Tensor  # [H] labelled pairs per criterion


MAGNITUDE_FORMS = ("centering", "abs")


def bt_loss(
    hidden_chosen: torch.Tensor,
    hidden_rejected: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    margin: torch.Tensor | None = None,
    mu: float = 0.0,
    magnitude: str = "centering",
    normalizer: float | None = None,
) -> BTOutput:
    """Multi-head Bradley-Terry loss.

    hidden_chosen, hidden_rejected: [N, D] hidden states at the score positions; weight: [H, D]
    (the reward head); mask: [N, H] bool, which criteria each pair is labelled for; margin: [N, H]
    or None. With r = hidden @ weight.T (float32) and d = r_c - r_r - margin:

        loss = (sum_{labelled} -log sigmoid(d) + mu * sum_{labelled} m(r_c, r_r)) / normalizer

    m = (r_c + r_r)^2 for magnitude="centering", (|r_c| + |r_r|)^2 for "abs". normalizer defaults
    to the number of labelled (pair, criterion) cells; pass the global count so that micro-batches
    of one global batch sum to the whole batch's loss. -log sigmoid(d) = softplus(-d), stable at
    any |d|.
    """
    if magnitude not in MAGNITUDE_FORMS:
        raise ValueError(f"bt_loss: magnitude must be one of {MAGNITUDE_FORMS}, got {magnitude!r}")
    acc = _acc_dtype(hidden_chosen)
    w = weight.to(acc)
    rc = hidden_chosen.to(acc) @ w.T
    rr = hidden_rejected.to(acc) @ w.T
    m = mask.to(acc)
    diff = rc - rr
    d = diff - margin.to(acc) if margin is not None else diff
    if normalizer is None:
        normalizer = float(mask.sum())
    norm = max(float(normalizer), 1.0)
    bt = (F.softplus(-d) * m).sum() / norm
    if magnitude == "centering":
        mag_cells = (rc + rr).pow(2)
    else:
        mag_cells = (rc.abs() + rr.abs()).pow(2)
    mag = (mag_cells * m).sum() / norm
    loss = bt + mu * mag
    with torch.no_grad():
        count = m.sum(0)
        accuracy = ((diff > 0).to(acc) * m).sum(0) / count
        mean_margin = (diff * m).sum(0) / count
    return BTOutput(
        loss=loss.float() if acc != torch.float64 else loss,
        bt_loss=bt.detach(),
        magnitude_loss=mag.detach(),
        reward_chosen=rc.detach().float(),
        reward_rejected=rr.detach().float(),
        accuracy=accuracy.float(),
        mean_margin=mean_margin.float(),
        count=count.float(),
    )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    normalizer: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of the logits hidden @ weight.T against labels, without a bias.

    hidden: [T, D]; weight: [V, D] (the LM head); labels: [T] int64, `ignore_index` rows skipped.
    Returns sum of the per-token losses / normalizer (default: the number of non-ignored labels),
    a 0-dim float32 tensor. This reference builds the full [T, V] logits; the kernel must not.
    """
    acc = _acc_dtype(hidden)
    logits = hidden.to(acc) @ weight.to(acc).T
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if normalizer is None:
        normalizer = float((labels != ignore_index).sum())
    return total / max(float(normalizer), 1.0)
