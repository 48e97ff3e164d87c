"""Training a Bradley-Terry code reward model: `python -m themis_engine.train` (see __main__.py).

    config.py       TrainConfig (typed sections, help per field) and the presets (themis-pt, themis-pm, demo)
    trainer.py      Trainer: a few small methods (train_step, forward_backward) calling the pieces below
    objective.py    BT + reward magnitude + LM regularisation, global normalisers
    microbatch.py   preference pairs -> packed prefix-shared training micro-batches with LM targets
    parallelize.py  activation checkpointing, then torch.compile, then FSDP2, per block
    optim.py        AdamW parameter groups and the warm-up + cosine schedule
    checkpoint.py   atomic checkpoints, exact resume, the CheckpointManager (cadence, pruning)
    validate.py     the held-out evaluation (the evaluator's per-aspect / per-language grouping)
    metrics.py      metrics.jsonl, TensorBoard, the progress bar
"""

from themis_engine.train.config import PRESETS, TrainConfig
from themis_engine.train.trainer import Trainer, TrainingError

__all__ = ["PRESETS", "TrainConfig", "Trainer", "TrainingError"]
