"""CodeRewardBench rows: every row has id, prompt, chosen, rejected, aspect, language, subset.

Rows come from a local JSONL / JSON / Parquet file (or a Hugging Face dataset id, see
tables.read_rows). A missing column, an empty or non-string field, or a repeated id is an error
that names the file, the row (1-based, in file order) and the column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..tables import DataError, read_rows

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
    seen: dict[Any, int] = {}
    id_type = None
    for i, row in enumerate(rows, 1):
        missing = [c for c in CRB_COLUMNS if c not in row or row[c] is None]
        if missing:
            raise DataError(
                f"{source}, row {i}: missing column {missing[0]!r} (a CRB row needs {', '.join(CRB_COLUMNS)})"
            )
        rid = row["id"]
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise DataError(
                f"{source}, row {i}, column 'id': expected a string or an integer, got {type(rid).__name__}"
            )
        if isinstance(rid, str) and not rid.strip():
            raise DataError(f"{source}, row {i}, column 'id': empty string")
        if id_type is None:
            id_type = type(rid)
        elif type(rid) is not id_type:
            raise DataError(
                f"{source}, row {i}, column 'id': {type(rid).__name__} id among {id_type.__name__} ids; use one type"
            )
        if rid in seen:
            raise DataError(f"{source}, row {i}, column 'id': id {rid!r} repeats row {seen[rid]}")
        seen[rid] = i
        for col in TEXT_COLUMNS:
            value = row[col]
            if not isinstance(value, str):
                raise DataError(f"{source}, row {i}, column {col!r}: expected a string, got {type(value).__name__}")
            if not value.strip():
                raise DataError(f"{source}, row {i}, column {col!r}: empty string")
        pairs.append(Pair(rid, *(row[c] for c in TEXT_COLUMNS), row=i))
    return pairs
