"""Watching a run: one JSON line of metrics per step (and TensorBoard when installed), a progress
bar on rank 0. Only rank 0 writes.

`metrics.jsonl` is only ever appended to. A resumed run reads it first: a torn last line (a write
cut by a kill) and the lines after the step it resumes from are dropped with a warning, by cutting
the file's tail off (one truncate call) or, where they are not all at the end, by writing the kept
lines to a temporary file renamed over it, so a kill at any point leaves the whole history. The
final line (`"final": true`) is written once: a resume of a finished run does not repeat it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
from pathlib import Path

logger = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, output: str | Path, is_main: bool, total_steps: int, progress: bool = True,
                 resume_step: int = 0):
        self.is_main = is_main
        self.path = Path(output) / "metrics.jsonl"
        self._tb = None
        self._bar = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.final_written = _prepare(self.path, resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the events a resumed run writes again
            self._tb = SummaryWriter(str(Path(output) / "tensorboard"),
                                     purge_step=resume_step + 1 if resume_step else None)
        except Exception:  # tensorboard not installed
            self._tb = None
        if progress:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total_steps, initial=resume_step, desc="train", dynamic_ncols=True)
            except ImportError:
                self._bar = None

    def log(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._bar is not None:
            self._bar.update(1)
            shown = {k: record[k] for k in ("loss", "accuracy", "lr", "pairs_per_s") if k in record}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})

    def log_final(self, step: int, metrics: dict) -> None:
        """The run's final line (`"final": true` and the final evaluation), written once per run."""
        if self.is_main and not self.final_written:
            self.log(step, {"final": True, **metrics})
            self.final_written = True

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()


def _prepare(path: Path, resume_step: int) -> bool:
    """Make `path` hold the lines of steps <= resume_step only (none for a fresh run), every one whole;
    True when it holds the final line of step resume_step (a finished run resumed)."""
    for p in path.parent.glob(f".{path.name}.*.tmp"):  # left by a kill during a rewrite below
        p.unlink(missing_ok=True)
    if not path.exists():
        if resume_step:
            logger.warning("%s is missing: the metrics of steps 1..%d are lost", path, resume_step)
        return False
    data = path.read_bytes()
    kept, kept_bytes, prefix, past, torn, bad, final = [], 0, True, 0, 0, 0, False
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        whole = end >= 0
        end = end + 1 if whole else len(data)
        line = data[start:end]
        start = end
        try:
            rec = json.loads(line) if line.strip() else None
        except ValueError:
            rec = False
        if rec is None and whole:  # an empty line
            prefix = False
            continue
        if not whole or (rec is False and start >= len(data)):
            torn += 1
        elif not isinstance(rec, dict):
            bad += 1
        elif not isinstance(rec.get("step", 0), (int, float)) or rec.get("step", 0) > resume_step:
            past += 1
        else:
            kept.append(line)
            if prefix:
                kept_bytes += len(line)
            final = bool(rec.get("final")) and rec.get("step") == resume_step > 0
            continue
        prefix = False
    if torn:
        logger.warning("%s: dropping its torn last line (a write cut short)", path)
    if bad:
        logger.warning("%s: dropping %d lines that are not JSON objects", path, bad)
    if past:
        logger.warning("%s: dropping %d lines after step %d (%s)", path, past, resume_step,
                       "written after the checkpoint the run resumes from" if resume_step else "an earlier run")
    if resume_step and not kept:
        logger.warning("%s holds no metrics of steps 1..%d: they are lost", path, resume_step)
    if kept_bytes == sum(map(len, kept)):  # the kept lines are the file's head: cut the tail off
        if kept_bytes < len(data):
            os.truncate(path, kept_bytes)
    else:  # kept lines with others between them: a new file renamed over the old one
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        with open(tmp, "wb") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return final


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else v
    return v
