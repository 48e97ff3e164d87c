"""Model shapes: one generic decoder, a small table of per-family settings, a table of named shapes.

`ModelArgs.from_hf_config(dict)` reads a Hugging Face `config.json`; `ModelArgs.from_name("qwen3-8b")`
gives a built-in shape (for benchmarks: no download).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

# The five criteria of the Themis work, spelled as CodeRewardBench spells its aspects.
DEFAULT_CRITERIA = (
    "Functional_Correctness",
    "Runtime_Efficiency",
    "Memory_Efficiency",
    "Readability_Maintainability",
    "Security_Hardness",
)


@dataclass(frozen=True)
class Family:
    """What differs between the supported decoder families."""

    name: str  # the HF model_type
    hf_prefix: str  # class-name prefix: Qwen3ForSequenceClassification, ...
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE (Qwen3)
    qkv_bias: bool  # bias on q/k/v projections (Qwen2); Llama reads `attention_bias` instead


FAMILIES = {
    "qwen3": Family("qwen3", "Qwen3", qk_norm=True, qkv_bias=False),
    "qwen2": Family("qwen2", "Qwen2", qk_norm=False, qkv_bias=True),
    "llama": Family("llama", "Llama", qk_norm=False, qkv_bias=False),
}
HEAD_KINDS = ("ForSequenceClassification", "ForCausalLM")
SUPPORTED_ARCHITECTURES = tuple(f.hf_prefix + kind for f in FAMILIES.values() for kind in HEAD_KINDS)
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelArgs:
    family: str = "qwen3"
    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_layers: int = 28
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": ..., ...} or None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v (and o, for Llama) projection biases
    o_bias: bool = False
    mlp_bias: bool = False
    criteria: tuple[str, ...] = ("reward",)  # one name per reward head
    pad_token_id: int | None = None
    hf_config: dict = field(default_factory=dict, repr=False)  # the source config.json, kept for export

    @property
    def num_criteria(self) -> int:
        return len(self.criteria)

    @property
    def spec(self) -> Family:
        return FAMILIES[self.family]

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelArgs":
        key = name.lower()
        if key not in NAMED_SHAPES:
            raise ValueError(f"unknown model shape {name!r}; known: {', '.join(NAMED_SHAPES)}")
        return replace(NAMED_SHAPES[key], **overrides)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArgs":
        model_type = cfg.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        fam = FAMILIES[model_type]
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or hidden // heads
        theta, scaling = _rope_settings(cfg)
        attention_bias = fam.qkv_bias or bool(cfg.get("attention_bias", False))
        pad = cfg.get("pad_token_id")
        return cls(
            family=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            # Llama's attention_bias covers o_proj too; Qwen2 has biases on q/k/v only
            o_bias=model_type == "llama" and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            criteria=criteria_from_config(cfg),
            pad_token_id=int(pad) if isinstance(pad, int) else None,
            hf_config=dict(cfg),
        )

    def to_hf_config(self, architecture: str = "ForSequenceClassification") -> dict[str, Any]:
        """A config.json dict for transformers, keeping every field of the source config."""
        cfg = dict(self.hf_config)
        cfg.update(
            model_type=self.family,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act=cfg.get("hidden_act", "silu"),
        )
        if self.family == "llama":
            cfg["attention_bias"] = self.attention_bias
            cfg["mlp_bias"] = self.mlp_bias
        if "rope_parameters" in cfg or not ("rope_theta" in cfg or "rope_scaling" in cfg):
            params = dict(self.rope_scaling or {"rope_type": "default"})
            params["rope_theta"] = self.rope_theta
            cfg["rope_parameters"] = params
        cfg["architectures"] = [self.spec.hf_prefix + architecture]
        if architecture == "ForSequenceClassification":
            cfg["num_labels"] = self.num_criteria
            cfg["id2label"] = {str(i): name for i, name in enumerate(self.criteria)}
            cfg["label2id"] = {name: i for i, name in enumerate(self.criteria)}
            cfg["problem_type"] = "regression"
        if self.pad_token_id is not None:
            cfg["pad_token_id"] = self.pad_token_id
        return cfg


def criteria_from_config(cfg: dict[str, Any]) -> tuple[str, ...]:
    """Criteria names, one per head, from id2label (ordered by label id)."""
    id2label = cfg.get("id2label")
    if id2label:
        items = sorted(((int(i), str(name)) for i, name in id2label.items()), key=lambda t: t[0])
        return tuple(name for _, name in items)
    n = int(cfg.get("num_labels", 1))
    return tuple(f"LABEL_{i}" for i in range(n))


def _rope_settings(cfg: dict[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from a transformers 4.x (rope_theta + rope_scaling) or
    5.x (rope_parameters) config."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    scaling = dict(params) if isinstance(params, dict) else dict(cfg.get("rope_scaling") or {})
    theta = scaling.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return float(theta), None
    scaling["rope_type"] = rope_type
    return float(theta), scaling


def rope_inv_freq(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """inv_freq [head_dim/2] float32 and the attention scaling, as transformers computes them."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq, 1.0
    rope_type = scaling["rope_type"]
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor, 1.0
    # llama3: low frequencies divided by `factor`, high ones kept, a smooth blend between
    low_ff = float(scaling.get("low_freq_factor", 1.0))
    high_ff = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


def _qwen3(hidden, inter, layers, heads, kv, tie) -> ModelArgs:
    return ModelArgs(
        family="qwen3",
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=tie,
        criteria=DEFAULT_CRITERIA,
        pad_token_id=151643,
    )


# The Qwen3 dense family (shapes from the released configs).
NAMED_SHAPES: dict[str, ModelArgs] = {
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, 8, True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, 8, True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, 8, True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, 8, False),
    "qwen3-14b": _qwen3(5120, 17408, 40, 40, 8, False),
    "qwen3-32b": _qwen3(5120, 25600, 64, 64, 8, False),
    # Small Qwen3-shaped decoders trained from scratch on CPU (vocab, pad and heads come from the
    # trainer's tokenizer and criteria): "tiny" is the trainer's default, "demo" the demo preset's.
    "tiny": replace(_qwen3(128, 256, 2, 4, 2, False), head_dim=32),
    "demo": replace(_qwen3(96, 192, 2, 4, 2, False), head_dim=32),
}
