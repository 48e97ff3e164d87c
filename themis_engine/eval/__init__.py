"""The CodeRewardBench evaluator: `python -m themis_engine.eval MODEL --data FILE --output DIR`.

Every row (id, prompt, chosen, rejected, aspect, language, subset) is scored twice, chosen and
rejected, with the prompt prefix computed once (Scorer.score_pairs); a row is correct when
score(chosen) > score(rejected) strictly. The outputs are those of the published CRB results
(results.py): results.json and scores.parquet, plus report.md and report.png, and with
`--compare DIR...` a leaderboard of this run beside other result directories.

    python -m themis_engine.eval path/to/rm --data crb.parquet --output runs/rm --use-aspect-prompts
    python -m themis_engine.eval path/to/rm --data crb.jsonl --output runs/rm --resume \\
        --compare ../shared/data/crb-published-results
    torchrun --nproc_per_node 8 -m themis_engine.eval path/to/rm --data crb.parquet --output runs/rm

The pieces (CRB rows are read and validated by themis_engine.data.schemas):

    config.py    EvalConfig (the options, their check), DTYPES, parse (the command line)
    run.py       the run: heads and system prompts per row, the chunked scoring loop, main
    results.py   results.json and scores.parquet, in the published CRB format
    partial.py   finished rows of an interrupted run (--resume), one append-only file per rank
    report.py    report.md, report.png (aspect x language heatmap) and the --compare leaderboard

`themis_engine.eval.run` is the run's module; its `run(cfg)` is also exported here as `evaluate`.
"""

from themis_engine.data.schemas import CRB_COLUMNS
from themis_engine.data.schemas import CRBRow as Pair
from themis_engine.data.schemas import load_crb_rows as load_pairs
from themis_engine.errors import EvalError, ResumeError
from themis_engine.eval.config import DTYPES, EvalConfig, parse
from themis_engine.eval.partial import PartialStore
from themis_engine.eval.results import compile_results, read_scores, write_results_json, write_scores_parquet
from themis_engine.eval.run import fingerprint, load_scorer, main, resolve_heads, resolve_systems
from themis_engine.eval.run import run as evaluate

__all__ = [
    "CRB_COLUMNS",
    "DTYPES",
    "EvalConfig",
    "EvalError",
    "Pair",
    "PartialStore",
    "ResumeError",
    "compile_results",
    "evaluate",
    "fingerprint",
    "load_pairs",
    "load_scorer",
    "main",
    "parse",
    "read_scores",
    "resolve_heads",
    "resolve_systems",
    "write_results_json",
    "write_scores_parquet",
]
