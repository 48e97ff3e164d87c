"""Packing: tokenized groups -> token-budget micro-batches of one flat prefix-shared stream each.

    planner.py   shared prefixes, first-fit-decreasing placement (Python, or the C++ twin in csrc/)
    batch.py     PackedBatch (host arrays), SegmentMeta (the device metadata), host -> device transfer
"""

from themis_engine.errors import PackingError
from themis_engine.packing.batch import PackedBatch, SegmentMeta
from themis_engine.packing.planner import (
    build_batch,
    first_fit_decreasing,
    flatten_groups,
    group_prefix_lengths,
    group_token_counts,
    plan,
    plan_python,
    shared_prefix_len,
)

__all__ = [
    "PackedBatch", "PackingError", "SegmentMeta", "build_batch", "first_fit_decreasing", "flatten_groups",
    "group_prefix_lengths", "group_token_counts", "plan", "plan_python", "shared_prefix_len",
]
