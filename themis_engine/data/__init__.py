"""Data: the rows the trainer and the evaluator read, and what they become.

    tables.py     JSONL / JSON / Parquet / HF dataset ids -> rows; rows -> JSONL / Parquet (atomic)
    schemas.py    row validation, the one place: training pairs (themis / crb / trl) and CRB rows
    prompts.py    criteria prompt texts, and the system message each training pair gets
    tokenize.py   pairs -> token ids exactly as the Scorer computes them (the chat path), in memory
    store.py      the token store: tokenized pairs on disk, memory-mapped, built by worker processes
    synthetic.py  the generated multilingual code-preference set of the demo
    workload.py   a seeded CodeRewardBench-shaped token workload for the benchmarks
    preview.py    what is trained and scored, pair by pair: ids, spans, heads, LM targets (records, text)
    __main__.py   `python -m themis_engine.data preview`: the preview of a run's rows (--for train / eval)
"""

from themis_engine.data.preview import format_preview, preview_pairs
from themis_engine.data.prompts import (
    ALL_CRITERIA_PROMPT,
    CRITERION_PROMPTS,
    DEFAULT_PROPORTIONS,
    PROMPT_ALL,
    PROMPT_NONE,
    PROMPT_OWN,
    SYSTEM_PROMPT_MODES,
    CriteriaPrompts,
    assign_system_prompts,
    combine_system,
    draw_prompt_kinds,
)
from themis_engine.data.schemas import (
    BAD_ROW_POLICIES,
    CRB_COLUMNS,
    SCHEMAS,
    BadRow,
    CRBRow,
    LoadReport,
    PreferencePair,
    load_crb_rows,
    load_pairs,
    pairs_to_rows,
    row_error,
    text_field,
    validate_crb_rows,
)
from themis_engine.data.tables import read_rows, write_jsonl, write_parquet
from themis_engine.data.tokenize import (
    OVERFLOW_POLICIES,
    TokenizedPair,
    conversations,
    tokenize_pairs,
    tokenizer_fingerprint,
)
from themis_engine.errors import DataError

__all__ = [
    "ALL_CRITERIA_PROMPT", "BAD_ROW_POLICIES", "CRB_COLUMNS", "CRITERION_PROMPTS", "DEFAULT_PROPORTIONS",
    "OVERFLOW_POLICIES", "PROMPT_ALL", "PROMPT_NONE", "PROMPT_OWN", "SCHEMAS", "SYSTEM_PROMPT_MODES", "BadRow",
    "CRBRow", "CriteriaPrompts", "DataError", "LoadReport", "PreferencePair", "TokenizedPair",
    "assign_system_prompts", "combine_system", "conversations", "draw_prompt_kinds", "format_preview",
    "load_crb_rows", "load_pairs", "pairs_to_rows", "preview_pairs", "read_rows", "row_error", "text_field",
    "tokenize_pairs", "tokenizer_fingerprint", "validate_crb_rows", "write_jsonl", "write_parquet",
]
