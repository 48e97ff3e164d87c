"""The reward model: one generic decoder (embeddings -> N blocks -> final norm -> reward head) that
runs on the packed, prefix-shared token stream of ARCHITECTURE.md section 3.

Module and parameter names follow Hugging Face (`model.layers.0.self_attn.q_proj.weight`,
`score.weight`, `lm_head.weight`), so a checkpoint's tensors map onto it one to one.
Every op goes through `themis_engine.kernels`, which picks Triton or the reference.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from themis_engine import kernels
from themis_engine.model.args import ModelArgs, rope_inv_freq
from themis_engine.packing.batch import SegmentMeta


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return kernels.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hd, nq, nkv = args.head_dim, args.num_heads, args.num_kv_heads
        self.num_heads, self.num_kv_heads, self.head_dim = nq, nkv, hd
        self.q_proj = nn.Linear(args.hidden_size, nq * hd, bias=args.attention_bias)
        self.k_proj = nn.Linear(args.hidden_size, nkv * hd, bias=args.attention_bias)
        self.v_proj = nn.Linear(args.hidden_size, nkv * hd, bias=args.attention_bias)
        self.o_proj = nn.Linear(nq * hd, args.hidden_size, bias=args.o_bias)
        if args.spec.qk_norm:
            self.q_norm = RMSNorm(hd, args.rms_norm_eps)
            self.k_norm = RMSNorm(hd, args.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.scale = hd**-0.5

    def forward(self, x, position_ids, meta: SegmentMeta, inv_freq, rope_scaling):
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # Qwen3: per-head RMSNorm fused with the rotary embedding
            q = kernels.qk_norm_rope(q, self.q_norm.weight, self.q_norm.eps, position_ids, inv_freq, rope_scaling)
            k = kernels.qk_norm_rope(k, self.k_norm.weight, self.k_norm.eps, position_ids, inv_freq, rope_scaling)
        else:
            q = kernels.rope(q, position_ids, inv_freq, rope_scaling)
            k = kernels.rope(k, position_ids, inv_freq, rope_scaling)
        out, _ = kernels.attention(
            q, k, v, meta.cu_seqlens, meta.prefix_start, meta.prefix_len, meta.max_seqlen, self.scale
        )
        return self.o_proj(out.reshape(T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x):
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, h, position_ids, meta, inv_freq, rope_scaling):
        """h: [T, hidden], the residual stream. Returns the new residual stream."""
        attn = self.self_attn(self.input_layernorm(h), position_ids, meta, inv_freq, rope_scaling)
        x, h = self.post_attention_layernorm(attn, residual=h)
        return h + self.mlp(x)


class Decoder(nn.Module):
    """Embeddings and blocks (HF's `model.*`); the final norm is applied by the caller, only at the
    positions it needs."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class RewardModel(nn.Module):
    """A decoder with a multi-criterion reward head `score: Linear(hidden, H, bias=False)`.

    `lm_head` is present only when it was loaded for the trainer's LM-regularisation loss (a
    *ForCausalLM checkpoint with keep_lm_head=True); with tied embeddings it shares
    `model.embed_tokens.weight`.
    """

    def __init__(self, args: ModelArgs, with_lm_head: bool = False):
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        self.score = nn.Linear(args.hidden_size, args.num_criteria, bias=False)
        self.lm_head = None
        if with_lm_head:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
            if args.tie_word_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq, self.rope_scaling = rope_inv_freq(args)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        """.to(dtype) / .half() / .bfloat16() cast every floating buffer; the rotary frequencies must
        stay float32 (a bf16 copy puts the angle at position 4000 off by radians): recomputed after."""
        out = super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and self.inv_freq.device.type != "meta":
            self.inv_freq = rope_inv_freq(self.args)[0].to(self.inv_freq.device)
        return out

    @property
    def criteria(self) -> list[str]:
        return list(self.args.criteria)

    @property
    def device(self) -> torch.device:
        return self.score.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.score.weight.dtype

    def hidden_states(self, input_ids, position_ids, meta: SegmentMeta) -> torch.Tensor:
        """The residual stream after the last block, [T, hidden] (before the final norm)."""
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h, position_ids, meta, self.inv_freq, self.rope_scaling)
        return h

    def forward(self, input_ids, position_ids, meta: SegmentMeta, score_index) -> torch.Tensor:
        """input_ids, position_ids: int64 [T]; meta: the stream's segments; score_index: int64 [N],
        the stream rows whose rewards are read (the last token of each scored sequence).
        Returns the rewards [N, H] in the model's dtype, one column per criterion."""
        h = self.hidden_states(input_ids, position_ids, meta)
        return kernels.score_head(h, score_index, self.model.norm.weight, self.score.weight, self.model.norm.eps)
