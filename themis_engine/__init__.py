"""themis_engine: training, scoring and evaluation of code reward models on packed, prefix-shared
token streams (see ARCHITECTURE.md in the project's shared folder for the batch contract).

    import themis_engine as te
    scorer = te.Scorer.from_pretrained("path/to/rm")
    scores = scorer.score([[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]])
"""

import importlib.util as _ilu
import os as _os

if _ilu.find_spec(__name__ + ".kernels") is None:
    # Run from a source tree that was not installed: setup.py maps kernels/ to themis_engine.kernels,
    # so let this package find it at the tree's root too.
    __path__.append(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

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
