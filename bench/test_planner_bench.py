"""The packing planner, C++ (themis_engine._planner) vs pure Python, on 100k sequences.

Not part of the normal test run (pytest.ini's testpaths is tests/). Run:

    python -m pytest bench/test_planner_bench.py --benchmark-only

The workload: 50k preference pairs (groups of 2 = 100k sequences) with CodeRewardBench-like lengths,
the distributions of themis_engine.data.workload.crb_like_pairs drawn with numpy (that generator builds
Python lists, too slow and too big at this size): a prompt (chat-template tokens + a criterion
prompt + a user prompt) shared by both responses, and for half of the pairs ("commit-style") a long
common opening of the two responses. Token budget 16384 (the engine's default). The Python planner
runs first; the C++ one then checks it gives the identical micro-batches and prints the ratio of the
medians (the csrc issue asks >= 20x). Nothing here asserts a speed. PLANNER_BENCH_SEQS sets the
number of sequences (default 100000).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from themis_engine.data.workload import TEMPLATE_CLOSE, TEMPLATE_OPEN
from themis_engine.packing import planner as packing

try:
    from themis_engine import _planner
except ImportError:
    _planner = None

NUM_SEQS = int(os.environ.get("PLANNER_BENCH_SEQS", "100000"))
BUDGET = 16384
MAX_LENGTH = 4096
_medians: dict[str, float] = {}
_outputs: dict[str, list] = {}


def _lognormal(rng, median, sigma, lo, hi, n):
    return np.clip(rng.lognormal(np.log(median), sigma, size=n), lo, hi).astype(np.int64)


def crb_like_arrays(num_pairs: int, vocab: int = 150_000, max_length: int = MAX_LENGTH, seed: int = 0):
    """(tokens, seq_offsets, group_offsets) of `num_pairs` CRB-shaped pairs (chosen, rejected)."""
    rng = np.random.default_rng(seed)
    system = _lognormal(rng, 60, 0.3, 30, 120, 5)[rng.integers(0, 5, size=num_pairs)]
    user = _lognormal(rng, 220, 0.8, 16, max_length // 3, num_pairs)
    prefix = 3 * TEMPLATE_OPEN + system + user
    room = max_length - prefix - TEMPLATE_CLOSE
    commit = rng.random(num_pairs) < 0.5
    body = np.minimum(_lognormal(rng, 900, 0.6, 32, max_length, num_pairs), room)
    common = np.where(commit, (body * rng.uniform(0.5, 0.95, size=num_pairs)).astype(np.int64), 0)
    tail_room = np.maximum(1, room - common)
    tails = [np.minimum(_lognormal(rng, 80, 0.8, 1, max_length, num_pairs), tail_room) for _ in range(2)]
    plain = [np.minimum(_lognormal(rng, 500, 0.8, 8, max_length, num_pairs), room) for _ in range(2)]
    resp = [np.where(commit, common + t, p) + TEMPLATE_CLOSE for t, p in zip(tails, plain)]
    lengths = np.stack([prefix + resp[0], prefix + resp[1]], axis=1).reshape(-1)
    seq_offsets = np.zeros(2 * num_pairs + 1, dtype=np.int64)
    np.cumsum(lengths, out=seq_offsets[1:])
    group_offsets = np.arange(0, 2 * num_pairs + 1, 2, dtype=np.int64)
    tokens = rng.integers(10, vocab, size=int(seq_offsets[-1]), dtype=np.int64)
    shared = prefix + common
    for i in range(num_pairs):  # the rejected sequence repeats the chosen one's prompt (+ common opening)
        a, b, n = seq_offsets[2 * i], seq_offsets[2 * i + 1], shared[i]
        tokens[b : b + n] = tokens[a : a + n]
    return tokens, seq_offsets, group_offsets


@pytest.fixture(scope="module")
def workload():
    return crb_like_arrays(NUM_SEQS // 2)


PLANNERS = {"python": packing.plan_python, "cpp": packing.plan if _planner is not None else None}


@pytest.mark.parametrize("name", ["python", "cpp"])
def test_planner_100k(benchmark, workload, name, capsys, monkeypatch):
    if PLANNERS[name] is None:
        pytest.skip("C++ planner themis_engine._planner not built")
    monkeypatch.delenv("THEMIS_PLANNER", raising=False)  # packing.plan takes the C++ path
    tokens, so, go = workload
    fn, last = PLANNERS[name], []

    def run():  # keeps only the latest result alive: each round plans with the previous one freed
        last.append(fn(tokens, so, go, BUDGET))

    benchmark.group = f"planner, {len(so) - 1} sequences, budget {BUDGET}"
    benchmark.pedantic(run, setup=last.clear, rounds=5 if name == "python" else 15, iterations=1, warmup_rounds=1)
    (result,) = last
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
        return
    _medians[name] = benchmark.stats.stats.median
    benchmark.extra_info["unique_tokens"] = sum(b.num_tokens for b in result)
    benchmark.extra_info["micro_batches"] = len(result)
    if name == "python":
        _outputs["python"] = result
        return
    want = _outputs.pop("python", None)
    if want is not None:  # the timed C++ output is the Python planner's, field by field
        assert len(result) == len(want)
        for got, ref in zip(result, want):
            for f in ("input_ids", "position_ids", "cu_seqlens", "prefix_start", "prefix_len", "max_seqlen",
                      "score_index", "seq_ids", "group_ids"):
                x, y = getattr(got, f), getattr(ref, f)
                assert np.array_equal(x, y) and np.asarray(x).dtype == np.asarray(y).dtype, f
    if "python" in _medians:
        ratio = _medians["python"] / _medians["cpp"]
        benchmark.extra_info["speedup_vs_python"] = ratio
        with capsys.disabled():
            print(f"\nplanner on {len(so) - 1} sequences ({len(tokens)} tokens, budget {BUDGET}, "
                  f"{len(result)} micro-batches): python median {_medians['python']:.3f} s, "
                  f"C++ median {_medians['cpp']:.4f} s, C++ is {ratio:.1f}x faster")
