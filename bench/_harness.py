"""The one benchmark harness of bench/*.py: command line, timing, environment header, tables, JSON.

    import _harness as harness                       # bench/ is on sys.path (see below)

    cfg = harness.parse(MyBenchConfig, argv, prog="python bench/mine.py", description=__doc__)
    env = harness.environment(device, "mine.py", argv)
    t = harness.benchmark(lambda: step(), device, warmup=1, repeats=5)     # Timing: median_s, times_s
    print(harness.header("my benchmark", env, "model: qwen3-8b"))
    print(harness.markdown_table(["side", "median s"], [["engine", f"{t.median_s:.3f}"]]))
    harness.write_json(cfg.json, {"env": env, "seconds": t.median_s})

Timing (`benchmark`): `warmup` untimed calls, then repetitions, each timed on its own; the median
is the number reported. On CUDA every repetition runs between two CUDA events on the current
stream, after a 256 MiB memset (outside the events) that evicts the inputs from L2; the events are
read after one synchronize at the end, so the GPU queue stays full between repetitions. Elsewhere
(the --cpu smoke modes) `time.perf_counter` around each call, between two `sync` calls (no-ops on a
CPU, where nothing runs asynchronously).
With `target_ms` (kernel timings) the number of repetitions adapts on CUDA: two calls estimate
the time of one, about a quarter of the target is spent warming up, then target / estimate
repetitions, clamped to [repeats, max_repeats].

Peak memory (`reset_peak_memory`, `peak_memory_gib`): the flush buffer exists before the peak is
reset and is subtracted from the peak read, so a script's peak memory is its own.

A script imports this file as a top-level module: it puts its own folder (bench/) on sys.path,
which the harness extends with the repository root (for a tree that is not pip-installed).
"""

import dataclasses
import datetime
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a tree that was not pip-installed
    sys.path.insert(0, str(ROOT))

L2_FLUSH_BYTES = 256 << 20  # larger than the L2 of any card we time on (H100/H200: 50 MB)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def parse(cls, argv: Sequence[str] | None = None, *, prog: str, description: str = ""):
    """A `cls` config (a dataclass of themis_engine.config.option fields) from the command line,
    through the one config system (--key=value or --key value, --flag alone for true, --config
    FILE.yaml, --help); then `cfg.check()` when the class has one. A bad option prints
    `prog: error: ...` and exits with status 2, as argparse did."""
    from themis_engine.config import parse_args
    from themis_engine.errors import ConfigError

    try:
        cfg = parse_args(cls, argv, prog=prog, description=description)
        if hasattr(cfg, "check"):
            cfg.check()
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Timing:
    """The repetitions of one measurement: each one's seconds and their median."""

    median_s: float
    times_s: list[float]

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3

    @property
    def reps(self) -> int:
        return len(self.times_s)


_flush_buffers: dict[torch.device, torch.Tensor] = {}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cuda_key(device: torch.device) -> torch.device:
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


def _flush_buffer(device: torch.device) -> torch.Tensor | None:
    """The device's L2-flush buffer (made on first use, kept), or None off CUDA."""
    if device.type != "cuda":
        return None
    key = _cuda_key(device)
    if key not in _flush_buffers:
        _flush_buffers[key] = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=key)
    return _flush_buffers[key]


def flush_l2(device: torch.device) -> None:
    """Overwrite the L2 cache (a 256 MiB memset) so that no input of the next call sits in it."""
    buf = _flush_buffer(device)
    if buf is not None:
        buf.zero_()


def benchmark(fn: Callable[[], Any], device: torch.device, *, repeats: int = 3, warmup: int = 1,
              target_ms: float | None = None, max_repeats: int | None = None, flush: bool = True) -> Timing:
    """Time fn() on `device`: `warmup` untimed calls, then `repeats` timed ones (see the module
    docstring); with `target_ms` on CUDA, as many repetitions as fill about target_ms, at least
    `repeats` and at most `max_repeats`. `flush`: an L2 flush before every repetition (CUDA)."""
    if device.type != "cuda":
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        return Timing(statistics.median(times), times)

    for _ in range(warmup):
        fn()
    sync(device)
    reps = repeats
    if target_ms is not None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(2):
            fn()
        end.record()
        sync(device)
        est_ms = max(start.elapsed_time(end) / 2, 1e-3)
        for _ in range(min(int(0.25 * target_ms / est_ms), 20)):
            fn()
        reps = max(repeats, min(max_repeats or repeats, int(target_ms / est_ms)))
    if flush:
        _flush_buffer(device)  # made before the first event, not inside a timed interval
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        if flush:
            flush_l2(device)
        start.record()
        fn()
        end.record()
    sync(device)
    times = [start.elapsed_time(end) * 1e-3 for start, end in events]
    return Timing(statistics.median(times), times)


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
def reset_peak_memory(device: torch.device) -> None:
    """Start a peak-memory window (CUDA; nothing elsewhere). The flush buffer is made first, so a
    later peak_memory_gib() can leave it out exactly."""
    if device.type == "cuda":
        _flush_buffer(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """GiB allocated at the peak since reset_peak_memory, without the harness's flush buffer;
    NaN off CUDA."""
    if device.type != "cuda":
        return float("nan")
    flush = L2_FLUSH_BYTES if _cuda_key(device) in _flush_buffers else 0
    return (torch.cuda.max_memory_allocated(device) - flush) / 2**30


def peak_extra_gib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak memory of one fn() above what was allocated before it (CUDA; None elsewhere)."""
    if device.type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**30


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The card's dense bf16 peak for MFU: `override`, else by card name (model.flops); None on a CPU."""
    if override:
        return override
    from themis_engine.model.flops import peak_tflops as by_name

    return by_name(device)


# --------------------------------------------------------------------------------------------
# Environment header
# --------------------------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a missing or broken optional package is reported as None
        return None


def environment(device: torch.device, script: str, argv: Sequence[str] | None = None) -> dict:
    """Where and how a run was measured: UTC date, commit (with `+dirty` for local changes), card,
    torch / triton / transformers / python versions, the command line and the timing method.
    `argv`: the script's arguments (default: sys.argv[1:])."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commit = _git("rev-parse", "--short", "HEAD")
    if commit and _git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "card": "cpu",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "python": sys.version.split()[0],
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "command": shlex.join(["python", f"bench/{script}", *argv]),
        "timing": ("CUDA events, L2 flushed before each repetition, median" if device.type == "cuda"
                   else "perf_counter, median (CPU smoke mode: not a measurement)"),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(card=p.name, sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    return env


def header(title: str, env: dict, *details: str) -> str:
    """Two lines above a table: `title | card | versions | commit | date | details...`, then the
    command line and the timing method."""
    parts = [title, f"card: {env.get('card')}", f"torch {env.get('torch')}", f"triton {env.get('triton')}",
             f"transformers {env.get('transformers')}", f"commit {env.get('commit')}", str(env.get("date"))]
    return " | ".join(parts + [d for d in details if d]) + (
        f"\ncommand: {env.get('command')} | timing: {env.get('timing')}")


# --------------------------------------------------------------------------------------------
# Tables and JSON
# --------------------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table; cells are printed as given (str), None as empty."""

    def cell(v):
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(map(cell, headers)) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None  # strict JSON has no NaN / Infinity
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return str(x)  # torch.dtype, Path, ...


def write_json(path: str | os.PathLike | None, data: Any) -> None:
    """Write `data` to `path` (nothing when path is None or empty): parents made, NaN as null,
    other objects as their str; written to a temporary file first, so a reader (or a run cut off
    mid-write) never sees half a file."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2))
    tmp.replace(path)
