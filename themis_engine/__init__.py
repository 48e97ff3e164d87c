"""themis_engine: training, scoring and evaluation of code reward models on packed, prefix-shared
token streams (see ARCHITECTURE.md in the project's shared folder for the batch contract).

    import themis_engine as te
    scorer = te.Scorer.from_pretrained("path/to/rm")
    scores = scorer.score([[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]])
"""

from themis_engine import _compat
from themis_engine.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    EvalError,
    InputError,
    PackingError,
    ThemisError,
    TrainingError,
)
from themis_engine.model import DEFAULT_CRITERIA, ModelArgs, RewardModel
from themis_engine.packing import PackedBatch, SegmentMeta
from themis_engine.scoring import Scorer, ScoreReport

_compat.install()

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "EvalError",
    "ThemisError",
    "TrainingError",
    "DEFAULT_CRITERIA",
    "InputError",
    "ModelArgs",
    "PackedBatch",
    "PackingError",
    "RewardModel",
    "ScoreReport",
    "Scorer",
    "SegmentMeta",
]
