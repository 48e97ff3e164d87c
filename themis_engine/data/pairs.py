"""Preference data for training: load and validate pairs, assign criteria prompts, tokenize (cached).

Three steps, each a plain function the trainer calls:

1. `load_pairs(sources, schema, columns, criteria, on_bad_row)` reads JSONL / JSON / Parquet files
   (or Hugging Face dataset ids, via `tables.read_rows`) in one of three schemas and returns
   `PreferencePair`s plus a `LoadReport`:

   * ``themis``: `system`, `input`, `chosen`, `rejected`, `language`, `aspect` (Themis training data);
   * ``crb``: `id`, `prompt`, `chosen`, `rejected`, `aspect`, `language`, `subset` (CodeRewardBench);
   * ``trl``: `chosen`, `rejected`, optional `prompt`, plain text or chat-message lists, optional
     `margin` (TRL's preference datasets). Conversational rows without a prompt column take the
     common leading messages of chosen and rejected as the prompt; text rows without one have an
     empty prompt (`[]`: the conversation is the answer alone).

   Every schema also reads `id`, `subset`, `margin` (and `system`) when present. `columns` renames
   the file's columns to these names (`{"chosen": "better"}`: the file's `better` is `chosen`).
   A bad row (missing column, empty or non-string field, malformed message list, unknown aspect,
   bad margin, chosen identical to rejected) raises `DataError` naming the file, the row (counted
   from 1) and the column, or, with `on_bad_row="skip"`, is skipped and counted by reason.

   Pairs come out in a canonical form: a prompt that is a single user message is its text, an
   answer that is a single assistant message is its text, and a system message that opens a prompt
   conversation moves to `PreferencePair.system`; anything else stays a message list (with only
   `role` and `content` kept per message).

2. `assign_system_prompts(pairs, mode, criteria, prompts)` gives each pair its system message.
   In ``scalar`` mode (one head) a criteria prompt is drawn per pair (Themis: 15% none, 20% the
   prompt listing all criteria, 65% the pair's own criterion); in ``criteria`` mode (one head per
   criterion) no criteria prompt is added. The data's own `system` is kept: the criteria prompt
   comes first, then a blank line, then the data's system text, in ONE system message.

3. `tokenize_pairs(pairs, tokenizer, max_length, system_prompts, criteria)` renders each side
   with the tokenizer's chat template exactly as `Scorer` does (text via
   `apply_chat_template(tokenize=False)`, then `tokenizer(text, add_special_tokens=False)`),
   truncates over-long answers from the right keeping the template's closing tokens, and caches
   the result on disk keyed by the data, the tokenizer and the settings.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from themis_engine.data.prompts import CriteriaPrompts
from themis_engine.fileio import atomic_write
from themis_engine.data.tables import DataError, read_rows
from themis_engine.chat import answer_span, common_prefix, encode_many, fit_to_length, render

logger = logging.getLogger("themis_engine")

Message = dict[str, str]

SCHEMAS = ("themis", "crb", "trl")
BAD_ROW_POLICIES = ("error", "skip")
OVERFLOW_POLICIES = ("truncate", "skip", "error")
SYSTEM_PROMPT_MODES = ("scalar", "criteria")
DEFAULT_PROPORTIONS = (0.15, 0.20, 0.65)  # none / all criteria / the pair's own criterion
CANONICAL_COLUMNS = ("system", "input", "prompt", "chosen", "rejected", "language", "aspect", "id", "subset", "margin")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_CACHE_VERSION = 1

# per schema: the prompt column, the required columns, and whether message lists are allowed
_SCHEMA_SPEC = {
    "themis": dict(prompt="input", required=("input", "chosen", "rejected"), messages=False),
    "crb": dict(prompt="prompt", required=("prompt", "chosen", "rejected", "aspect"), messages=False),
    "trl": dict(prompt="prompt", required=("chosen", "rejected"), messages=True),
}


# ============================================================================================ types
@dataclass
class PreferencePair:
    """One preference pair. `prompt`: the user text, or a message list without the final answer
    (`[]`: no prompt turn); `chosen` / `rejected`: the answer text, or a message list ending with
    an assistant turn; `system`: the data's own system text (before criteria prompts)."""

    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    system: str | None = None
    aspect: str | None = None
    language: str | None = None
    subset: str | None = None
    id: str | None = None
    margin: float | None = None
    source: str = ""  # "file.jsonl:row 17" (rows counted from 1)


@dataclass
class LoadReport:
    """What load_pairs read: rows seen, pairs kept, rows skipped (by reason), schema per file."""

    rows: int = 0
    kept: int = 0
    skipped: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    schemas: dict[str, str] = field(default_factory=dict)  # file -> the schema it was read with

    def summary(self) -> str:
        text = f"{self.kept} pairs from {self.rows} rows in {len(self.files)} file(s)"
        if self.skipped:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped_reasons.items()))
            text += f"; {self.skipped} skipped ({reasons})"
        return text


@dataclass
class TokenizedPair:
    """A pair as token ids: each side is the full templated standalone sequence
    (system + prompt + answer + the template's closing tokens). The packer shares their longest
    common prefix. `chosen_response_start`: index in chosen_ids of the first token of the chosen
    answer (of its last assistant message), the start of the LM-loss labels; likewise
    `rejected_response_start`. `aspect_index`: the pair's criterion in the run's criteria, -1 if
    none. `index`: the pair's position in the list given to tokenize_pairs."""

    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_response_start: int
    aspect_index: int
    margin: float
    language: str | None
    truncated: bool
    rejected_response_start: int = 0
    index: int = 0


class BadRow(Exception):
    """What is wrong with one row: the `column`, the `problem` (for the message) and a short
    `reason` by which skipped rows are counted. The loader turns it into `row_error`."""

    def __init__(self, reason: str, column: str, problem: str):
        super().__init__(problem)
        self.reason, self.column, self.problem = reason, column, problem


def row_error(source: str, row: int, column: str, problem: str) -> DataError:
    """The error for a bad row: `file, row N, column 'c': problem` (rows counted from 1; `column`
    as it is to be shown, quoted)."""
    return DataError(f"{source}, row {row}, column {column}: {problem}")


# ============================================================================================ loading
def load_pairs(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    schema: str = "auto",
    columns: dict[str, str] | None = None,
    criteria: Sequence[str] | None = None,
    on_bad_row: str = "error",
) -> tuple[list[PreferencePair], LoadReport]:
    """Read and validate preference pairs from files (see the module docstring for the schemas).

    sources: a file, a folder (its .jsonl/.json/.parquet files), a glob pattern, a Hugging Face
    dataset id, or a list of those. schema: "auto" (per file: `input` column -> themis; `prompt`
    and `aspect` with text answers -> crb; else trl), or one of SCHEMAS for every file.
    columns: {canonical name: the file's column}. criteria: the allowed aspects (an aspect matching
    one up to case, spaces and hyphens takes that spelling; any other is an unknown aspect); None
    accepts any. on_bad_row: "error" (raise DataError) or "skip" (count in the report).
    A required column absent from a whole file is always an error (the schema does not fit).
    Returns (pairs, report); no pair left is an error.
    """
    if schema != "auto" and schema not in SCHEMAS:
        raise ValueError(f"schema must be 'auto' or one of {SCHEMAS}, got {schema!r}")
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
    columns = dict(columns or {})
    unknown = [k for k in columns if k not in CANONICAL_COLUMNS]
    if unknown:
        raise ValueError(f"columns: unknown name(s) {unknown}; the names are {', '.join(CANONICAL_COLUMNS)}")
    aspect_lookup = None if criteria is None else _aspect_lookup(criteria)

    report = LoadReport()
    reasons: Counter = Counter()
    pairs: list[PreferencePair] = []
    for source in _expand_sources(sources):
        raw = read_rows(source)
        report.files.append(str(source))
        rows = [_remap(r, columns) for r in raw]
        file_schema = _detect_schema(rows) if schema == "auto" else schema
        report.schemas[str(source)] = file_schema
        _check_file_columns(str(source), rows, raw, file_schema, columns)
        for n, row in enumerate(rows, 1):
            report.rows += 1
            try:
                pairs.append(_parse_row(row, file_schema, aspect_lookup, f"{source}:row {n}"))
            except BadRow as bad:
                if on_bad_row == "error":
                    raise row_error(source, n, _show_column(bad.column, columns), bad.problem) from None
                reasons[bad.reason] += 1
    report.kept = len(pairs)
    report.skipped = report.rows - report.kept
    report.skipped_reasons = dict(sorted(reasons.items()))
    if not pairs:
        raise DataError(f"no preference pairs left in {', '.join(report.files) or 'the sources'}: {report.summary()}")
    if report.skipped:
        logger.warning("load_pairs: %s", report.summary())
    return pairs, report


def _expand_sources(sources) -> list[str]:
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    out: list[str] = []
    for s in sources:
        s = str(s)
        path = Path(s)
        if path.is_dir():
            files = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in _FILE_SUFFIXES)
            if not files:
                raise DataError(f"{s}: a folder with no .jsonl, .json or .parquet file")
            out.extend(files)
        elif not path.exists() and any(c in s for c in "*?["):
            files = sorted(_glob.glob(s))
            if not files:
                raise DataError(f"{s}: no file matches this pattern")
            out.extend(files)
        elif not path.exists() and path.suffix.lower() in _FILE_SUFFIXES:
            raise DataError(f"{s}: no such file")
        else:
            out.append(s)  # a file, or a dataset id (read_rows decides)
    if not out:
        raise DataError("load_pairs: no data sources given")
    return out


def _remap(row: dict, columns: dict[str, str]) -> dict:
    if not columns:
        return row
    row = dict(row)
    for canonical, file_col in columns.items():
        if file_col in row:
            value = row.pop(file_col)
            row[canonical] = value
        else:
            row.pop(canonical, None)  # the mapped column is missing: do not fall back to a same-named one
    return row


def _show_column(column: str, columns: dict[str, str]) -> str:
    return f"'{columns[column]}' (as '{column}')" if column in columns else f"'{column}'"


def _detect_schema(rows: list[dict]) -> str:
    keys = set().union(*(r.keys() for r in rows)) if rows else set()
    if "input" in keys:
        return "themis"
    first = rows[0] if rows else {}
    if "prompt" in keys and "aspect" in keys and isinstance(first.get("chosen"), str):
        return "crb"
    return "trl"


def _check_file_columns(source: str, rows: list[dict], raw: list[dict], schema: str, columns: dict) -> None:
    """A column the schema needs (or one `columns` names) that no row has: the schema does not fit."""
    if not rows:
        return
    keys = set().union(*(r.keys() for r in raw))
    for canonical, file_col in columns.items():
        if file_col not in keys:
            raise row_error(source, 1, f"'{file_col}' (as '{canonical}')",
                            f"missing from the file (its columns: {', '.join(sorted(keys))})")
    present = set().union(*(r.keys() for r in rows))
    for col in _SCHEMA_SPEC[schema]["required"]:
        if col not in present:
            raise row_error(
                source, 1, f"'{col}'",
                f"missing from the file (schema {schema!r} needs {', '.join(_SCHEMA_SPEC[schema]['required'])}; "
                f"its columns: {', '.join(sorted(keys))}; rename with columns={{canonical: file column}})",
            )


def _aspect_lookup(criteria: Sequence[str]) -> dict[str, str]:
    lookup = {}
    for c in criteria:
        lookup[c] = c
        lookup.setdefault(_aspect_key(c), c)
    return lookup


def _aspect_key(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def _parse_row(row: dict, schema: str, aspect_lookup: dict | None, source: str) -> PreferencePair:
    spec = _SCHEMA_SPEC[schema]
    for col in spec["required"]:
        if col not in row:
            raise BadRow("missing_column", col, "missing")
    allow_messages = spec["messages"]
    prompt_col = spec["prompt"]

    system = _optional_text(row, "system")
    chosen = _answer(row["chosen"], "chosen", allow_messages)
    rejected = _answer(row["rejected"], "rejected", allow_messages)
    if prompt_col in row and row[prompt_col] is not None:
        prompt = _prompt(row[prompt_col], prompt_col, allow_messages)
    elif prompt_col in spec["required"]:
        raise BadRow("empty_field", prompt_col, "empty (null)")
    elif isinstance(chosen, list) and isinstance(rejected, list):
        k = _common_messages(chosen, rejected)
        while k and chosen[k - 1]["role"] == "assistant":
            k -= 1  # a prompt ends before an assistant turn; shared assistant turns open both answers
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        if not chosen or not rejected:
            raise BadRow("bad_messages", "chosen",
                         "chosen and rejected conversations leave no answer after their common messages")
    elif isinstance(chosen, list) or isinstance(rejected, list):
        raise BadRow("bad_messages", "chosen",
                     "without a prompt column, chosen and rejected must both be text or both be message lists")
    else:
        prompt = []  # a text pair with an implicit prompt: the conversation is the answer alone

    # canonical form: a leading system message moves to `system`; single turns become their text
    if isinstance(prompt, list) and prompt and prompt[0]["role"] == "system":
        inner = prompt[0]["content"]
        system = inner if system is None else f"{system}\n\n{inner}"
        prompt = prompt[1:]
    if isinstance(prompt, list) and len(prompt) == 1 and prompt[0]["role"] == "user":
        prompt = prompt[0]["content"]
    chosen, rejected = _single_answer(chosen), _single_answer(rejected)
    if chosen == rejected:
        raise BadRow("identical", "rejected", "identical to chosen")

    aspect = _optional_text(row, "aspect")
    if aspect is not None and aspect_lookup is not None:
        canonical = aspect_lookup.get(aspect) or aspect_lookup.get(_aspect_key(aspect))
        if canonical is None:
            allowed = sorted(set(aspect_lookup.values()))
            raise BadRow("unknown_aspect", "aspect",
                         f"unknown aspect {aspect!r}; the run's criteria are {', '.join(allowed)}")
        aspect = canonical
    margin = row.get("margin")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise BadRow("bad_margin", "margin", f"expected a finite number, got {margin!r}")
        margin = float(margin)
    ident = row.get("id")
    return PreferencePair(
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        system=system,
        aspect=aspect,
        language=_optional_text(row, "language"),
        subset=_optional_text(row, "subset"),
        id=None if ident is None else str(ident),
        margin=margin,
        source=source,
    )


def _optional_text(row: dict, col: str) -> str | None:
    value = row.get(col)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return text_field(value, col)


def text_field(value: Any, col: str, blank: str = "empty text") -> str:
    """`value` when it is a string with some non-blank character, else BadRow. `blank`: the problem
    named for a blank string (the CRB evaluator's messages say "empty string")."""
    if value is None:
        raise BadRow("empty_field", col, "empty (null)")
    if not isinstance(value, str):
        raise BadRow("not_a_string", col, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRow("empty_field", col, blank)
    return value


def _answer(value: Any, col: str, allow_messages: bool) -> str | list[Message]:
    if allow_messages and isinstance(value, (list, tuple)):
        msgs = _messages(value, col)
        if not msgs:
            raise BadRow("bad_messages", col, "an empty message list")
        if msgs[-1]["role"] != "assistant":
            raise BadRow("bad_messages", col,
                         f"the last message has role {msgs[-1]['role']!r}; an answer must end with an assistant turn")
        if not msgs[-1]["content"].strip():
            raise BadRow("empty_field", col, "the final assistant message is empty")
        return msgs
    return text_field(value, col)


def _prompt(value: Any, col: str, allow_messages: bool) -> str | list[Message]:
    if allow_messages and isinstance(value, (list, tuple)):
        msgs = _messages(value, col)
        if msgs and msgs[-1]["role"] == "assistant":
            raise BadRow("bad_messages", col, "the prompt conversation ends with an assistant turn")
        return msgs
    return text_field(value, col)


def _messages(value: Sequence, col: str) -> list[Message]:
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise BadRow("bad_messages", col, f"message {j} is a {type(m).__name__}, not a {{role, content}} object")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role.strip():
            raise BadRow("bad_messages", col, f"message {j} has no string 'role'")
        if not isinstance(content, str):
            raise BadRow("bad_messages", col, f"message {j} has no string 'content'")
        out.append({"role": role, "content": content})
    return out


def _common_messages(a: list[Message], b: list[Message]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def _single_answer(answer: str | list[Message]) -> str | list[Message]:
    if isinstance(answer, list) and len(answer) == 1 and answer[0]["role"] == "assistant":
        return answer[0]["content"]
    return answer


def pairs_to_rows(pairs: Iterable[PreferencePair], schema: str = "trl") -> list[dict]:
    """Pairs as rows of `schema` (the inverse of load_pairs), e.g. to write a dataset file.
    themis and crb need text prompts and answers; trl writes message lists where a pair has them."""
    if schema not in SCHEMAS:
        raise ValueError(f"schema must be one of {SCHEMAS}, got {schema!r}")
    rows = []
    for i, p in enumerate(pairs):
        if schema != "trl" and not all(isinstance(x, str) for x in (p.prompt, p.chosen, p.rejected)):
            raise ValueError(f"pair {i}: the {schema} schema needs text prompt and answers; use schema='trl'")
        if schema == "themis":
            row = dict(system=p.system or "", input=p.prompt, chosen=p.chosen, rejected=p.rejected,
                       language=p.language, aspect=p.aspect)
        elif schema == "crb":
            row = dict(id=p.id if p.id is not None else str(i), prompt=p.prompt, chosen=p.chosen,
                       rejected=p.rejected, aspect=p.aspect, language=p.language, subset=p.subset)
        else:
            row = dict(prompt=p.prompt, chosen=p.chosen, rejected=p.rejected)
            for key in ("system", "aspect", "language", "subset", "id"):
                if getattr(p, key) is not None:
                    row[key] = getattr(p, key)
        if p.margin is not None:
            row["margin"] = p.margin
        rows.append(row)
    return rows


# ============================================================================================ criteria prompts
PROMPT_NONE, PROMPT_ALL, PROMPT_OWN = "none", "all", "own"


def draw_prompt_kinds(
    pairs: Sequence[PreferencePair], proportions: Sequence[float] = DEFAULT_PROPORTIONS, seed: int = 0
) -> list[str]:
    """Per pair, which criteria prompt it gets: PROMPT_NONE / PROMPT_ALL / PROMPT_OWN, drawn with
    `proportions` (none, all, own). Pair i's draw depends only on (seed, i). A pair without an
    aspect cannot get its own: it draws between none and all in their relative proportions."""
    p = [float(x) for x in proportions]
    if len(p) != 3 or any(x < 0 for x in p) or not math.isclose(sum(p), 1.0, abs_tol=1e-6):
        raise ValueError(
            f"proportions must be three non-negative numbers (none, all, own) summing to 1, got {proportions}"
        )
    u = np.random.default_rng(seed).random(len(pairs))
    kinds = []
    for ui, pair in zip(u, pairs):
        if pair.aspect is None:
            base = p[0] + p[1]
            cut = p[0] / base if base > 0 else 1.0  # only "own" was asked for: give none
            kinds.append(PROMPT_NONE if ui < cut else PROMPT_ALL)
        else:
            kinds.append(PROMPT_NONE if ui < p[0] else PROMPT_ALL if ui < p[0] + p[1] else PROMPT_OWN)
    return kinds


def combine_system(criteria_prompt: str | None, data_system: str | None) -> str | None:
    """The one system message of a pair: the criteria prompt, a blank line, the data's system text."""
    if criteria_prompt and data_system:
        return f"{criteria_prompt}\n\n{data_system}"
    return criteria_prompt or data_system or None


def assign_system_prompts(
    pairs: Sequence[PreferencePair],
    mode: str,
    criteria: Sequence[str],
    prompts: CriteriaPrompts | None = None,
    proportions: Sequence[float] = DEFAULT_PROPORTIONS,
    seed: int = 0,
) -> list[str | None]:
    """The system message of each pair (None: no system message), to pass to tokenize_pairs.

    mode "scalar": a criteria prompt per pair at random (draw_prompt_kinds: seeded, deterministic),
    combined with the pair's own `system` by combine_system. mode "criteria": the pair's own
    `system` only. prompts: the criteria prompt texts (default: the project's CriteriaPrompts()).
    """
    if mode not in SYSTEM_PROMPT_MODES:
        raise ValueError(f"mode must be one of {SYSTEM_PROMPT_MODES}, got {mode!r}")
    if mode == "criteria":
        return [p.system for p in pairs]
    prompts = CriteriaPrompts() if prompts is None else prompts
    criteria = list(criteria)
    outside = sorted({p.aspect for p in pairs if p.aspect is not None and p.aspect not in criteria})
    if outside:
        raise ValueError(f"aspect(s) {', '.join(outside)} are not among the run's criteria {criteria}")
    used = sorted({p.aspect for p in pairs if p.aspect is not None})
    missing = [a for a in used if a not in prompts.per_criterion]
    if missing:
        raise ValueError(
            f"no criteria prompt for {', '.join(missing)}; the prompts cover {', '.join(prompts.criteria)}"
        )
    out = []
    for pair, kind in zip(pairs, draw_prompt_kinds(pairs, proportions, seed)):
        if kind == PROMPT_NONE:
            text = None
        else:
            text = prompts.all_criteria if kind == PROMPT_ALL else prompts.for_criterion(pair.aspect)
        out.append(combine_system(text, pair.system))
    return out


# ============================================================================================ tokenization
def conversations(pair: PreferencePair, system: str | None = None) -> tuple[list[Message], list[Message]]:
    """(chosen conversation, rejected conversation): [system] + prompt turns + answer turns, the
    way Scorer builds them (a text prompt is a user turn, a text answer an assistant turn)."""
    base: list[Message] = [{"role": "system", "content": system}] if system is not None else []
    if isinstance(pair.prompt, str):
        base.append({"role": "user", "content": pair.prompt})
    else:
        base.extend(dict(m) for m in pair.prompt)

    def answer(a):
        return [{"role": "assistant", "content": a}] if isinstance(a, str) else [dict(m) for m in a]

    return base + answer(pair.chosen), base + answer(pair.rejected)














def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer,
    max_length: int,
    system_prompts: Sequence[str | None] | None = None,
    criteria: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    on_overflow: str = "truncate",
    chunk_size: int = 2048,
) -> tuple[list[TokenizedPair], dict]:
    """Tokenize pairs with the tokenizer's chat template (as Scorer: render to text, then encode
    without special tokens). system_prompts: the system message per pair (assign_system_prompts);
    None uses each pair's own `system`. criteria: the run's criteria (aspect_index; an aspect
    outside them is a DataError); None: no criteria, every aspect_index is -1.

    A side over max_length: "truncate" cuts its answer from the right keeping the template's
    closing tokens (a prompt that alone does not fit is a DataError), "skip" drops the pair,
    "error" raises DataError naming it. A pair whose two sides are identical token sequences
    (after truncation) is dropped and counted: it carries no preference. Kept pairs keep their
    input order; `index` maps back.

    cache_dir: reuse / write `pairs-<key>.npz` there, key = hash of the data, the system prompts,
    the tokenizer (vocabulary, merges, template), max_length, on_overflow, criteria and library
    versions. A hit returns identical pairs without tokenizing.

    Returns (pairs, stats): stats has pairs, kept, truncated (kept pairs with a side cut),
    skipped_overflow, skipped_identical,
    tokens (standalone tokens of the kept pairs), cache ("hit" / "miss" / "off"), cache_file, seconds.
    """
    t0 = time.perf_counter()
    if on_overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"on_overflow must be one of {OVERFLOW_POLICIES}, got {on_overflow!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if system_prompts is None:
        system_prompts = [p.system for p in pairs]
    if len(system_prompts) != len(pairs):
        raise ValueError(f"{len(system_prompts)} system prompts for {len(pairs)} pairs")
    criteria = None if criteria is None else list(criteria)
    aspect_of = {c: i for i, c in enumerate(criteria or ())}
    for p in pairs if criteria is not None else ():
        if p.aspect is not None and p.aspect not in aspect_of:
            raise DataError(f"{p.source or 'a pair'}: aspect {p.aspect!r} is not among the run's criteria {criteria}")

    cache_file = None
    if cache_dir is not None:
        key = _cache_key(pairs, system_prompts, tokenizer, max_length, on_overflow, criteria)
        cache_file = Path(cache_dir) / f"pairs-{key[:32]}.npz"
        if cache_file.is_file():
            try:
                out, stats = _read_cache(cache_file)
                stats.update(cache="hit", cache_file=str(cache_file), seconds=time.perf_counter() - t0)
                logger.info("tokenized pairs: cache hit %s", cache_file)
                return out, stats
            except Exception as err:  # a damaged or old file: tokenize again and replace it
                logger.warning("ignoring unreadable tokenization cache %s (%s)", cache_file, err)

    out: list[TokenizedPair] = []
    stats = dict(pairs=len(pairs), kept=0, truncated=0, skipped_overflow=0, skipped_identical=0, tokens=0)
    for lo in range(0, len(pairs), chunk_size):
        idx = range(lo, min(lo + chunk_size, len(pairs)))
        out.extend(_tokenize_chunk(pairs, idx, tokenizer, max_length, system_prompts, aspect_of, on_overflow, stats))
    stats["kept"] = len(out)
    stats["tokens"] = sum(len(t.chosen_ids) + len(t.rejected_ids) for t in out)
    if stats["truncated"] or stats["skipped_overflow"] or stats["skipped_identical"]:
        logger.warning(
            "tokenized %d pairs (max_length=%d): %d truncated, %d skipped over max_length, %d identical",
            len(pairs), max_length, stats["truncated"], stats["skipped_overflow"], stats["skipped_identical"],
        )
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        _write_cache(cache_file, out, stats)
    stats.update(cache="miss" if cache_file else "off", cache_file=str(cache_file) if cache_file else None,
                 seconds=time.perf_counter() - t0)
    return out, stats


def _tokenize_chunk(pairs, idx, tokenizer, max_length, system_prompts, aspect_of, on_overflow, stats):
    convs, texts, spans, whats = [], [], [], []
    for i in idx:
        pair = pairs[i]
        for side, conv in zip(("chosen", "rejected"), conversations(pair, system_prompts[i])):
            text = render(tokenizer, conv)
            convs.append(conv)
            texts.append(text)
            spans.append(answer_span(tokenizer, conv, text))
            whats.append(f"{pair.source or f'pair {i}'} ({side})")
    ids = encode_many(tokenizer, texts)
    heads = encode_many(tokenizer, [t[:at] if at >= 0 else "" for t, at in zip(texts, spans)])
    starts = [common_prefix(h, x) if at >= 0 else 0 for h, x, at in zip(heads, ids, spans)]
    over = [k for k, x in enumerate(ids) if len(x) > max_length]
    if over and on_overflow == "truncate":
        tails = encode_many(
            tokenizer,
            [texts[k][spans[k] + len(convs[k][-1]["content"]):] if spans[k] >= 0 else "" for k in over],
        )
        for k, tail in zip(over, tails):
            ids[k] = fit_to_length(ids[k], starts[k], tail if spans[k] >= 0 else [], max_length, whats[k], DataError)
    elif over and on_overflow == "error":
        k = over[0]
        raise DataError(f"{whats[k]}: {len(ids[k])} tokens, over max_length={max_length}")
    over_set = set(over)

    result = []
    for j, i in enumerate(idx):
        c, r = 2 * j, 2 * j + 1
        for k in (c, r):
            if not ids[k]:
                raise DataError(f"{whats[k]}: the chat template produced no tokens")
        if on_overflow == "skip" and (c in over_set or r in over_set):
            stats["skipped_overflow"] += 1
            continue
        truncated = c in over_set or r in over_set
        if ids[c] == ids[r]:  # cut to the same tokens (or given identical): no preference left
            stats["skipped_identical"] += 1
            continue
        stats["truncated"] += truncated
        pair = pairs[i]
        result.append(
            TokenizedPair(
                chosen_ids=ids[c],
                rejected_ids=ids[r],
                chosen_response_start=starts[c],
                aspect_index=aspect_of.get(pair.aspect, -1) if pair.aspect is not None else -1,
                margin=float(pair.margin) if pair.margin is not None else 0.0,
                language=pair.language,
                truncated=truncated,
                rejected_response_start=starts[r],
                index=i,
            )
        )
    return result


# ---------------------------------------------------------------------------------------- the cache
def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the tokens: vocabulary, merges, normalizer, added tokens, chat template."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True, default=str).encode())
    h.update(json.dumps(list(getattr(tokenizer, "all_special_tokens", [])), default=str).encode())
    return h.hexdigest()


def _cache_key(pairs, system_prompts, tokenizer, max_length, on_overflow, criteria) -> str:
    import tokenizers
    import transformers

    h = hashlib.sha256()
    settings = dict(
        version=_CACHE_VERSION, max_length=max_length, on_overflow=on_overflow, criteria=criteria,
        tokenizer=tokenizer_fingerprint(tokenizer), transformers=transformers.__version__,
        tokenizers=tokenizers.__version__,
    )
    h.update(json.dumps(settings, sort_keys=True).encode())
    for p, s in zip(pairs, system_prompts):
        item = [p.prompt, p.chosen, p.rejected, s, p.aspect, p.language, p.margin]
        h.update(json.dumps(item, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def _flat(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    tokens = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))  # ids < 2**31
    return tokens, offsets


def _write_cache(path: Path, out: list[TokenizedPair], stats: dict) -> None:
    c_tok, c_off = _flat([t.chosen_ids for t in out])
    r_tok, r_off = _flat([t.rejected_ids for t in out])
    meta = dict(stats=stats, languages=[t.language for t in out])
    arrays = dict(
        chosen_tokens=c_tok, chosen_offsets=c_off, rejected_tokens=r_tok, rejected_offsets=r_off,
        chosen_response_start=np.array([t.chosen_response_start for t in out], dtype=np.int64),
        rejected_response_start=np.array([t.rejected_response_start for t in out], dtype=np.int64),
        aspect_index=np.array([t.aspect_index for t in out], dtype=np.int64),
        margin=np.array([t.margin for t in out], dtype=np.float64),
        truncated=np.array([t.truncated for t in out], dtype=bool),
        index=np.array([t.index for t in out], dtype=np.int64),
        meta=np.array(json.dumps(meta)),
    )

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, **arrays)

    atomic_write(path, write)


def _read_cache(path: Path) -> tuple[list[TokenizedPair], dict]:
    with np.load(path, allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}
    meta = json.loads(str(a["meta"]))
    c = _split(a["chosen_tokens"], a["chosen_offsets"])
    r = _split(a["rejected_tokens"], a["rejected_offsets"])
    n = len(c)
    if not (len(r) == n == len(meta["languages"]) == len(a["index"])):
        raise ValueError("inconsistent cache arrays")
    out = [
        TokenizedPair(
            chosen_ids=c[i], rejected_ids=r[i],
            chosen_response_start=int(a["chosen_response_start"][i]),
            aspect_index=int(a["aspect_index"][i]), margin=float(a["margin"][i]),
            language=meta["languages"][i], truncated=bool(a["truncated"][i]),
            rejected_response_start=int(a["rejected_response_start"][i]), index=int(a["index"][i]),
        )
        for i in range(n)
    ]
    return out, dict(meta["stats"])


def _split(tokens: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    flat = tokens.tolist()
    bounds = offsets.tolist()
    return [flat[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]
