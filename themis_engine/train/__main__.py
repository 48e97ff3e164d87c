"""`python -m themis_engine.train`: train a Bradley-Terry code reward model.

    python -m themis_engine.train --preset demo                       # anywhere, minutes, no download
    python -m themis_engine.train --preset themis-pm --model.path Qwen3-8B --data.train pairs.jsonl
    torchrun --nproc_per_node 8 -m themis_engine.train --config run.yaml
    python -m themis_engine.train --help                              # every field with its help
"""

from __future__ import annotations

import sys

from themis_engine.config import ConfigError, parse_args
from themis_engine.train.config import PRESETS, TrainConfig


def main(argv=None) -> int:
    try:
        cfg = parse_args(TrainConfig, argv, prog="python -m themis_engine.train", description=__doc__,
                         presets=PRESETS)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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


def format_final(final: dict) -> str:
    lines = [f"held-out accuracy: {final.get('eval/accuracy', float('nan')):.1%}"]
    for prefix, title in (("eval/accuracy/", "per criterion"), ("eval/accuracy_language/", "per language")):
        items = [(k[len(prefix):], v) for k, v in final.items() if k.startswith(prefix)]
        if items:
            lines.append(f"  {title}: " + ", ".join(f"{name} {v:.1%}" for name, v in items))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
