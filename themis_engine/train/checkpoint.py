"""Training checkpoints: model, optimizer, trainer state (step, RNG, data position), written atomically
and verified before a resume trusts them.

`CheckpointManager` owns the cadence (as torchtitan's): the trainer calls `manager.save(step,
last_step=...)` after every optimizer step and the manager decides whether this step is written
(every `checkpoint_every` steps, and the last step), prunes to the newest `keep`, and resumes from
the newest checkpoint that verifies (`manager.load()`).

A checkpoint is a folder `step_000120/` under `<output>/checkpoints/`, holding `model.pt`,
`optim.pt` (full, unsharded state dicts in float32 on the CPU, gathered from every FSDP rank),
`trainer.json` and, written last, `manifest.json` (format version, step, and each file's size and
sha256). The files hold tensors, numbers and strings only and are read back with
`torch.load(weights_only=True)` (no code runs).

Nothing a kill leaves behind looks complete when it is not:

* a checkpoint is written as `.step_000120.tmp*` (every file flushed to disk, the manifest last)
  and renamed when complete;
* a folder that goes away (pruning, or an existing step written again) is first renamed to
  `.trash.*`, then deleted; leftovers of both kinds are removed at start (rank 0) and after saves;
* `latest()` returns the newest checkpoint whose manifest verifies (sizes and checksums) and logs
  every newer one it skipped, and why; a resume falls back to it, or stops with a CheckpointError
  that names each checkpoint and its problem when none verifies. A resume moves the damaged
  checkpoints newer than the one it continues from aside (`step_000120.damaged`), where neither a
  later resume nor pruning counts them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from themis_engine import distributed
from themis_engine.errors import CheckpointError

logger = logging.getLogger(__name__)

FORMAT = 1  # manifest.json's "format": bump when the layout changes
MANIFEST = "manifest.json"
FILES = ("model.pt", "optim.pt", "trainer.json")  # what every checkpoint holds besides its manifest
_NAME = re.compile(r"^step_(\d{6,})$")
_TRASH = ".trash."


def checkpoint_dir(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def step_folders(output: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `step_*` folder under output's checkpoints, oldest first (verified or not)."""
    root = checkpoint_dir(output)
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir())


def verify(path: str | Path, checksums: bool = True) -> str | None:
    """None when the checkpoint folder `path` is complete: its manifest reads, has a known format and
    the folder's step, lists every file, and each file has the listed size and (checksums) sha256.
    Otherwise what is wrong, in words."""
    path = Path(path)
    man = path / MANIFEST
    if not man.is_file():
        return f"no {MANIFEST} (an interrupted write, or a checkpoint of an older version)"
    try:
        manifest = json.loads(man.read_text())
        files = manifest["files"]
        fmt, step = manifest["format"], manifest["step"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} does not read ({type(err).__name__}: {err})"
    if fmt != FORMAT:
        return f"{MANIFEST} has format {fmt!r}, this version reads {FORMAT}"
    m = _NAME.match(path.name)
    if m and step != int(m.group(1)):
        return f"{MANIFEST} is for step {step!r}, the folder is {path.name}"
    if not isinstance(files, dict) or any(f not in files for f in FILES):
        return f"{MANIFEST} does not list {', '.join(f for f in FILES if f not in (files or {}))}"
    for name, entry in sorted(files.items()):
        f = path / name
        if not isinstance(entry, dict):
            return f"{MANIFEST}'s entry for {name} is not an object"
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as err:
            return f"{name} cannot be read ({err})"
        if size != entry.get("size"):
            return f"{name} has {size} bytes, the manifest says {entry.get('size')}"
        if checksums:
            try:
                digest = _sha256(f)
            except OSError as err:
                return f"{name} cannot be read ({err})"
            if digest != entry.get("sha256"):
                return f"{name} does not match its sha256 in the manifest (changed or damaged)"
    return None


def scan(output: str | Path, checksums: bool = True) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies (or None), and the newer ones skipped with their problems."""
    skipped = []
    for _, p in reversed(step_folders(output)):
        problem = verify(p, checksums)
        if problem is None:
            return p, skipped
        skipped.append((p, problem))
    return None, skipped


def latest(output: str | Path, checksums: bool = True) -> Path | None:
    """The newest checkpoint under output whose manifest verifies, or None; logs the ones it skipped."""
    found, skipped = scan(output, checksums)
    for p, problem in skipped:
        logger.warning("checkpoint %s skipped: %s", p, problem)
    return found


def save(output, step: int, model, optimizer, trainer_state: dict, is_main: bool, keep: int = 2) -> Path | None:
    """Gather the full state (a collective: every rank calls it) and write it on rank 0."""
    model_sd, optim_sd = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    root = checkpoint_dir(output)
    final = root / f"step_{step:06d}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{final.name}.tmp{secrets.token_hex(4)}"
        tmp.mkdir()  # (mkdir, not mkdtemp: the folder gets the umask's permissions, not 0700)
        try:
            files = {
                "model.pt": _write(tmp / "model.pt", lambda f: torch.save(model_sd, f)),
                "optim.pt": _write(tmp / "optim.pt", lambda f: torch.save(optim_sd, f)),
                "trainer.json": _write(tmp / "trainer.json", lambda f: f.write(
                    json.dumps(trainer_state, indent=2, sort_keys=True).encode())),
            }
            manifest = {"format": FORMAT, "step": int(step), "files": files}
            _write(tmp / f".{MANIFEST}.tmp", lambda f: f.write(json.dumps(manifest, indent=2).encode()))
            os.replace(tmp / f".{MANIFEST}.tmp", tmp / MANIFEST)  # last: the folder is complete
            _fsync_dir(tmp)
            _install(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _prune(root, keep)
    if dist.is_initialized():
        dist.barrier()
    return final


def load(path: str | Path, model, optimizer, verified: bool = False) -> dict:
    """Restore model and optimizer (every rank reads the full state, FSDP takes its shard) from the
    checkpoint folder `path` (checked against its manifest unless `verified`); returns the trainer
    state. CheckpointError, naming the file, for a checkpoint that does not verify or load."""
    path = Path(path)
    if not verified and (problem := verify(path)) is not None:
        raise CheckpointError(f"checkpoint {path}: {problem}")
    try:
        state = json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path / 'trainer.json'} does not read "
                              f"({type(err).__name__}: {err})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path / 'trainer.json'} holds {type(state).__name__}, not an object")
    model_sd, optim_sd = (_torch_load(path / name) for name in ("model.pt", "optim.pt"))
    try:
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))
    except Exception as err:
        raise CheckpointError(f"checkpoint {path}: the saved model/optimizer state does not fit this run's "
                              f"model (another shape or config?): {type(err).__name__}: {err}") from err
    return state


def clean_leftovers(output: str | Path) -> list[Path]:
    """Remove what interrupted writes left under output (rank 0, when nothing is being written):
    checkpoint temp folders (`.step_*.tmp*`), folders on their way out (`.trash.*`) and the export's
    temp files (`.<name>.*.tmp`). Returns what was removed."""
    removed = []
    root = checkpoint_dir(output)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(_TRASH) or (p.name.startswith(".step_") and ".tmp" in p.name):
                _remove(p)
                removed.append(p)
    export = Path(output) / "export"
    if export.is_dir():
        for p in export.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    if removed:
        logger.info("removed %d leftovers of an interrupted run: %s", len(removed),
                    ", ".join(p.name for p in removed))
    return removed


def _prune(root: Path, keep: int) -> None:
    done = step_folders(root.parent)
    for _, p in done[: max(0, len(done) - max(keep, 1))]:
        _remove(p)
    clean_leftovers(root.parent)


def _install(tmp: Path, final: Path) -> None:
    """Rename the complete folder `tmp` to `final`; an existing `final` is renamed out of the way
    first and deleted after, so no `step_*` folder is ever half there."""
    old = None
    if final.exists():
        old = final.parent / f"{_TRASH}{final.name}.{secrets.token_hex(4)}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove(p: Path) -> None:
    """Delete a folder: renamed to a `.trash.*` name first (atomic), then removed."""
    if not p.name.startswith(_TRASH):
        trash = p.parent / f"{_TRASH}{p.name}.{secrets.token_hex(4)}"
        try:
            os.rename(p, trash)
        except FileNotFoundError:
            return
        p = trash
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _set_aside(p: Path) -> Path:
    """Rename a damaged checkpoint to `step_N.damaged` (kept for inspection; never resumed from or pruned)."""
    target, n = p.with_name(p.name + ".damaged"), 0
    while target.exists():
        n += 1
        target = p.with_name(f"{p.name}.damaged.{n}")
    os.rename(p, target)
    return target


def _write(path: Path, fill: Callable) -> dict:
    """Write a file with `fill(binary file)`, flush it to disk; its size and sha256 (read back)."""
    with open(path, "wb") as f:
        fill(f)
        f.flush()
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # not every file system syncs a directory
        pass
    finally:
        os.close(fd)


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} does not load ({type(err).__name__}: {err})") from err


class CheckpointManager:
    """Saves and restores one run's checkpoints under `<output>/checkpoints/`.

    model / optimizer: what is saved (the FSDP-sharded objective and its AdamW; the state is gathered
    in full); trainer_state: a callable giving the JSON-able trainer state at save time (step, RNG,
    config). every: write every N steps (0 = only the last step); keep: checkpoints kept.
    Every rank calls `save` and `load` (collectives); only rank 0 (`is_main`) writes, and at
    construction removes what interrupted writes of earlier runs left (`clean_leftovers`)."""

    def __init__(self, output, model, optimizer, trainer_state: Callable[[], dict], *, every: int = 0,
                 keep: int = 2, is_main: bool = True):
        self.output = Path(output)
        self.model = model
        self.optimizer = optimizer
        self.trainer_state = trainer_state
        self.every = int(every)
        self.keep = int(keep)
        self.is_main = is_main
        if is_main:
            clean_leftovers(self.output)

    def due(self, step: int, last_step: bool = False) -> bool:
        """Whether step `step` is written: the last step, or a multiple of `every`."""
        return last_step or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, last_step: bool = False, force: bool = False) -> Path | None:
        """Write the checkpoint of step `step` when it is due (or `force`); its folder, else None."""
        if not (force or self.due(step, last_step)):
            return None
        return save(self.output, step, self.model, self.optimizer, self.trainer_state(), self.is_main, self.keep)

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies (the ones skipped are logged), or None."""
        return latest(self.output)

    def load(self, path: str | Path | None = None) -> dict | None:
        """Restore model and optimizer from `path` (default: the newest checkpoint that verifies; the
        newer ones that do not are logged and set aside) and return the trainer state saved with it.
        None when there is no checkpoint at all; CheckpointError when there are some and none
        verifies, or when the chosen one does not load."""
        if path is not None:
            return load(path, self.model, self.optimizer)
        found, skipped = self._choose()
        for p, problem in skipped if self.is_main else ():
            logger.warning("checkpoint %s skipped: %s", p, problem)
        if found is None:
            if not skipped:
                return None
            raise CheckpointError(
                f"no checkpoint under {checkpoint_dir(self.output)} verifies, so the run cannot resume: "
                + "; ".join(f"{p.name}: {problem}" for p, problem in skipped)
                + ". Move them away to start afresh, or run without run.resume")
        if skipped and self.is_main:
            logger.warning("resuming from %s, the newest checkpoint that verifies", found)
            for p, _ in skipped:
                    logger.warning("damaged checkpoint %s moved to %s", p, _set_aside(p).name)
        return load(found, self.model, self.optimizer, verified=True)

    def _choose(self) -> tuple[Path | None, list[tuple[Path, str]]]:
        """scan() on rank 0, its answer shared with every rank (one verification, one choice)."""
        answer = None
        if self.is_main:
            found, skipped = scan(self.output)
            answer = (str(found) if found else None, [(str(p), why) for p, why in skipped])
        if distributed.active():
            box = [answer]
            dist.broadcast_object_list(box, src=0)
            answer = box[0]
        found, skipped = answer
        return (Path(found) if found else None), [(Path(p), why) for p, why in skipped]
