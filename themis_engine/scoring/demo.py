"""`python -m themis_engine.scoring.demo`: score code-preference pairs with a tiny random reward model.

Runs anywhere (CPU, no network): it makes a small tokenizer and a random 5-criterion Qwen3
checkpoint with transformers, loads it with the engine, scores a few (prompt, chosen, rejected)
pairs with the prompt shared in the forward pass, and checks the scores against transformers
on the same checkpoint. (The trainer's demo will replace this as the main job.)
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

import themis_engine as te
from themis_engine.config import ConfigError, option, parse_args
from themis_engine.testing.tiny import build_checkpoint, build_tokenizer

PAIRS = [
    (
        "Write a Python function that returns the sum of a list.",
        "def total(xs):\n    return sum(xs)\n",
        "def total(xs):\n    s = 0\n    for i in range(len(xs) + 1):\n        s += xs[i]\n    return s\n",
    ),
    (
        "Look up a user by name in SQLite.",
        "cur.execute('SELECT * FROM users WHERE name = ?', (name,))\n",
        "cur.execute(\"SELECT * FROM users WHERE name = '\" + name + \"'\")\n",
    ),
    (
        "Check whether a number is in a large list many times.",
        "allowed = set(xs)\nhits = [q for q in queries if q in allowed]\n",
        "hits = [q for q in queries if q in xs]\n",
    ),
]


@dataclass
class DemoConfig:
    """Score a few code-preference pairs."""

    model: Optional[str] = option(None, "a local HF reward-model folder (default: a tiny random one, checked "
                                  "against transformers)")
    device: Optional[str] = option(None, "cpu, cuda, cuda:N (default: cuda where present)")


def main(argv=None) -> int:
    try:
        opt = parse_args(DemoConfig, argv, prog="python -m themis_engine.scoring.demo",
                         description=(__doc__ or "").split("\n\n")[0])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        path = opt.model
        if path is None:
            tok_dir = Path(tmp) / "tokenizer"
            build_tokenizer(tok_dir)
            path = build_checkpoint(
                Path(tmp) / "tiny-rm", family="qwen3", criteria=list(te.DEFAULT_CRITERIA),
                hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, tokenizer_dir=tok_dir,
            )
            print(f"made a tiny random Qwen3 reward model with {len(te.DEFAULT_CRITERIA)} heads at {path}")
        scorer = te.Scorer.from_pretrained(path, device=opt.device)
        prompts, chosen, rejected = (list(x) for x in zip(*PAIRS))
        t0 = time.perf_counter()
        c, r = scorer.score_pairs(prompts, chosen, rejected, system="You judge code quality.")
        dt = time.perf_counter() - t0
        rep = scorer.last_report
        print(f"criteria: {', '.join(scorer.criteria)}")
        for i, prompt in enumerate(prompts):
            print(f"pair {i}: {prompt}")
            print("  chosen   " + " ".join(f"{v:+.4f}" for v in c[i].tolist()))
            print("  rejected " + " ".join(f"{v:+.4f}" for v in r[i].tolist()))
        print(
            f"scored {rep.sequences} sequences in {dt:.3f}s: {rep.tokens_computed} tokens computed for "
            f"{rep.tokens_standalone} standalone ({rep.tokens_standalone / rep.tokens_computed:.2f}x from prefix "
            f"sharing), {rep.micro_batches} micro-batch(es)"
        )
        if opt.model is None:
            from transformers import AutoModelForSequenceClassification

            hf = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32).eval()
            worst = 0.0
            for i in range(len(prompts)):
                for resp, ours in ((chosen[i], c[i]), (rejected[i], r[i])):
                    conv = [{"role": "system", "content": "You judge code quality."},
                            {"role": "user", "content": prompts[i]}, {"role": "assistant", "content": resp}]
                    text = scorer.tokenizer.apply_chat_template(conv, tokenize=False)
                    ids = scorer.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
                    with torch.no_grad():
                        ref = hf(ids.to(hf.device)).logits[0].float().cpu()
                    worst = max(worst, (ref - ours).abs().max().item())
            ok = worst < 1e-4 if scorer.model.dtype == torch.float32 else worst < 5e-2
            print(f"transformers on the same checkpoint: max |difference| {worst:.2e} -> {'OK' if ok else 'MISMATCH'}")
            return 0 if ok else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
