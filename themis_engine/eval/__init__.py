"""The CodeRewardBench evaluator's pieces; `python -m themis_engine.eval` (themis_engine/eval.py)
puts them together.

    rows.py      CRB rows: read, validate (errors name file, row, column), --limit
    results.py   results.json and scores.parquet, in the published CRB format
    partial.py   finished rows of an interrupted run (--resume), one append-only file per rank
    report.py    report.md, report.png (aspect x language heatmap) and the --compare leaderboard
"""

from themis_engine.eval.partial import PartialStore, ResumeError
from themis_engine.eval.results import compile_results, read_scores, write_results_json, write_scores_parquet
from themis_engine.data.schemas import CRB_COLUMNS, CRBRow as Pair, load_crb_rows as load_pairs

__all__ = [
    "CRB_COLUMNS",
    "Pair",
    "PartialStore",
    "ResumeError",
    "compile_results",
    "load_pairs",
    "read_scores",
    "write_results_json",
    "write_scores_parquet",
]
