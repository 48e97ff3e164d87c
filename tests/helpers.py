"""Shared test fixtures' building blocks: tiny checkpoints, a tokenizer, conversations."""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

import torch

from themis_engine.testing.tiny import build_checkpoint, build_tokenizer

WORDS = (
    "def return for while if else int main print list sum value index buffer query user input "
    "sort fast slow memory leak secure inject sanitize readable name loop array map"
).split()


def random_text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def conversation(prompt: str, response: str, system: str | None = None) -> list[dict]:
    conv = [{"role": "system", "content": system}] if system else []
    return conv + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


@lru_cache(maxsize=None)
def tokenizer_dir(root: str) -> Path:
    path = Path(root) / "tokenizer"
    build_tokenizer(path)
    return path


def make_checkpoint(root: Path, name: str, **kwargs) -> Path:
    tok = tokenizer_dir(str(root))
    return build_checkpoint(root / name, tokenizer_dir=tok, **kwargs)


def hf_scores(model_dir: Path, token_ids: list[list[int]]) -> torch.Tensor:
    """transformers' AutoModelForSequenceClassification on each sequence alone, float32 [N, H]."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for ids in token_ids:
            rows.append(model(torch.tensor([ids])).logits[0].float())
    return torch.stack(rows)
