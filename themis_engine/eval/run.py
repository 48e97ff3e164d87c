"""`python -m themis_engine.eval MODEL --data FILE --output DIR`: the CodeRewardBench protocol.

Every row (id, prompt, chosen, rejected, aspect, language, subset) is scored twice, chosen and
rejected, with the prompt prefix computed once (Scorer.score_pairs); a row is correct when
score(chosen) > score(rejected) strictly. The outputs are those of the published CRB results
(evaluation/results.py): results.json and scores.parquet, plus report.md and report.png, and with
`--compare DIR...` a leaderboard of this run beside other result directories.

    python -m themis_engine.eval path/to/rm --data crb.parquet --output runs/rm --use-aspect-prompts
    python -m themis_engine.eval path/to/rm --data crb.jsonl --output runs/rm --resume \\
        --compare ../shared/data/crb-published-results
    torchrun --nproc_per_node 8 -m themis_engine.eval path/to/rm --data crb.parquet --output runs/rm

Rows are scored in chunks (--chunk-size pairs); each finished chunk is appended to
OUTPUT/partial/ (evaluation/partial.py), so `--resume` after an interruption scores only the rows
not yet finished, and the final files equal those of a run that was never interrupted. Under
torchrun (WORLD_SIZE > 1) row i belongs to rank i % WORLD_SIZE, each rank scores on its own
device (cuda:LOCAL_RANK where CUDA is present) and appends to its own partial file, and rank 0
merges them into the same files a single process writes. With several nodes, OUTPUT must be on a
file system every node sees.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal, Optional

import torch

from themis_engine import distributed
from themis_engine.config import ConfigError, option, parse_args
from themis_engine.data.prompts import CriteriaPrompts
from themis_engine.eval import report as reporting
from themis_engine.eval.partial import PartialStore, ResumeError, row_hash
from themis_engine.eval.results import compile_results, write_results_json, write_scores_parquet
from themis_engine.data.schemas import CRBRow as Pair, load_crb_rows as load_pairs
from themis_engine.errors import EvalError

logger = logging.getLogger("themis_engine")

OUTPUT_FILES = ("results.json", "scores.parquet", "report.md", "report.png")
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "auto": None}



@dataclass
class EvalConfig:
    """CodeRewardBench evaluation of a reward model."""

    model: str = option("", "the reward model: a local Hugging Face folder (config.json, *.safetensors, "
                        "tokenizer files)", positional=True)
    data: str = option("", "CRB rows (id, prompt, chosen, rejected, aspect, language, subset): a .jsonl, .json "
                       "or .parquet file, or a Hugging Face dataset id when `datasets` is installed")
    split: str = option("train", "the split to read when --data is a Hugging Face dataset id")
    output: str = option("", "output directory: results.json, scores.parquet, report.md, report.png, partial/")
    use_system_prompts: bool = option(False, "give every pair a system prompt listing all criteria")
    use_aspect_prompts: bool = option(False, "give every pair its own aspect's criterion prompt as the system "
                                      "prompt (wins over --use-system-prompts)")
    criteria_prompts: Optional[str] = option(None, "a JSON/YAML map {criterion: prompt text, optional \"ALL\": "
                                             "text} replacing the built-in prompts (criteria.py)")
    max_length: int = option(4096, "longest sequence (system + prompt + response, templated) in tokens")
    max_tokens_per_batch: Optional[int] = option(None, "token budget of one packed micro-batch (default: "
                                                 "16384, or the largest pair when that is larger)")
    on_overflow: Literal["truncate", "error"] = option("truncate", "a sequence over --max-length: truncate the "
                                                       "response (the template's closing tokens kept) or stop")
    head: str = option("auto", "which reward head scores a row: auto (a multi-head model: the head named like "
                       "the row's aspect; a one-head model: head 0), a head name, or a head index")
    limit: Optional[int] = option(None, "evaluate only the first N rows")
    device: Optional[str] = option(None, "cpu, cuda, cuda:N (default: cuda where present; under torchrun "
                                   "cuda:LOCAL_RANK)")
    dtype: Optional[str] = option(None, "float32, bfloat16 or float16 (default: bfloat16 on CUDA, else the "
                                  "checkpoint's dtype)")
    resume: bool = option(False, "keep the rows an interrupted run in --output finished; score only the rest")
    chunk_size: int = option(256, "pairs scored between two saves of the partial results")
    compare: list[str] = option([], "result directories to rank this run against (each holding a results.json, "
                                "or sub-directories that do), e.g. the published crb-published-results; its values run to the next --flag, "
                                "so give MODEL before it")
    name: Optional[str] = option(None, "this run's name in the report and leaderboard (default: the model "
                                 "folder's name)")
    progress: bool = option(True, "show a progress bar (pairs/s)")
    dist_timeout_minutes: int = option(120, "under torchrun: how long a rank waits for the others")


# ------------------------------------------------------------------------------------------ rows
def resolve_heads(head: str, criteria: list[str], pairs: list[Pair], source: str) -> list[int]:
    """The reward-head index that scores each row (see EvalConfig.head)."""
    n_heads = len(criteria)
    if head == "auto":
        if n_heads == 1:
            return [0] * len(pairs)
        index = {c: i for i, c in enumerate(criteria)}
        for p in pairs:
            if p.aspect not in index:
                raise EvalError(
                    f"{source}, {p.where()}: aspect {p.aspect!r} has no head in this model (heads: "
                    f"{', '.join(criteria)}); --head auto needs one per aspect, or pass --head NAME or INDEX"
                )
        return [index[p.aspect] for p in pairs]
    if head.strip().lstrip("-").isdigit():
        i = int(head)
        if not 0 <= i < n_heads:
            raise EvalError(f"--head {head}: the model has {n_heads} head(s), indices 0..{n_heads - 1}")
        return [i] * len(pairs)
    if head in criteria:
        return [criteria.index(head)] * len(pairs)
    raise EvalError(f"--head {head!r}: not 'auto', a head index or a head name (heads: {', '.join(criteria)})")


def resolve_systems(cfg: EvalConfig, prompts: CriteriaPrompts, pairs: list[Pair]) -> list[str | None]:
    """The system prompt of each row: its aspect's, the all-criteria one, or none."""
    if cfg.use_aspect_prompts:
        out = []
        for p in pairs:
            if p.aspect not in prompts.per_criterion:
                where = cfg.criteria_prompts or "the built-in prompts (criteria.py)"
                raise EvalError(
                    f"{cfg.data}, {p.where()}: no criterion prompt for aspect {p.aspect!r} in {where} "
                    f"(known: {', '.join(prompts.criteria)})"
                )
            out.append(prompts.for_criterion(p.aspect))
        return out
    if cfg.use_system_prompts:
        return [prompts.all_criteria] * len(pairs)
    return [None] * len(pairs)


def _fingerprint(cfg: EvalConfig, scorer) -> dict:
    """What a row's scores depend on besides the row, its system prompt and its head."""
    model = Path(cfg.model).resolve()
    files = {p.name: p.stat().st_size for p in sorted(model.iterdir()) if p.suffix == ".safetensors"
             or p.name == "config.json"}
    return {
        "model": str(model),
        "model_files": files,
        "dtype": str(scorer.model.dtype).replace("torch.", ""),
        "max_length": cfg.max_length,
        "on_overflow": cfg.on_overflow,
    }


# ------------------------------------------------------------------------------------------ progress
class _Progress:
    """tqdm when installed, else a line every 10 s; pairs/s either way."""

    def __init__(self, total: int, done: int, enabled: bool, desc: str):
        self.bar = None
        self.enabled = enabled
        self.total, self.n, self.start_n = total, done, done
        self.t0 = self.last = time.perf_counter()
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, unit="pair", desc=desc, dynamic_ncols=True)
        except ImportError:
            print(f"{desc}: {done}/{total} pairs", file=sys.stderr, flush=True)

    def update(self, n: int) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and (time.perf_counter() - self.last > 10 or self.n == self.total):
            self.last = time.perf_counter()
            print(f"{self.n}/{self.total} pairs, {self.rate():.1f} pairs/s", file=sys.stderr, flush=True)

    def rate(self) -> float:
        return (self.n - self.start_n) / max(time.perf_counter() - self.t0, 1e-9)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------ the run
def _check_config(cfg: EvalConfig) -> None:
    for key in ("model", "data", "output"):
        if not getattr(cfg, key):
            raise ConfigError(f"{'MODEL' if key == 'model' else '--' + key} is required (see --help)")
    if cfg.chunk_size < 1:
        raise ConfigError(f"--chunk-size must be at least 1, got {cfg.chunk_size}")
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise ConfigError(f"--dtype {cfg.dtype!r}: use one of {', '.join(DTYPES)}")
    if cfg.criteria_prompts and not (cfg.use_system_prompts or cfg.use_aspect_prompts):
        raise ConfigError("--criteria-prompts has no effect without --use-system-prompts or --use-aspect-prompts")


def _score_rows(scorer, pairs, todo, systems, heads, hashes, chunk_size, store, progress) -> int:
    """Score rows `todo` (indices into pairs) chunk by chunk, appending each chunk to `store`.
    Returns the number of sequences the scorer truncated."""
    truncated = 0
    for start in range(0, len(todo), chunk_size):
        idx = todo[start : start + chunk_size]
        rows = [pairs[i] for i in idx]
        chosen, rejected = scorer.score_pairs(
            [p.prompt for p in rows], [p.chosen for p in rows], [p.rejected for p in rows],
            system=[systems[i] for i in idx],
        )
        truncated += scorer.last_report.truncated
        take = torch.arange(len(idx))
        head = torch.tensor([heads[i] for i in idx], dtype=torch.long)
        store.append(
            [p.id for p in rows], chosen[take, head].tolist(), rejected[take, head].tolist(),
            [hashes[i] for i in idx],
        )
        progress.update(len(idx))
    return truncated


def run(cfg: EvalConfig) -> dict | None:
    """Evaluate; returns the results.json mapping on rank 0 (None on the other ranks)."""
    _check_config(cfg)
    # one process, or one rank of a torchrun job; the ranks exchange nothing but barriers (the
    # scores travel through the partial files), so they meet on gloo on CPU and GPU alike
    timeout = timedelta(minutes=cfg.dist_timeout_minutes)
    ranks = distributed.init(cfg.device or "", backend="gloo", timeout=timeout)
    try:
        return _run(cfg, ranks, distributed.gloo_group(timeout))
    finally:
        ranks.close()


def _run(cfg: EvalConfig, ranks: distributed.DistInfo, group) -> dict | None:
    """`group`: the gloo group the barriers run on (None: the default group)."""
    from themis_engine.scoring.scorer import Scorer

    main = ranks.is_main
    pairs = load_pairs(cfg.data, split=cfg.split, limit=cfg.limit)
    try:
        prompts = CriteriaPrompts.from_file(cfg.criteria_prompts) if cfg.criteria_prompts else CriteriaPrompts()
    except (OSError, ValueError) as err:
        raise EvalError(f"--criteria-prompts: {err}") from None
    systems = resolve_systems(cfg, prompts, pairs)
    scorer = Scorer.from_pretrained(
        cfg.model, device=ranks.device, dtype=DTYPES[cfg.dtype] if cfg.dtype else None,
        max_length=cfg.max_length, max_tokens_per_batch=cfg.max_tokens_per_batch, on_overflow=cfg.on_overflow,
    )
    heads = resolve_heads(cfg.head, scorer.criteria, pairs, cfg.data)
    hashes = [row_hash(p, s, h) for p, s, h in zip(pairs, systems, heads)]
    fingerprint = _fingerprint(cfg, scorer)
    out = Path(cfg.output)
    # read the --compare directories now: a wrong one stops the run before any scoring
    entries = reporting.load_entries(cfg.compare, exclude=[out]) if main and cfg.compare else None

    if main:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            found = PartialStore.repair(out, fingerprint)
            logger.info("resuming: %d finished rows in %s", found, out / "partial")
        else:
            PartialStore.reset(out)
            for name in OUTPUT_FILES:  # a fresh run: no stale results beside the new partial files
                (out / name).unlink(missing_ok=True)
    distributed.barrier(group)

    # this rank's rows: i % world == rank; those finished by an earlier run are skipped
    owned = list(range(ranks.rank, len(pairs), ranks.world))
    finished = PartialStore.read_all(out, strict=False) if cfg.resume else {}
    todo = []
    for i in owned:
        done = finished.get(pairs[i].id)
        if done is None:
            todo.append(i)
        elif done.row_hash != hashes[i]:
            raise ResumeError(
                f"{cfg.data}, {pairs[i].where()}: scored by the interrupted run with other inputs (its texts, "
                "system prompt or head changed); run without --resume to start over"
            )
    desc = "scoring pairs" if ranks.world == 1 else f"scoring pairs (rank 0 of {ranks.world})"
    progress = _Progress(len(owned), len(owned) - len(todo), cfg.progress and main, desc)
    store = PartialStore(out, ranks.rank).open(fingerprint)
    try:
        truncated = _score_rows(scorer, pairs, todo, systems, heads, hashes, cfg.chunk_size, store, progress)
    finally:
        store.close()
        progress.close()
    if truncated:
        logger.warning("rank %d: %d sequences were truncated to --max-length %d", ranks.rank, truncated,
                       cfg.max_length)
    if main and todo:
        logger.info("scored %d pairs at %.1f pairs/s", len(todo), progress.rate())
    distributed.barrier(group)
    if not main:
        return None
    dtype = str(scorer.model.dtype).replace("torch.", "")
    return _finish(cfg, pairs, hashes, heads, scorer.criteria, dtype, entries)


def _finish(cfg: EvalConfig, pairs, hashes, heads, criteria, dtype: str, entries) -> dict:
    """Rank 0: merge the partial files into results.json, scores.parquet, report.md and report.png."""
    out = Path(cfg.output)
    finished = PartialStore.read_all(out, strict=True)
    chosen, rejected = [], []
    for p, h in zip(pairs, hashes):
        done = finished.get(p.id)
        if done is None:
            raise ResumeError(f"{cfg.data}, {p.where()}: no score in {out / 'partial'} (a rank did not finish)")
        if done.row_hash != h:
            raise ResumeError(f"{cfg.data}, {p.where()}: its partial score was made with other inputs")
        chosen.append(done.chosen)
        rejected.append(done.rejected)
    aspect = [p.aspect for p in pairs]
    language = [p.language for p in pairs]
    subset = [p.subset for p in pairs]
    results = compile_results(chosen, rejected, aspect, language, subset)
    write_scores_parquet(out / "scores.parquet", [p.id for p in pairs], chosen, rejected, language, aspect, subset)
    write_results_json(results, out / "results.json")

    name = cfg.name or Path(cfg.model.rstrip("/")).name
    correct = [c > r for c, r in zip(chosen, rejected)]
    leaderboard = None
    if entries is not None:
        leaderboard = reporting.leaderboard_markdown(entries + [reporting.Entry(name, out, results, this_run=True)])
    png = reporting.write_heatmap(out / "report.png", aspect, language, correct,
                                  title=f"{name}: accuracy by aspect and language")
    if cfg.head == "auto":
        head = "head 0 (one-head model)" if len(criteria) == 1 else "auto: each row's aspect head"
    else:
        head = f"{criteria[heads[0]]} (head {heads[0]}) for every row"
    system = ("the row's aspect prompt" if cfg.use_aspect_prompts else
              "the all-criteria prompt" if cfg.use_system_prompts else "none")
    if cfg.criteria_prompts and system != "none":
        system += f" from `{cfg.criteria_prompts}`"
    settings = {
        "model": f"`{cfg.model}`",
        "data": f"`{cfg.data}`" + (f" (first {cfg.limit} rows)" if cfg.limit else ""),
        "pairs": str(len(pairs)),
        "head": head,
        "system prompt": system,
        "max length": f"{cfg.max_length} tokens ({cfg.on_overflow} longer sequences)",
        "dtype": dtype,
    }
    text = reporting.report_markdown(name, results, settings, aspect, language, correct,
                                     heatmap="report.png" if png else None, leaderboard=leaderboard)
    reporting.write_text(out / "report.md", text)

    o = results["overall"]
    print(f"{name}: accuracy {o['accuracy']:.4f} ({o['correct_predictions']}/{o['total_examples']}), "
          f"mean score difference {o['mean_score_difference']:.4f}")
    for aspect_name, v in results["by_aspect"].items():
        print(f"  {aspect_name:<28} {v['accuracy']:.4f}  ({v['count']})")
    if leaderboard:
        print("\n" + leaderboard)
    print(f"\nwrote {out / 'results.json'}, {out / 'scores.parquet'}, {out / 'report.md'}"
          + (f", {out / 'report.png'}" if png else ""))
    return results


# ------------------------------------------------------------------------------------------ CLI
def _gather_compare(argv: list[str]) -> list[str]:
    """`--compare A B C` (several values, as a shell glob gives them) -> one `--compare=[...]`."""
    rest, dirs, given = [], [], False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--compare":
            given = True
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                dirs.append(argv[i])
                i += 1
            continue
        if arg.startswith("--compare="):
            given = True
            value = arg.split("=", 1)[1]
            dirs.extend(json.loads(value) if value.startswith("[") else [v for v in value.split(",") if v])
        else:
            rest.append(arg)
        i += 1
    return rest + ([f"--compare={json.dumps(dirs)}"] if given else [])


def parse(argv: list[str] | None = None) -> EvalConfig:
    argv = list(sys.argv[1:] if argv is None else argv)
    return parse_args(EvalConfig, _gather_compare(argv), prog="python -m themis_engine.eval",
                      description=__doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    from themis_engine.model.hf_checkpoint import CheckpointError
    from themis_engine.scoring.scorer import InputError
    from themis_engine.data.tables import DataError

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("themis_engine").setLevel(logging.INFO)
    try:
        run(parse(argv))
    except (ConfigError, DataError, EvalError, ResumeError, InputError, CheckpointError,
            reporting.CompareError, OSError) as err:
        print(f"themis_engine.eval: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
