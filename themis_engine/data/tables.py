"""Reading and writing row tables: local JSONL and Parquet (and Hugging Face dataset ids when the
`datasets` package is installed and the hub reachable). Parquet needs pyarrow
(`pip install themis-engine[data]`); JSONL needs nothing.

Rows are plain dicts. Errors name the file and the line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from themis_engine.errors import DataError
from themis_engine.fileio import atomic_write


def _require_pyarrow(what: str):
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError(f"{what} needs pyarrow: pip install 'themis-engine[data]' (or pip install pyarrow)") from None
    import pyarrow

    return pyarrow


def read_rows(source: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """All rows of a .jsonl / .json (a list of objects) / .parquet file, or of a Hugging Face dataset
    id (`split` of it) when the path does not exist and `datasets` is installed."""
    path = Path(source)
    if not path.exists():
        if "/" in str(source) and not str(source).startswith((".", "/")):
            try:
                import datasets  # noqa: F401
            except ImportError:
                raise DataError(
                    f"{source}: no such file; as a Hugging Face dataset id it needs `pip install datasets`"
                ) from None
            import datasets

            try:
                ds = datasets.load_dataset(str(source), split=split)
            except Exception as err:  # network, unknown id, ...
                raise DataError(f"{source}: no such file, and loading it as a dataset id failed: {err}") from None
            return [dict(r) for r in ds]
        raise DataError(f"{source}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}, line {line_no}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}, line {line_no}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
        return rows
    if suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path}: expected a JSON list of objects")
        return data
    if suffix == ".parquet":
        _require_pyarrow(f"reading {path}")
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise DataError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")


def write_jsonl(rows: Iterable[dict], path: str | Path) -> None:
    """Write rows as JSONL atomically (temporary file, then rename)."""

    def write(tmp):
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    atomic_write(path, write)


def write_parquet(columns: dict[str, list], path: str | Path) -> None:
    """Write a column mapping as Parquet atomically."""
    pa = _require_pyarrow(f"writing {path}")
    import pyarrow.parquet as pq

    table = pa.table(columns)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
