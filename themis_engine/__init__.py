"""themis_engine: training, scoring and evaluation of code reward models on packed, prefix-shared
token streams (see ARCHITECTURE.md in the project's shared folder for the batch contract).

    import themis_engine as te
    scorer = te.Scorer.from_pretrained("path/to/rm")
    scores = scorer.score([[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]])
"""

from .config import DEFAULT_CRITERIA, ModelArgs
from .loading import CheckpointError
from .model import RewardModel, SegmentMeta
from .packing import PackedBatch, PackingError
from .scorer import InputError, ScoreReport, Scorer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
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
