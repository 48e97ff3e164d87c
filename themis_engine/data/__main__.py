"""`python -m themis_engine.data preview`: see what a run trains on or scores, pair by pair.

    python -m themis_engine.data preview --config run.yaml                       # a training config: 3 pairs
    python -m themis_engine.data preview --preset themis-pm --model.path Qwen3-8B --data.train pairs.jsonl \\
        --rows 3,17,42                                                           # rows counted from 1
    python -m themis_engine.data preview --for eval path/to/rm --data crb.jsonl --use-aspect-prompts --json
    python -m themis_engine.data preview --config run.yaml --first 0 --json --write preview.jsonl   # every row

`--for train` (the default) takes the trainer's settings (themis_engine.train.config.TrainConfig:
`--config FILE.yaml`, `--preset`, `--section.key=value`); `--for eval` the evaluator's
(`python -m themis_engine.eval`'s MODEL and options). Either way the rows, the tokenizer and chat
template, max_length, the criteria system prompts and the heads are those of the run, and the
tokens come from the functions the run calls (themis_engine.data.preview). The options of the
preview itself:

    --rows 3,17,42     the rows to show, counted from 1 (a row that is not there: one line naming it)
    --first N          without --rows: the first N rows (default 3; 0: every row)
    --json             one JSON object per pair (the fields of themis_engine.data.preview's docstring)
    --write FILE       write to FILE instead of the standard output (atomically)
    --color auto|always|never   colours (auto: when the output is a terminal and NO_COLOR is not set)
    --files train|eval training only: the rows of data.train (default) or of data.eval

A bad setting or row is one line, `themis_engine.data: error: ...` naming the file, row or key, and
exit status 2 (`--debug` or THEMIS_DEBUG=1 adds the traceback).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Literal

from themis_engine.config import ConfigError, check_number, option, parse_args, run_cli
from themis_engine.eval.config import EvalConfig, _gather_compare
from themis_engine.train.config import PRESETS, TrainConfig

PROG = "python -m themis_engine.data"
COMMANDS = {"preview": "see what a run trains on or scores: tokens, spans, heads and LM targets per pair"}
FOR = ("train", "eval")


@dataclass
class PreviewOptions:
    """The preview's own options (top-level flags beside the run's settings)."""

    rows: list[int] = option(factory=list, help="the rows to show, counted from 1, e.g. 3,17,42 (default: the "
                                                "first --first rows)")
    first: int = option(3, "without --rows: show the first N rows (0: every row)")
    json: bool = option(False, "one JSON object per pair (ids, spans, target mask, heads, reasons) instead of text")
    write: str = option("", "write the preview to this file instead of the standard output")
    color: Literal["auto", "always", "never"] = option("auto", "colours: auto = when writing to a terminal and "
                                                                "NO_COLOR is not set")

    def check_preview(self) -> None:
        check_number("--first", self.first, low=0, integer=True)


@dataclass
class TrainPreview(TrainConfig, PreviewOptions):
    """The trainer's settings plus the preview's options."""

    files: Literal["train", "eval"] = option("train", "preview the rows of data.train (and the synthetic pairs) or "
                                                      "of data.eval")


@dataclass
class EvalPreview(EvalConfig, PreviewOptions):
    """The evaluator's settings plus the preview's options."""


def preview_from_args(argv: list[str]) -> tuple[list[dict], object, PreviewOptions]:
    """The records `preview` shows for these arguments (without the subcommand), the tokenizer they
    were made with, and the parsed settings: the objects of `--json`, for the CLI and for tests."""
    argv = list(argv)
    purpose = "train"
    for k, arg in enumerate(argv):
        if arg == "--for" or arg.startswith("--for="):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[k + 1] if k + 1 < len(argv) else "")
            if value not in FOR:
                raise ConfigError(f"--for: expected one of {', '.join(FOR)}, got {value!r}")
            purpose = value
            del argv[k: k + (1 if "=" in arg else 2)]
            break
    if purpose == "train":
        from themis_engine.train.__main__ import split_legacy_shape_flags
        from themis_engine.train.trainer import preview_data, preview_tokenizer

        argv, legacy = split_legacy_shape_flags(argv)
        cfg = parse_args(TrainPreview, argv, prog=f"{PROG} preview [--for train]", description=__doc__,
                         presets=PRESETS)
        if legacy:
            from themis_engine.train.config import ShapeOverrides

            cfg.model.overrides = ShapeOverrides({**cfg.model.overrides, **legacy})
        cfg.check()
        cfg.check_preview()
        tokenizer = preview_tokenizer(cfg)
        records = preview_data(cfg, tokenizer, rows=cfg.rows or None, first=cfg.first, files=cfg.files)
    else:
        from themis_engine.eval.run import preview_inputs, preview_records

        cfg = parse_args(EvalPreview, _gather_compare(argv), prog=f"{PROG} preview --for eval", description=__doc__)
        check_number("--max-length", cfg.max_length, low=2, integer=True)
        cfg.check_preview()
        pairs, systems, heads, criteria, tokenizer = preview_inputs(cfg)
        records = preview_records(cfg, pairs, systems, heads, criteria, tokenizer, rows=cfg.rows or None,
                                  first=cfg.first)
    return records, tokenizer, cfg


def preview_command(argv: list[str]) -> int:
    from themis_engine.data.preview import format_preview, write_jsonl

    records, tokenizer, cfg = preview_from_args(argv)
    if cfg.json and cfg.write:
        text = ""  # write_jsonl below writes the records itself
    elif cfg.json:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        color = cfg.color == "always" or (cfg.color == "auto" and not cfg.write and sys.stdout.isatty()
                                          and not os.environ.get("NO_COLOR"))
        text = format_preview(records, tokenizer, color=color)
    if cfg.write:
        if cfg.json:
            write_jsonl(records, cfg.write)
        else:
            from themis_engine.fileio import atomic_write

            def write(tmp):
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(text)

            atomic_write(cfg.write, write)
        print(f"wrote the preview of {len(records)} pair{'s' if len(records) != 1 else ''} to {cfg.write}",
              file=sys.stderr)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return 0


def usage() -> str:
    lines = [f"usage: {PROG} COMMAND [options]   ({PROG} COMMAND --help: its options)", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise ConfigError(f"unknown command {command!r}; the commands are {', '.join(COMMANDS)} (see --help)")
    return preview_command(rest)


def main(argv: list[str] | None = None) -> int:
    """`python -m themis_engine.data COMMAND ...`: 0, or 2 with one line on stderr on a user error."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return run_cli("themis_engine.data", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
