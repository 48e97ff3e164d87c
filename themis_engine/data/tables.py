"""Reading and writing row tables: local JSONL and Parquet (and Hugging Face dataset ids when the
`datasets` package is installed and the hub reachable). Parquet needs pyarrow
(`pip install themis-engine[data]`); JSONL needs nothing.

Rows are plain dicts. Errors (DataError) name the file and the line, with the byte offset of text
that is not UTF-8 and the column of JSON that does not parse.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from themis_engine.errors import DataError
from themis_engine.fileio import atomic_write

_BOM = b"\xef\xbb\xbf"


def _require_pyarrow(what: str):
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError(f"{what} needs pyarrow: pip install 'themis-engine[data]' (or pip install pyarrow)") from None
    import pyarrow

    return pyarrow


def is_saved_dataset(path: str | Path) -> bool:
    """A folder written by Hugging Face datasets' `save_to_disk` (a Dataset or a DatasetDict)."""
    path = Path(path)
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _read_saved_dataset(path: Path, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: a folder written by datasets' save_to_disk; reading it needs "
                        "`pip install datasets`") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 -- arrow and datasets raise many kinds
        raise DataError(f"{path}: datasets.load_from_disk failed ({type(err).__name__}: {err})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: a DatasetDict without the split {split!r} (it has {', '.join(ds)})")
        ds = ds[split]
    return [dict(r) for r in ds]


def read_rows(source: str | Path, split: str = "train", skipped: Counter | None = None) -> list[dict[str, Any]]:
    """All rows of a .jsonl / .json (a list of objects) / .parquet file, or of a Hugging Face dataset
    id (`split` of it) when the path does not exist and `datasets` is installed.

    Every problem reading the file is a DataError naming the file and where in it: a JSONL line
    that is not UTF-8 (the line and the byte offset in the file), not JSON (line and column), nested
    too deeply or not an object; a .json file likewise; a .parquet file that is not Parquet (a CSV
    renamed, an empty or cut-short file). skipped: a Counter; when given, a bad JSONL line is
    counted in it by reason (not_utf8, bad_json, not_an_object) and left out instead (the data's
    on_bad_row="skip")."""
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
    if path.is_dir():
        if is_saved_dataset(path):
            return _read_saved_dataset(path, split)
        raise DataError(f"{path}: a folder, not a data file (.jsonl, .json or .parquet) nor a folder written by "
                        "datasets' save_to_disk")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, skipped)
    if suffix == ".json":
        raw = path.read_bytes()
        bom = len(_BOM) if raw.startswith(_BOM) else 0
        try:
            data = json.loads(raw[bom:].decode("utf-8"))
        except UnicodeDecodeError as err:
            line = raw.count(b"\n", 0, bom + err.start) + 1
            raise DataError(f"{path}, line {line} (byte {bom + err.start}): not UTF-8 text ({err.reason}); "
                            "expected a JSON list of objects") from None
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg}); "
                            "expected a JSON list of objects") from None
        except RecursionError:
            raise DataError(f"{path}: nested too deeply; expected a JSON list of objects") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects, got a {type(data).__name__}")
        for i, r in enumerate(data, 1):
            if not isinstance(r, dict):
                raise DataError(f"{path}, row {i}: expected a JSON object, got {type(r).__name__}")
        return data
    if suffix == ".parquet":
        _require_pyarrow(f"reading {path}")
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as err:
            if isinstance(err, (FileNotFoundError, PermissionError)):
                raise
            size = path.stat().st_size
            what = "an empty file" if size == 0 else f"{size} bytes"
            raise DataError(f"{path}: not a readable Parquet file ({what}; pyarrow: {' '.join(str(err).split())}); "
                            "expected a Parquet table (a CSV or JSONL file needs its own suffix)") from None
    raise DataError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")


def _read_jsonl(path: Path, skipped: Counter | None) -> list[dict[str, Any]]:
    """JSON Lines, one object per non-blank line (see read_rows)."""
    rows = []
    offset = 0  # of the line's first byte in the file

    def bad(reason: str, message: str) -> None:
        if skipped is None:
            raise DataError(message)
        skipped[reason] += 1

    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if line_no == 1 and raw.startswith(_BOM):  # a UTF-8 byte-order mark opens the file
                raw, start = raw[len(_BOM):], start + len(_BOM)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                bad("not_utf8", f"{path}, line {line_no} (byte {start + err.start} of the file): not UTF-8 text "
                                f"({err.reason}); expected one JSON object per line, UTF-8 encoded")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                bad("bad_json", f"{path}, line {line_no}, column {err.colno}: not valid JSON ({err.msg}); "
                                "expected one JSON object per line")
                continue
            except RecursionError:
                bad("bad_json", f"{path}, line {line_no}: nested too deeply; expected one JSON object per line")
                continue
            if not isinstance(row, dict):
                bad("not_an_object", f"{path}, line {line_no}: expected a JSON object, got {type(row).__name__}")
                continue
            rows.append(row)
    return rows


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
