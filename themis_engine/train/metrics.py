"""Watching a run: one JSON line of metrics per step (and TensorBoard when installed), a progress
bar on rank 0. Only rank 0 writes."""

from __future__ import annotations

import json
import math
from pathlib import Path


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
        if self.path.exists():  # a resumed run drops the lines after its checkpoint
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(output) / "tensorboard"))
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


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else v
    return v
