"""Tiny random checkpoints and a small chat tokenizer, made locally (no download).

Used by the tests, the README's scoring demo and `bench/throughput.py --cpu`. The checkpoints are
written by transformers itself (`*Config` -> `*ForSequenceClassification` / `*ForCausalLM` ->
`save_pretrained`), so loading them exercises the real loader on real files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

# ChatML, the template family of Qwen: <|im_start|>role\ncontent<|im_end|>\n
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_SEED_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "int main() { return 0; }\n",
    "public static void main(String[] args) { System.out.println(\"hi\"); }\n",
    "function sum(xs) { return xs.reduce((a, b) => a + b, 0); }\n",
    "fn main() { let x = vec![1, 2, 3]; }\n",
    "SELECT * FROM users WHERE id = ?;\n",
    "Write a function that returns the sum of a list of numbers.",
    "You are a helpful assistant that judges the quality of code.",
    "The quick brown fox jumps over the lazy dog. Efficient, readable and secure code.",
]


def build_tokenizer(out_dir: str | os.PathLike, corpus: Iterable[str] | None = None, vocab_size: int = 512):
    """Train a small byte-level BPE tokenizer with ChatML special tokens and a chat template,
    save it with `save_pretrained` to out_dir and return it (a PreTrainedTokenizerFast)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) if corpus is not None else _SEED_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def hf_config(
    family: str = "qwen3",
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 128,
    num_labels: int = 1,
    criteria: list[str] | None = None,
    tie_word_embeddings: bool = False,
    rope_scaling: dict | None = None,
    pad_token_id: int = 0,
):
    """A transformers config of a tiny model of `family` (qwen3, qwen2, llama)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max(4096, (rope_scaling or {}).get("original_max_position_embeddings", 0) * 2),
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=pad_token_id,
        eos_token_id=2,
        bos_token_id=None,
    )
    if criteria is not None:
        kwargs["id2label"] = dict(enumerate(criteria))
        kwargs["label2id"] = {c: i for i, c in enumerate(criteria)}
    else:
        kwargs["num_labels"] = num_labels
    if family == "qwen3":
        cls = Qwen3Config
        kwargs["head_dim"] = head_dim
    elif family == "qwen2":
        cls = Qwen2Config
        assert hidden_size == num_heads * head_dim, "qwen2 derives head_dim from hidden_size"
    elif family == "llama":
        cls = LlamaConfig
        kwargs["head_dim"] = head_dim
    else:
        raise ValueError(f"unknown family {family!r}")
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling:
        rope = dict(rope_scaling, rope_theta=10000.0)
    kwargs["rope_parameters"] = rope
    return cls(**kwargs)


def build_checkpoint(
    out_dir: str | os.PathLike,
    head: str = "classifier",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer_dir: str | os.PathLike | None = None,
    **config_kwargs,
) -> Path:
    """Write a random tiny checkpoint with transformers' own save_pretrained.

    head: "classifier" (*ForSequenceClassification) or "causal" (*ForCausalLM). Weights are drawn
    with a wider spread than HF's init (and non-unit norm weights), so that a wrong op shows in the
    scores. tokenizer_dir: copy that tokenizer's files in beside the weights.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = hf_config(**config_kwargs)
    torch.manual_seed(seed)
    auto = AutoModelForSequenceClassification if head == "classifier" else AutoModelForCausalLM
    model = auto.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.1))
    model = model.to(dtype)
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))
    return out
