"""The evaluation run: score every CRB row chunk by chunk, save each chunk, merge the results.

    run(cfg)           evaluate; returns the results.json mapping on rank 0 (None on the others)
    resolve_heads      the reward head that scores each row (--head)
    resolve_systems    the system prompt of each row (--use-aspect-prompts, --use-system-prompts)
    fingerprint        what a row's scores depend on besides the row (checked on --resume): the
                       model folder's content (safetensors headers + checksums, tokenizer files), the
                       chat template, the data file's content, --limit, dtype, max_length, on_overflow
    load_scorer        the Scorer of a run (the model folder checked first; dtype, max_length, ...)
    preview_data       the rows as the run scores them (themis_engine.data.preview records): `--preview`
                       prints the first before scoring, `--preview-file` writes all to OUTPUT/preview.jsonl
    main(argv)         `python -m themis_engine.eval`: 0, or 2 with one line naming the error

Rows are scored in chunks (--chunk-size pairs); each finished chunk is appended to
OUTPUT/partial/ (partial.py), so `--resume` after an interruption scores only the rows
not yet finished, and the final files equal those of a run that was never interrupted. Under
torchrun (WORLD_SIZE > 1) row i belongs to rank i % WORLD_SIZE, each rank scores on its own
device (cuda:LOCAL_RANK where CUDA is present) and appends to its own partial file, and rank 0
merges them into the same files a single process writes. With several nodes, OUTPUT must be on a
file system every node sees.

The final files (results.json, scores.parquet, report.md, report.png) are removed when a run
starts, fresh or resumed, and written when it ends: an interrupted run never leaves the results of
another row set (an earlier --limit) beside its partial files. results.json counts what could
mislead (its `checks`): rows whose chosen and rejected texts are identical, rows with a non-finite
score, values written as null; the console says the same.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from themis_engine import distributed
from themis_engine.config import run_cli
from themis_engine.data.prompts import CriteriaPrompts
from themis_engine.data.schemas import CRBRow as Pair
from themis_engine.data.schemas import load_crb_rows as load_pairs
from themis_engine.errors import EvalError, ResumeError
from themis_engine.eval import report as reporting
from themis_engine.eval.config import DTYPES, EvalConfig, parse
from themis_engine.eval.partial import PartialStore, row_hash
from themis_engine.eval.results import compile_results, write_results_json, write_scores_parquet
from themis_engine.model.folder import check_model_folder, content_fingerprint, file_checksum, text_checksum

if TYPE_CHECKING:
    from themis_engine.scoring.scorer import Scorer

logger = logging.getLogger("themis_engine")

OUTPUT_FILES = ("results.json", "scores.parquet", "report.md", "report.png")


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
                where = cfg.criteria_prompts or "the built-in prompts (data/prompts.py)"
                raise EvalError(
                    f"{cfg.data}, {p.where()}: no criterion prompt for aspect {p.aspect!r} in {where} "
                    f"(known: {', '.join(prompts.criteria)})"
                )
            out.append(prompts.for_criterion(p.aspect))
        return out
    if cfg.use_system_prompts:
        return [prompts.all_criteria] * len(pairs)
    return [None] * len(pairs)


def load_scorer(cfg: EvalConfig, device) -> "Scorer":
    """The evaluator's Scorer on `device`: cfg's dtype, max_length and on_overflow. Its token budget is
    --max-tokens-per-batch, or where none is given the Scorer's default (measured from free memory on
    CUDA, elsewhere scoring.budget.default_token_budget of each call's largest pair). The model folder
    is checked first (model.folder.check_model_folder: config.json, safetensors headers, tokenizer
    files, chat template or --chat-template): CheckpointError naming the file."""
    from themis_engine.scoring.scorer import Scorer

    tokenizer = check_model_folder(cfg.model, chat_template=cfg.chat_template)
    return Scorer.from_pretrained(
        cfg.model, device=device, dtype=DTYPES[cfg.dtype] if cfg.dtype else None,
        max_length=cfg.max_length, max_tokens_per_batch=cfg.max_tokens_per_batch, on_overflow=cfg.on_overflow,
        tokenizer=tokenizer,
    )


def data_checksum(source: str, pairs: list[Pair]) -> str:
    """The data's content: a checksum of the file's bytes, or (a dataset id) of the rows read."""
    path = Path(source)
    if path.is_file():
        return "crc32:" + file_checksum(path)
    rows = [[p.id, p.prompt, p.chosen, p.rejected, p.aspect, p.language, p.subset] for p in pairs]
    return "rows:" + text_checksum(json.dumps(rows, ensure_ascii=False))


def fingerprint(cfg: EvalConfig, scorer, model_content: dict | None = None, data_content: str | None = None,
                pairs: list[Pair] | None = None) -> dict:
    """What a row's scores depend on besides the row, its system prompt and its head: the model
    folder's content (model.folder.content_fingerprint: safetensors headers and checksums, the
    tokenizer files; not the file sizes, which other weights share), the chat template the scorer
    renders with, the data's content and --limit (a resumed run covers the same rows), the dtype,
    max_length and on_overflow. model_content / data_content: computed already (else here)."""
    model = Path(cfg.model).resolve()
    template = getattr(scorer.tokenizer, "chat_template", None)
    return {
        "model": str(model),
        "model_content": model_content if model_content is not None else content_fingerprint(model),
        "chat_template": text_checksum(template) if isinstance(template, str) else None,
        "data_content": data_content if data_content is not None else data_checksum(cfg.data, pairs or []),
        "limit": cfg.limit,
        "dtype": str(scorer.model.dtype).replace("torch.", ""),
        "max_length": cfg.max_length,
        "on_overflow": cfg.on_overflow,
    }


class _Background:
    """fn(*args) in a daemon thread (so an error elsewhere exits at once); .result() waits for it."""

    def __init__(self, fn, *args):
        self._value, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True, name="themis-hash")
        self._thread.start()

    def _run(self, fn, args):
        try:
            self._value = fn(*args)
        except BaseException as err:  # noqa: BLE001 -- raised again in result()
            self._error = err

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


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
def _score_rows(scorer, pairs, todo, systems, heads, hashes, chunk_size, store, progress) -> int:
    """Score rows `todo` (indices into pairs) chunk by chunk, appending each chunk to `store`.
    Returns the number of sequences the scorer truncated."""
    truncated = 0
    chunks = [todo[start : start + chunk_size] for start in range(0, len(todo), chunk_size)]

    def batches():
        for idx in chunks:
            rows = [pairs[i] for i in idx]
            yield ([p.prompt for p in rows], [p.chosen for p in rows], [p.rejected for p in rows],
                   [systems[i] for i in idx])

    # one pipeline across the chunks: the next chunk is encoded while this one runs on the device
    for idx, (chosen, rejected, report) in zip(chunks, scorer.score_pairs_stream(batches())):
        rows = [pairs[i] for i in idx]
        truncated += report.truncated
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
    cfg.check()
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
    main = ranks.is_main
    # the model folder's checksums are read while the rows and the weights load (zlib lets it run)
    model_content = _Background(content_fingerprint, Path(cfg.model).resolve()) if Path(cfg.model).is_dir() else None
    pairs, systems = rows_and_systems(cfg)
    scorer = load_scorer(cfg, ranks.device)
    heads = resolve_heads(cfg.head, scorer.criteria, pairs, cfg.data)
    hashes = [row_hash(p, s, h) for p, s, h in zip(pairs, systems, heads)]
    run_fingerprint = fingerprint(cfg, scorer, model_content.result() if model_content else None,
                                  data_checksum(cfg.data, pairs))
    out = Path(cfg.output)
    # read the --compare directories now: a wrong one stops the run before any scoring
    entries = reporting.load_entries(cfg.compare, exclude=[out]) if main and cfg.compare else None

    if main:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            found = PartialStore.repair(out, run_fingerprint)
            logger.info("resuming: %d finished rows in %s", found, out / "partial")
        else:
            PartialStore.reset(out)
        for name in OUTPUT_FILES:  # written again at the end: never stale results of another row set meanwhile
            (out / name).unlink(missing_ok=True)
        (out / PREVIEW_FILE).unlink(missing_ok=True)  # written again before scoring with --preview-file
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
    if main and (cfg.preview or cfg.preview_file):
        show_preview(cfg, pairs, systems, heads, scorer.criteria, scorer.tokenizer)
    desc = "scoring pairs" if ranks.world == 1 else f"scoring pairs (rank 0 of {ranks.world})"
    progress = _Progress(len(owned), len(owned) - len(todo), cfg.progress and main, desc)
    store = PartialStore(out, ranks.rank).open(run_fingerprint)
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
    identical = [p.chosen == p.rejected for p in pairs]
    results = compile_results(chosen, rejected, aspect, language, subset, identical=identical)
    write_scores_parquet(out / "scores.parquet", [p.id for p in pairs], chosen, rejected, language, aspect, subset)
    written = write_results_json(results, out / "results.json")
    checks = written["checks"]

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
        "identical pairs": f"{checks['identical_pairs']} (chosen == rejected: scored alike, counted wrong)",
        "non-finite scores": f"{checks['non_finite_scores']} pairs (NaN or inf: counted wrong)",
    }
    text = reporting.report_markdown(name, results, settings, aspect, language, correct,
                                     heatmap="report.png" if png else None, leaderboard=leaderboard)
    reporting.write_text(out / "report.md", text)

    o = results["overall"]
    print(f"{name}: accuracy {o['accuracy']:.4f} ({o['correct_predictions']}/{o['total_examples']}), "
          f"mean score difference {o['mean_score_difference']:.4f}")
    for aspect_name, v in results["by_aspect"].items():
        print(f"  {aspect_name:<28} {v['accuracy']:.4f}  ({v['count']})")
    for line in check_lines(checks, len(pairs)):
        print(line)
    if leaderboard:
        print("\n" + leaderboard)
    print(f"\nwrote {out / 'results.json'}, {out / 'scores.parquet'}, {out / 'report.md'}"
          + (f", {out / 'report.png'}" if png else ""))
    return written


def check_lines(checks: dict, n: int) -> list[str]:
    """The console lines for results.json's `checks` that are not zero."""
    lines = []
    if checks.get("identical_pairs"):
        lines.append(f"  note: {checks['identical_pairs']} of {n} pairs have chosen == rejected (identical texts): "
                     "scored alike, so counted wrong (results.json checks.identical_pairs)")
    if checks.get("non_finite_scores"):
        lines.append(f"  warning: {checks['non_finite_scores']} of {n} pairs have a non-finite score (NaN or inf): "
                     "counted wrong, left out of the score differences (results.json checks.non_finite_scores)")
    if checks.get("null_values"):
        lines.append(f"  warning: {checks['null_values']} values of results.json are null (not finite)")
    return lines


# ------------------------------------------------------------------------------------------ preview
PREVIEW_FILE = "preview.jsonl"


def preview_records(cfg: EvalConfig, pairs: list[Pair], systems: list[str | None], heads: list[int],
                    criteria: list[str], tokenizer, rows=None, first: int | None = 3, lazy: bool = False) -> list[dict]:
    """The preview records (themis_engine.data.preview) of CRB rows as the evaluator scores them:
    each row's system prompt (resolve_systems) and head (resolve_heads), the Scorer's max_length and
    on_overflow. rows: row numbers counted from 1; else the first `first` (0: every row). lazy: an
    iterator of the records, made a piece at a time (to write a whole file: write_jsonl)."""
    from themis_engine.data.preview import iter_preview_pairs, preview_pairs
    from themis_engine.data.schemas import PreferencePair

    as_pairs = [PreferencePair(prompt=p.prompt, chosen=p.chosen, rejected=p.rejected, aspect=p.aspect,
                               language=p.language, subset=p.subset, id=str(p.id), source=f"{cfg.data}:row {p.row}")
                for p in pairs]
    kind = "own" if cfg.use_aspect_prompts else "all" if cfg.use_system_prompts else "none"
    return (iter_preview_pairs if lazy else preview_pairs)(
        as_pairs, tokenizer, cfg.max_length, system_prompts=systems, system_kinds=[kind] * len(pairs),
        head_names=criteria, heads_for=lambda i, _: [heads[i]], rows=rows, first=first, on_overflow=cfg.on_overflow,
        purpose="eval", what=str(cfg.data),
    )


def preview_data(cfg: EvalConfig, rows=None, first: int | None = 3) -> list[dict]:
    """The preview records of `cfg`'s rows (preview_records), without loading the weights."""
    return preview_records(cfg, *preview_inputs(cfg), rows=rows, first=first)


def rows_and_systems(cfg: EvalConfig) -> tuple[list[Pair], list[str | None]]:
    """The rows (--limit kept) and the system prompt of each, as a run scores them."""
    pairs = load_pairs(cfg.data, split=cfg.split, limit=cfg.limit)
    try:
        prompts = CriteriaPrompts.from_file(cfg.criteria_prompts) if cfg.criteria_prompts else CriteriaPrompts()
    except (OSError, ValueError) as err:
        raise EvalError(f"--criteria-prompts: {err}") from None
    systems = resolve_systems(cfg, prompts, pairs)
    return pairs, systems


def preview_inputs(cfg: EvalConfig) -> tuple[list[Pair], list[str | None], list[int], list[str], object]:
    """(rows, system prompts, heads, head names, tokenizer) as `run` resolves them, without loading
    the weights: the rows (--limit kept), the model folder's tokenizer (with --chat-template) and its
    heads (config.json's id2label)."""
    from themis_engine.model.args import criteria_from_config
    from themis_engine.model.hf_checkpoint import read_config

    for key in ("model", "data"):
        if not getattr(cfg, key):
            raise EvalError(f"{'MODEL' if key == 'model' else '--' + key} is required (see --help)")
    pairs, systems = rows_and_systems(cfg)
    # a tokenizer without a chat template is let through: the chat path names the row it cannot render
    tokenizer = check_model_folder(cfg.model, chat_template=cfg.chat_template, require_chat_template=False)
    criteria = list(criteria_from_config(read_config(cfg.model)))
    heads = resolve_heads(cfg.head, criteria, pairs, cfg.data)
    return pairs, systems, heads, criteria, tokenizer


def show_preview(cfg: EvalConfig, pairs, systems, heads, criteria, tokenizer) -> list[dict]:
    """Rank 0 before scoring: the first row as the preview shows it (--preview), and with
    --preview-file the preview of every row written to OUTPUT/preview.jsonl as it is made.
    Returns the records shown."""
    from themis_engine.data.preview import format_preview, write_jsonl

    shown = []
    if cfg.preview:
        shown = preview_records(cfg, pairs, systems, heads, criteria, tokenizer, first=1)
        if shown:
            logger.info("the first row as the model scores it (--preview false: not shown):\n%s",
                        format_preview(shown, tokenizer, color=sys.stderr.isatty()).rstrip("\n"))
    if cfg.preview_file:
        n = write_jsonl(preview_records(cfg, pairs, systems, heads, criteria, tokenizer, first=0, lazy=True),
                        Path(cfg.output) / PREVIEW_FILE)
        logger.info("wrote the preview of %d rows to %s", n, Path(cfg.output) / PREVIEW_FILE)
    return shown


# ------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    """`python -m themis_engine.eval ...`: 0 when the run finished, 2 with one line on stderr on a user
    error (themis_engine.errors, a file that cannot be read; --debug or THEMIS_DEBUG=1: the traceback too)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("themis_engine").setLevel(logging.INFO)

    def body(args: list[str]) -> int:
        run(parse(args))
        return 0

    return run_cli("themis_engine.eval", body, argv)


if __name__ == "__main__":
    sys.exit(main())
