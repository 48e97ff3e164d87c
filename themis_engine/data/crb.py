"""CodeRewardBench rows: every row has id, prompt, chosen, rejected, aspect, language, subset.

Rows come from a local JSONL / JSON / Parquet file (or a Hugging Face dataset id, see
tables.read_rows). A missing column, an empty or non-string field, or a repeated id is an error
that names the file, the row (1-based, in file order) and the column.

The checks of one field and the error's form are the trainer's (data.text_field, data.row_error);
what is the evaluator's own is stricter than the trainer's `crb` schema: every column is required,
ids keep their type (str or int, one per file) and are unique, and the texts are kept verbatim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from themis_engine.data.pairs import BadRow, row_error, text_field
from themis_engine.data.tables import DataError, read_rows

CRB_COLUMNS = ("id", "prompt", "chosen", "rejected", "aspect", "language", "subset")
TEXT_COLUMNS = CRB_COLUMNS[1:]


@dataclass(frozen=True)
class Pair:
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


def load_pairs(source: str, split: str = "train", limit: int | None = None) -> list[Pair]:
    """Read `source`, keep its first `limit` rows (all when None) and validate them."""
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be at least 1, got {limit}")
    rows = read_rows(source, split=split)
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise DataError(f"{source}: no rows to evaluate")
    return validate(rows, str(source))


def validate(rows: list[dict[str, Any]], source: str) -> list[Pair]:
    pairs: list[Pair] = []
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
        pairs.append(Pair(rid, *texts, row=i))
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
