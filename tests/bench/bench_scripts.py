"""Loading the bench scripts (bench/ is not a package) by path, once each, for the tests of this folder."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ("throughput", "kernel_ops", "large_models", "attention_sweep")


def load(name: str):
    """The module of bench/<name>.py, registered as bench_<name> (dataclasses look their module up)."""
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "bench" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[key]
            raise
    return sys.modules[key]


def harness():
    """bench/_harness.py (each script puts bench/ on sys.path and imports it as `_harness`)."""
    load("throughput")
    import _harness

    return _harness
