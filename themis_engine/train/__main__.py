"""`python -m themis_engine.train`: train a Bradley-Terry code reward model.

    python -m themis_engine.train --preset demo                       # anywhere, minutes, no download
    python -m themis_engine.train --preset themis-pm --model.path Qwen3-8B --data.train pairs.jsonl
    python -m themis_engine.train --preset demo --model.overrides="{num_layers: 4}"   # a bigger demo shape
    torchrun --nproc_per_node 8 -m themis_engine.train --config run.yaml
    python -m themis_engine.train --help                              # every field with its help

A bad setting, data file or checkpoint is one line naming the file, row, key or value, and exit
status 2 (`--debug` or THEMIS_DEBUG=1 prints the traceback too).
"""

from __future__ import annotations

import sys

from themis_engine.config import ConfigError, parse_args, run_cli
from themis_engine.train.config import LEGACY_SHAPE_FLAGS, PRESETS, ShapeOverrides, TrainConfig


def parse_config(argv=None) -> TrainConfig:
    """The run's TrainConfig from presets, config files and flags (ConfigError on a bad one)."""
    argv, legacy = split_legacy_shape_flags(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(TrainConfig, argv, prog="python -m themis_engine.train", description=__doc__,
                     presets=PRESETS)
    if legacy:
        cfg.model.overrides = ShapeOverrides({**cfg.model.overrides, **legacy})
    cfg.check()  # ranges, shapes, proportions; a path that is neither a folder nor a named shape
    return cfg


def main(argv=None) -> int:
    """0 when the run finished; 2 with one line on stderr on a user error (themis_engine.errors)."""
    return run_cli("themis_engine.train", _main, argv)


def _main(argv) -> int:
    cfg = parse_config(argv)
    from themis_engine import distributed
    from themis_engine.train.trainer import Trainer

    try:
        result = Trainer(cfg).fit()
    finally:
        distributed.shutdown()
    final = result["final"]
    if final:
        print(format_final(final))
    return 0


def split_legacy_shape_flags(argv) -> tuple[list[str], dict]:
    """Take the earlier shape flags (`--model.hidden_size=96`, `--model.num-layers 4`, ...) out of
    argv: (the other arguments, {field: value as given}), to be merged into model.overrides."""
    rest, legacy = [], {}
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg[2:].partition("=") if arg.startswith("--model.") else ("", "", "")
        name = key[len("model."):].replace("-", "_")
        if name in LEGACY_SHAPE_FLAGS:
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"--{key} needs a value")
                value, i = argv[i + 1], i + 1
            legacy[name] = value
        else:
            rest.append(arg)
        i += 1
    return rest, legacy


def format_final(final: dict) -> str:
    lines = [f"held-out accuracy: {final.get('eval/accuracy', float('nan')):.1%}"]
    for prefix, title in (("eval/accuracy/", "per criterion"), ("eval/accuracy_language/", "per language")):
        items = [(k[len(prefix):], v) for k, v in final.items() if k.startswith(prefix)]
        if items:
            lines.append(f"  {title}: " + ", ".join(f"{name} {v:.1%}" for name, v in items))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
