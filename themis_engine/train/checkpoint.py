"""Training checkpoints: model, optimizer, trainer state (step, RNG, data position), written atomically.

`CheckpointManager` owns the cadence (as torchtitan's): the trainer calls `manager.save(step,
last_step=...)` after every optimizer step and the manager decides whether this step is written
(every `checkpoint_every` steps, and the last step), prunes to the newest `keep`, and resumes from
the newest complete one (`manager.load()`).

A checkpoint is a folder `step_000120/` under `<output>/checkpoints/`, holding `model.pt`,
`optim.pt` (full, unsharded state dicts in float32 on the CPU, gathered from every FSDP rank) and
`trainer.json`. It is written as `.step_000120.tmp*` and renamed when complete, so a crash mid-write
leaves the previous checkpoints as they were; only the last `keep` are kept. The files hold tensors,
numbers and strings only and are read back with `torch.load(weights_only=True)` (no code runs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

_NAME = re.compile(r"^step_(\d{6,})$")


def checkpoint_dir(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def latest(output: str | Path) -> Path | None:
    """The newest complete checkpoint under output, or None."""
    root = checkpoint_dir(output)
    if not root.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir())
    return found[-1][1] if found else None


def save(output, step: int, model, optimizer, trainer_state: dict, is_main: bool, keep: int = 2) -> Path | None:
    """Gather the full state (a collective: every rank calls it) and write it on rank 0."""
    model_sd, optim_sd = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    final = checkpoint_dir(output) / f"step_{step:06d}"
    if is_main:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp", dir=final.parent))
        try:
            torch.save(model_sd, tmp / "model.pt")
            torch.save(optim_sd, tmp / "optim.pt")
            (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2, sort_keys=True))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _prune(output, keep)
    if dist.is_initialized():
        dist.barrier()
    return final


def load(path: str | Path, model, optimizer) -> dict:
    """Restore model and optimizer (every rank reads the full state, FSDP takes its shard)."""
    path = Path(path)
    model_sd = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    optim_sd = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True))
    return json.loads((path / "trainer.json").read_text())


def _prune(output, keep: int) -> None:
    root = checkpoint_dir(output)
    done = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)))
    for _, p in done[: max(0, len(done) - max(keep, 1))]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.iterdir():  # leftovers of an interrupted write
        if p.name.startswith(".step_") and ".tmp" in p.name:
            shutil.rmtree(p, ignore_errors=True)


class CheckpointManager:
    """Saves and restores one run's checkpoints under `<output>/checkpoints/`.

    model / optimizer: what is saved (the FSDP-sharded objective and its AdamW; the state is gathered
    in full); trainer_state: a callable giving the JSON-able trainer state at save time (step, RNG,
    config). every: write every N steps (0 = only the last step); keep: checkpoints kept.
    Every rank calls `save` and `load` (collectives); only rank 0 (`is_main`) writes."""

    def __init__(self, output, model, optimizer, trainer_state: Callable[[], dict], *, every: int = 0,
                 keep: int = 2, is_main: bool = True):
        self.output = Path(output)
        self.model = model
        self.optimizer = optimizer
        self.trainer_state = trainer_state
        self.every = int(every)
        self.keep = int(keep)
        self.is_main = is_main

    def due(self, step: int, last_step: bool = False) -> bool:
        """Whether step `step` is written: the last step, or a multiple of `every`."""
        return last_step or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, last_step: bool = False, force: bool = False) -> Path | None:
        """Write the checkpoint of step `step` when it is due (or `force`); its folder, else None."""
        if not (force or self.due(step, last_step)):
            return None
        return save(self.output, step, self.model, self.optimizer, self.trainer_state(), self.is_main, self.keep)

    def latest(self) -> Path | None:
        return latest(self.output)

    def load(self, path: str | Path | None = None) -> dict | None:
        """Restore model and optimizer from `path` (default: the newest complete checkpoint) and return
        the trainer state saved with it; None when there is none."""
        path = self.latest() if path is None else Path(path)
        if path is None:
            return None
        return load(path, self.model, self.optimizer)
