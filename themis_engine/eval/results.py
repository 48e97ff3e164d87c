"""results.json and scores.parquet, in the format of the published CodeRewardBench results.

results.json (as the Themis authors' evaluator writes it, `json.dump(..., indent=2)`):

    {"overall": {"accuracy", "total_examples", "correct_predictions", "mean_score_difference",
                 "median_score_difference", "std_score_difference"},
     "by_aspect" | "by_language" | "by_subset": {name: {"accuracy", "count"}},
     "checks": {"identical_pairs", "non_finite_scores", "null_values"}}

Key order as above; group names sorted; floats rounded to 4 decimals the way pandas rounds
(numpy round half to even on the scaled value); the standard deviation is the sample one
(ddof=1, pandas' `Series.std`); no trailing newline. A row is correct when its chosen score is
strictly greater than its rejected score (a tie is wrong); score_diff = chosen - rejected.

`checks` (after the published keys, which readers of the published files ignore) says what the
numbers above cannot: how many rows have chosen == rejected (identical texts: scored alike, so
counted wrong), how many rows have a non-finite score (NaN or inf: counted wrong, left out of the
score-difference statistics as pandas leaves NaN out), and how many values of this file are null
because they were not finite. The file is strict JSON (no NaN or Infinity tokens): a non-finite
value is written as null and counted in `null_values`.

scores.parquet: one row per pair, in data order; columns chosen_score, rejected_score (float64),
correct (bool), score_diff (float64), language, aspect, subset (string), and `id` stored as a
pandas index (the `pandas` schema metadata names it), so `pd.read_parquet` gives a frame indexed
by id, as `df.set_index("id").to_parquet(index=True)` would. Written with pyarrow alone (pandas
is not needed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from themis_engine.fileio import atomic_write

GROUPS = (("by_aspect", "aspect"), ("by_language", "language"), ("by_subset", "subset"))
SCORE_COLUMNS = ("chosen_score", "rejected_score", "correct", "score_diff", "language", "aspect", "subset")


def _round4(x) -> float:
    return float(np.round(np.float64(x), 4))


def grouped_accuracy(counts: Sequence[float], wins: Sequence[float], names: Sequence[str]) -> dict[str, float]:
    """{name: wins / count} of every group with pairs, in the order of `names`: the accuracy per
    aspect / language / subset, before results.json rounds it to 4 decimals. The trainer's held-out
    validation reports the same grouping (train/validate.py). Counts and wins are whole numbers, so
    the partial counts of several ranks add up exactly."""
    return {name: wins[i] / counts[i] for i, name in enumerate(names) if counts[i]}


def compile_results(
    chosen: Sequence[float],
    rejected: Sequence[float],
    aspect: Sequence[str],
    language: Sequence[str],
    subset: Sequence[str],
    identical: Sequence[bool] | None = None,
) -> dict:
    """Per-pair scores and labels -> the results.json mapping (see the module docstring).
    identical: per row, whether its chosen and rejected texts are the same (checks.identical_pairs;
    None: counted as 0)."""
    c = np.asarray(chosen, dtype=np.float64)
    r = np.asarray(rejected, dtype=np.float64)
    if c.shape != r.shape or c.ndim != 1 or len(c) == 0:
        raise ValueError(f"compile_results: need equal non-empty 1-D scores, got {c.shape} and {r.shape}")
    correct = c > r  # a tie (or a NaN) is wrong
    diff = c - r
    finite = diff[~np.isnan(diff)]  # pandas' statistics skip NaN
    n = len(finite)
    with np.errstate(invalid="ignore", over="ignore"):  # an inf difference: inf / NaN statistics, counted below
        overall = {
            "accuracy": _round4(correct.mean()),
            "total_examples": int(len(c)),
            "correct_predictions": int(correct.sum()),
            "mean_score_difference": _round4(finite.mean()) if n else float("nan"),
            "median_score_difference": _round4(np.median(finite)) if n else float("nan"),
            "std_score_difference": _round4(finite.std(ddof=1)) if n > 1 else float("nan"),
        }
    out: dict = {"overall": overall}
    labels = {"aspect": aspect, "language": language, "subset": subset}
    for key, column in GROUPS:
        values = np.asarray(labels[column], dtype=object)
        if len(values) != len(c):
            raise ValueError(f"compile_results: {len(values)} {column} labels for {len(c)} scores")
        names = sorted(set(values.tolist()))
        counts = [int((values == name).sum()) for name in names]
        wins = [int(correct[values == name].sum()) for name in names]
        accuracy = grouped_accuracy(counts, wins, names)
        out[key] = {name: {"accuracy": _round4(accuracy[name]), "count": n} for name, n in zip(names, counts)}
    if identical is not None and len(identical) != len(c):
        raise ValueError(f"compile_results: {len(identical)} identical flags for {len(c)} scores")
    out["checks"] = {
        "identical_pairs": int(sum(bool(x) for x in identical)) if identical is not None else 0,
        "non_finite_scores": int((~(np.isfinite(c) & np.isfinite(r))).sum()),
        "null_values": 0,
    }
    return out


def strict_json_value(value: Any) -> tuple[Any, int]:
    """(value with every non-finite float replaced by None, how many were replaced): what strict JSON
    (json.dumps(allow_nan=False)) can hold."""
    count = 0

    def walk(v):
        nonlocal count
        if isinstance(v, float) and not math.isfinite(v):
            count += 1
            return None
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        return v

    return walk(value), count


def dumps_strict(value: Any, **kwargs) -> tuple[str, int]:
    """json.dumps of `value` as strict JSON: (text, how many non-finite floats became null)."""
    clean, count = strict_json_value(value)
    return json.dumps(clean, allow_nan=False, **kwargs), count


def write_results_json(results: dict, path: str | Path) -> dict:
    """Atomically, byte for byte as the published files are laid out (indent 2, no final newline),
    as strict JSON: a non-finite value is written as null and counted in checks.null_values (added
    when the mapping has no `checks`). Returns the mapping as written."""
    clean, nulls = strict_json_value(results)
    if nulls:
        clean.setdefault("checks", {})["null_values"] = nulls
    text = json.dumps(clean, indent=2, allow_nan=False)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)
    return clean


def _pandas_metadata(id_is_int: bool) -> bytes:
    """The `pandas` schema metadata of a frame with SCORE_COLUMNS and an `id` index (pyarrow's layout)."""
    import pyarrow as pa

    try:
        import pandas

        pandas_version = pandas.__version__
    except ImportError:
        pandas_version = "2.2.3"  # the layout below is that of pandas 2.x

    def col(name, pandas_type, numpy_type):
        return {"name": name, "field_name": name, "pandas_type": pandas_type, "numpy_type": numpy_type,
                "metadata": None}

    columns = [
        col("chosen_score", "float64", "float64"),
        col("rejected_score", "float64", "float64"),
        col("correct", "bool", "bool"),
        col("score_diff", "float64", "float64"),
        col("language", "unicode", "object"),
        col("aspect", "unicode", "object"),
        col("subset", "unicode", "object"),
        col("id", "int64", "int64") if id_is_int else col("id", "unicode", "object"),
    ]
    meta = {
        "index_columns": ["id"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                            "metadata": {"encoding": "UTF-8"}}],
        "columns": columns,
        "attributes": {},
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": pandas_version,
    }
    return json.dumps(meta).encode("utf8")


def write_scores_parquet(
    path: str | Path,
    ids: Sequence,
    chosen: Sequence[float],
    rejected: Sequence[float],
    language: Sequence[str],
    aspect: Sequence[str],
    subset: Sequence[str],
) -> None:
    """Atomically write scores.parquet (see the module docstring); rows in the order given."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("scores.parquet needs pyarrow: pip install 'themis-engine[eval]'") from None

    c = np.asarray(chosen, dtype=np.float64)
    r = np.asarray(rejected, dtype=np.float64)
    id_is_int = bool(len(ids)) and isinstance(ids[0], int)
    arrays = [
        pa.array(c, pa.float64()),
        pa.array(r, pa.float64()),
        pa.array(c > r, pa.bool_()),
        pa.array(c - r, pa.float64()),
        pa.array(list(language), pa.string()),
        pa.array(list(aspect), pa.string()),
        pa.array(list(subset), pa.string()),
        pa.array(list(ids), pa.int64() if id_is_int else pa.string()),
    ]
    names = list(SCORE_COLUMNS) + ["id"]
    schema = pa.schema([pa.field(n, a.type) for n, a in zip(names, arrays)],
                       metadata={b"pandas": _pandas_metadata(id_is_int)})
    table = pa.Table.from_arrays(arrays, schema=schema)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_scores(path: str | Path) -> dict[str, list]:
    """scores.parquet -> {"id": [...], "chosen_score": [...], ...} (plain lists, data order)."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pydict()
