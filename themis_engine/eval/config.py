"""The evaluator's settings (EvalConfig) and its command line: `python -m themis_engine.eval MODEL
--data FILE --output DIR [--flag ...]` through the one config system (config.parse_args)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Literal, Optional

from themis_engine.config import check_number, option, parse_args
from themis_engine.errors import ConfigError
from themis_engine.scoring.budget import DEFAULT_TOKENS_PER_BATCH

DESCRIPTION = "`python -m themis_engine.eval MODEL --data FILE --output DIR`: the CodeRewardBench protocol."
# --dtype spellings -> the dtype name Scorer.from_pretrained takes (None: its default)
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "auto": None}


@dataclass
class EvalConfig:
    """CodeRewardBench evaluation of a reward model."""

    model: str = option("", "the reward model: a local Hugging Face folder (config.json, *.safetensors, "
                        "tokenizer files)", positional=True)
    data: str = option("", "CRB rows (id, prompt, chosen, rejected, aspect, language, subset): a .jsonl, .json "
                       "or .parquet file, or a Hugging Face dataset id when `datasets` is installed")
    split: str = option("train", "the split to read when --data is a Hugging Face dataset id")
    output: str = option("", "output directory: results.json, scores.parquet, report.md, report.png, partial/")
    use_system_prompts: bool = option(False, "give every pair a system prompt listing all criteria")
    use_aspect_prompts: bool = option(False, "give every pair its own aspect's criterion prompt as the system "
                                      "prompt (wins over --use-system-prompts)")
    criteria_prompts: Optional[str] = option(None, "a JSON/YAML map {criterion: prompt text, optional \"ALL\": "
                                             "text} replacing the built-in prompts (data/prompts.py)")
    max_length: int = option(4096, "longest sequence (system + prompt + response, templated) in tokens")
    max_tokens_per_batch: Optional[int] = option(None, "token budget of one packed micro-batch (default: the "
                                                 "Scorer's: measured from free memory on CUDA, else "
                                                 f"{DEFAULT_TOKENS_PER_BATCH} or the largest pair when larger)")
    on_overflow: Literal["truncate", "error"] = option("truncate", "a sequence over --max-length: truncate the "
                                                       "response (the template's closing tokens kept) or stop")
    chat_template: Optional[str] = option(None, "a Jinja chat template (a file, or the text) for a model folder "
                                          "whose tokenizer has none, or to replace its own")
    head: str = option("auto", "which reward head scores a row: auto (a multi-head model: the head named like "
                       "the row's aspect; a one-head model: head 0), a head name, or a head index")
    limit: Optional[int] = option(None, "evaluate only the first N rows")
    device: Optional[str] = option(None, "cpu, cuda, cuda:N (default: cuda where present; under torchrun "
                                   "cuda:LOCAL_RANK)")
    dtype: Optional[str] = option(None, "float32, bfloat16 or float16 (default: bfloat16 on CUDA, else the "
                                  "checkpoint's dtype)")
    resume: bool = option(False, "keep the rows an interrupted run in --output finished; score only the rest")
    chunk_size: int = option(256, "pairs scored between two saves of the partial results")
    compare: list[str] = option([], "result directories to rank this run against (each holding a results.json, "
                                "or sub-directories that do), e.g. the published crb-published-results; its values "
                                "run to the next --flag, so give MODEL before it")
    name: Optional[str] = option(None, "this run's name in the report and leaderboard (default: the model "
                                 "folder's name)")
    progress: bool = option(True, "show a progress bar (pairs/s)")
    preview: bool = option(True, "before scoring, print the first row as `python -m themis_engine.data preview --for "
                           "eval` shows it: the rendered conversation, shared prefix, chosen and rejected, system "
                           "prompt, head and cut")
    preview_file: bool = option(False, "also write the preview of every row (JSON lines, the fields of `preview "
                                "--json`) to OUTPUT/preview.jsonl")
    dist_timeout_minutes: int = option(120, "under torchrun: how long a rank waits for the others")

    def check(self) -> None:
        """Raise ConfigError naming the first option that cannot work."""
        for key in ("model", "data", "output"):
            if not getattr(self, key):
                raise ConfigError(f"{'MODEL' if key == 'model' else '--' + key} is required (see --help)")
        if self.chunk_size < 1:
            raise ConfigError(f"--chunk-size must be at least 1, got {self.chunk_size}")
        if self.max_length < 2:
            raise ConfigError(f"--max-length must be at least 2, got {self.max_length}")
        if self.limit is not None:
            check_number("--limit", self.limit, low=1, integer=True)
        if self.max_tokens_per_batch is not None:
            check_number("--max-tokens-per-batch", self.max_tokens_per_batch, low=1, integer=True)
        check_number("--dist-timeout-minutes", self.dist_timeout_minutes, low=1, integer=True)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.criteria_prompts and not (self.use_system_prompts or self.use_aspect_prompts):
            raise ConfigError("--criteria-prompts has no effect without --use-system-prompts or --use-aspect-prompts")



def _gather_compare(argv: list[str]) -> list[str]:
    """`--compare A B C` (several values, as a shell glob gives them) -> one `--compare=[...]`."""
    rest, dirs, given = [], [], False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--compare":
            given = True
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                dirs.append(argv[i])
                i += 1
            continue
        if arg.startswith("--compare="):
            given = True
            value = arg.split("=", 1)[1]
            dirs.extend(json.loads(value) if value.startswith("[") else [v for v in value.split(",") if v])
        else:
            rest.append(arg)
        i += 1
    return rest + ([f"--compare={json.dumps(dirs)}"] if given else [])


def parse(argv: list[str] | None = None) -> EvalConfig:
    argv = list(sys.argv[1:] if argv is None else argv)
    return parse_args(EvalConfig, _gather_compare(argv), prog="python -m themis_engine.eval",
                      description=DESCRIPTION)
