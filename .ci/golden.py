"""Record scores, training losses and evaluation outputs on fixed tiny inputs, to show that a refactor
changes no behaviour on the CPU: run it before and after, then compare the two folders.

    python .ci/golden.py /tmp/before            # on the commit before the change
    python .ci/golden.py /tmp/after             # on the change
    python .ci/golden.py --compare /tmp/before /tmp/after     # "DIFFER: none (17 items compared)"

Recorded: the scores of score / score_pairs / score_groups / score_token_groups / a truncating
scorer (sha256 of the float32 bytes), the per-step metrics of two short demo trainings (criteria and
scalar heads; timings left out), and results.json / scores.parquet of two evaluations (the random
checkpoint, and the first training's export). Bit-identical only on the same torch build and CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import torch

WORDS = "def return for while if else int main print list sum value index buffer query user input sort".split()
LANGUAGES = ["python", "java", "cpp", "go"]


def _record_scores(out: Path, work: Path, record: dict) -> tuple[Path, Path]:
    """Scores of a tiny random checkpoint into `record`; -> (the checkpoint, a CRB file of 30 rows)."""
    import themis_engine as te
    from themis_engine.testing import build_checkpoint, build_tokenizer

    tok = work / "tok"
    build_tokenizer(tok)
    ckpt = build_checkpoint(work / "rm", tokenizer_dir=tok, family="qwen3", criteria=list(te.DEFAULT_CRITERIA),
                            hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    rng = random.Random(7)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    prompts = [text(3, 30) for _ in range(12)]
    chosen = [text(1, 40) for _ in range(12)]
    rejected = [text(1, 40) for _ in range(12)]

    def put(name, t):
        t = t.detach().cpu().contiguous()
        record[name] = hashlib.sha256(t.numpy().tobytes()).hexdigest()
        torch.save(t, out / f"{name}.pt")

    scorer = te.Scorer.from_pretrained(ckpt, device="cpu", max_tokens_per_batch=512)
    convs = [[{"role": "user", "content": p}, {"role": "assistant", "content": c}] for p, c in zip(prompts, chosen)]
    put("score", scorer.score(convs))
    c, r = scorer.score_pairs(prompts, chosen, rejected, system="You judge code.")
    put("pairs_c", c)
    put("pairs_r", r)
    groups = [[chosen[i], rejected[i], chosen[i + 1]] for i in range(4)]
    for i, x in enumerate(scorer.score_groups(prompts[:4], groups)):
        put(f"group{i}", x)
    prefix = scorer.tokenizer(prompts[:3], add_special_tokens=False)["input_ids"]
    suffix = scorer.tokenizer(chosen[:6], add_special_tokens=False)["input_ids"]
    for i, x in enumerate(scorer.score_token_groups(prefix, [suffix[0:2], suffix[2:4], suffix[4:6]])):
        put(f"tokgroup{i}", x)
    put("trunc", te.Scorer.from_pretrained(ckpt, device="cpu", max_length=110).score(convs))
    rows = [dict(id=f"r{i}", prompt=prompts[i % 12], chosen=chosen[i % 12], rejected=rejected[(i + 3) % 12],
                 aspect=te.DEFAULT_CRITERIA[i % 5], language=LANGUAGES[i % 4], subset=f"s{i % 2}") for i in range(30)]
    crb = work / "crb.jsonl"
    crb.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return ckpt, crb


def _losses(metrics: Path) -> list[dict]:
    timing = ("time", "per_s", "sec", "elapsed", "mfu", "tokens_per")
    return [{k: v for k, v in json.loads(line).items() if not any(s in k for s in timing)}
            for line in metrics.read_text().splitlines()]


def _run(*args: str) -> None:
    subprocess.run([sys.executable, "-m", *args], check=True, env=dict(os.environ, PYTHONHASHSEED="0"))


def record(out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    work = out / "work"
    work.mkdir(parents=True)
    rec: dict = {}
    ckpt, crb = _record_scores(out, work, rec)
    demo = ("--preset", "demo", "--data.synthetic_pairs=240", "--run.progress=false")
    _run("themis_engine.train", *demo, "--run.max_steps=5", f"--run.output={out / 'train'}",
         "--run.checkpoint_every=0")
    (out / "losses.json").write_text(json.dumps(_losses(out / "train" / "metrics.jsonl"), indent=1, sort_keys=True))
    _run("themis_engine.train", *demo, "--objective.heads=scalar", "--run.max_steps=4",
         f"--run.output={out / 'train_scalar'}", "--run.export=false")
    scalar = _losses(out / "train_scalar" / "metrics.jsonl")
    (out / "losses_scalar.json").write_text(json.dumps(scalar, indent=1, sort_keys=True))
    _run("themis_engine.eval", str(ckpt), "--data", str(crb), "--output", str(out / "eval"), "--use-aspect-prompts",
         "--chunk-size", "7", "--progress=false")
    _run("themis_engine.eval", str(out / "train" / "export"), "--data", str(crb), "--output",
         str(out / "eval_trained"), "--head", "0", "--progress=false")
    for name in ("eval", "eval_trained"):
        for f in ("results.json", "scores.parquet"):
            rec[f"{name}/{f}"] = hashlib.sha256((out / name / f).read_bytes()).hexdigest()
    (out / "record.json").write_text(json.dumps(rec, indent=1, sort_keys=True))
    print(f"recorded {len(rec) + 2} items in {out}")


def compare(a: Path, b: Path) -> int:
    ra, rb = (json.loads((d / "record.json").read_text()) for d in (a, b))
    bad = [k for k in ra if ra[k] != rb.get(k)]
    for f in ("losses.json", "losses_scalar.json"):
        la, lb = (json.loads((d / f).read_text()) for d in (a, b))
        if [{k: v for k, v in d.items() if not k.endswith("_s")} for d in la] != \
                [{k: v for k, v in d.items() if not k.endswith("_s")} for d in lb]:
            bad.append(f)
    print("DIFFER:", bad if bad else "none", f"({len(ra) + 2} items compared)")
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--compare":
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    record(Path(sys.argv[1]))
