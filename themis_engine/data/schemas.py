"""Preference rows: read and validate the data files of training and evaluation (the one place a
row is checked; every error names the file, the row counted from 1, and the column).

Training (`load_pairs(sources, schema, columns, criteria, on_bad_row)`) reads JSONL / JSON / Parquet
files (or Hugging Face dataset ids, via `tables.read_rows`) in one of three schemas and returns
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

Evaluation (`load_crb_rows(source, split, limit)`) reads CodeRewardBench rows as `CRBRow`s, with
the same field checks and error form but stricter rules than the trainer's `crb` schema: every
column is required, ids keep their type (str or int, one per file) and are unique, and the texts
are kept verbatim.
"""

from __future__ import annotations

import glob as _glob
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from themis_engine.data.tables import is_saved_dataset, read_rows
from themis_engine.errors import ConfigError, DataError

logger = logging.getLogger("themis_engine")

Message = dict[str, str]

SCHEMAS = ("themis", "crb", "trl")
BAD_ROW_POLICIES = ("error", "skip")
CANONICAL_COLUMNS = ("system", "input", "prompt", "chosen", "rejected", "language", "aspect", "id", "subset", "margin")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")

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
        raise ConfigError(f"data.schema: expected 'auto' or one of {', '.join(SCHEMAS)}, got {schema!r}")
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ConfigError(f"data.on_bad_row: expected one of {', '.join(BAD_ROW_POLICIES)}, got {on_bad_row!r}")
    columns = dict(columns or {})
    check_columns(columns)
    aspect_lookup = None if criteria is None else _aspect_lookup(criteria)

    report = LoadReport()
    reasons: Counter = Counter()
    pairs: list[PreferencePair] = []
    for source in _expand_sources(sources):
        bad_lines: Counter = Counter()
        raw = read_rows(source, skipped=bad_lines if on_bad_row == "skip" else None)
        report.rows += sum(bad_lines.values())  # lines that were not rows (not UTF-8, not JSON), skipped
        reasons.update(bad_lines)
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


def check_columns(columns: Any, key: str = "data.columns") -> None:
    """A column remapping {canonical name: the file's column}: ConfigError naming `key` and the entry."""
    if not isinstance(columns, dict):
        raise ConfigError(f"{key}: expected a mapping such as {{chosen: better, rejected: worse}}, got {columns!r}")
    for name, file_col in columns.items():
        if name not in CANONICAL_COLUMNS:
            raise ConfigError(f"{key}: {name!r} is not a column name of the schemas; the names are "
                              f"{', '.join(CANONICAL_COLUMNS)} (mapped to the file's columns: {{chosen: better}})")
        if not isinstance(file_col, str) or not file_col:
            raise ConfigError(f"{key}.{name}: expected the file's column name (a string), got {file_col!r}")


def _expand_sources(sources) -> list[str]:
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    out: list[str] = []
    for s in sources:
        s = str(s)
        path = Path(s)
        if is_saved_dataset(path):
            out.append(s)  # one source: read_rows loads it with datasets.load_from_disk
        elif path.is_dir():
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


# ============================================================================ CodeRewardBench rows (the evaluator)
CRB_COLUMNS = ("id", "prompt", "chosen", "rejected", "aspect", "language", "subset")
TEXT_COLUMNS = CRB_COLUMNS[1:]


@dataclass(frozen=True)
class CRBRow:
    """One CRB row. id is a str or an int (one type per file); the rest are non-empty strings."""

    id: str | int
    prompt: str
    chosen: str
    rejected: str
    aspect: str
    language: str
    subset: str
    row: int  # 1-based position in the data file, for error messages

    def where(self) -> str:
        return f"row {self.row} (id {self.id!r})"


Pair = CRBRow  # the evaluator's name for a row before the data package held it


def load_crb_rows(source: str, split: str = "train", limit: int | None = None) -> list[CRBRow]:
    """Read `source`, keep its first `limit` rows (all when None) and validate them."""
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be at least 1, got {limit}")
    rows = read_rows(source, split=split)
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise DataError(f"{source}: no rows to evaluate")
    return validate_crb_rows(rows, str(source))


def validate_crb_rows(rows: list[dict[str, Any]], source: str) -> list[CRBRow]:
    """Every row checked as the evaluator needs it (see the module docstring); errors name file, row, column."""
    pairs: list[CRBRow] = []
    seen: dict[Any, int] = {}  # id -> its row
    id_type = None
    for i, row in enumerate(rows, 1):
        missing = [c for c in CRB_COLUMNS if c not in row or row[c] is None]
        if missing:
            raise DataError(
                f"{source}, row {i}: missing column {missing[0]!r} (a CRB row needs {', '.join(CRB_COLUMNS)})"
            )
        try:
            rid = _check_id(row["id"], id_type, seen)
            texts = [text_field(row[c], c, blank="empty string") for c in TEXT_COLUMNS]
        except BadRow as bad:
            raise row_error(source, i, repr(bad.column), bad.problem) from None
        id_type = type(rid)
        seen[rid] = i
        pairs.append(CRBRow(rid, *texts, row=i))
    return pairs


def _check_id(rid: Any, id_type: type | None, seen: dict[Any, int]) -> str | int:
    """A non-empty string or an integer, of the file's one id type, not seen before."""
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise BadRow("bad_id", "id", f"expected a string or an integer, got {type(rid).__name__}")
    if isinstance(rid, str):
        text_field(rid, "id", blank="empty string")
    if id_type is not None and type(rid) is not id_type:
        raise BadRow("bad_id", "id", f"{type(rid).__name__} id among {id_type.__name__} ids; use one type")
    if rid in seen:
        raise BadRow("repeated_id", "id", f"id {rid!r} repeats row {seen[rid]}")
    return rid
