"""The packing planner: tokenized groups -> token-budget micro-batches of ONE flat stream each.

Input and output are plain arrays (numpy), so that a C++ planner can give identical output:

* tokens: int64 [total], every full sequence (prompt + response, standalone) concatenated;
* seq_offsets: int64 [num_seqs + 1], sequence i is tokens[seq_offsets[i]:seq_offsets[i+1]];
* group_offsets: int64 [num_groups + 1], group g is sequences group_offsets[g] .. group_offsets[g+1]-1.

A group's shared prefix is the longest common token prefix of its K sequences, capped so that every
suffix keeps at least one token; a group of one sequence has no prefix (the sequence is one
segment). Groups are placed by first-fit decreasing on their unique token count: sorted by size,
largest first (ties by group index), each into the first micro-batch with room, a new one if none.

`plan` runs the C++ planner (csrc/planner.cpp, `themis_engine._planner`) where it was built, else
`plan_python`; both give identical output. THEMIS_PLANNER=python forces the Python one.
"""

from __future__ import annotations

import logging
import operator
from typing import Sequence

import numpy as np

from themis_engine.config import environ
from themis_engine.errors import PackingError
from themis_engine.packing.batch import PackedBatch

try:
    from themis_engine import _planner
except ImportError:  # not built (no compiler, THEMIS_NO_EXT=1): the pure-Python planner below
    _planner = None

_announced: set[str] = set()



def shared_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Longest common token prefix of K >= 2 sequences, capped so each keeps >= 1 suffix token.
    0 for a single sequence (nothing to share)."""
    if len(seqs) < 2:
        return 0
    arrays = [np.asarray(s) for s in seqs]
    limit = min(len(a) for a in arrays) - 1
    if limit <= 0:
        return 0
    first = arrays[0][:limit]
    n = limit
    for a in arrays[1:]:
        diff = np.nonzero(a[:n] != first[:n])[0]
        if diff.size:
            n = int(diff[0])
            if n == 0:
                return 0
    return n


def group_prefix_lengths(tokens: np.ndarray, seq_offsets: np.ndarray, group_offsets: np.ndarray) -> np.ndarray:
    """The shared prefix length of every group, int64 [num_groups]."""
    out = np.zeros(len(group_offsets) - 1, dtype=np.int64)
    for g in range(len(out)):
        a, b = int(group_offsets[g]), int(group_offsets[g + 1])
        seqs = [tokens[seq_offsets[i] : seq_offsets[i + 1]] for i in range(a, b)]
        out[g] = shared_prefix_len(seqs)
    return out


def group_token_counts(seq_offsets: np.ndarray, group_offsets: np.ndarray, prefix_lens: np.ndarray) -> np.ndarray:
    """Unique tokens of each group in the stream: P + sum_k (len_k - P), int64 [num_groups]."""
    if len(group_offsets) < 2:
        return np.zeros(0, dtype=np.int64)
    per_group = np.add.reduceat(np.diff(seq_offsets), group_offsets[:-1])
    return per_group - (np.diff(group_offsets) - 1) * prefix_lens


def first_fit_decreasing(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Bin the items (indices into sizes) under `budget`: first-fit decreasing, deterministic."""
    sizes = np.asarray(sizes, dtype=np.int64)
    order = np.argsort(-sizes, kind="stable")
    bins: list[list[int]] = []
    room: list[int] = []
    for g in order.tolist():
        size = int(sizes[g])
        if size > budget:
            raise PackingError(
                f"group {g} needs {size} tokens, over the token budget of {budget} per micro-batch; "
                "raise max_tokens_per_batch (or lower max_length)"
            )
        for b, r in enumerate(room):
            if size <= r:
                bins[b].append(g)
                room[b] = r - size
                break
        else:
            bins.append([g])
            room.append(budget - size)
    return bins


def build_batch(
    tokens: np.ndarray,
    seq_offsets: np.ndarray,
    group_offsets: np.ndarray,
    prefix_lens: np.ndarray,
    group_ids: Sequence[int],
) -> PackedBatch:
    """Lay the given groups out, in order, as one stream with its metadata."""
    ids, pos, bounds, pstart, plen, score, seq_ids = [], [], [0], [], [], [], []
    cursor = 0

    def add_segment(chunk: np.ndarray, first_pos: int, p_start: int, p_len: int) -> None:
        nonlocal cursor
        ids.append(chunk)
        pos.append(np.arange(first_pos, first_pos + len(chunk), dtype=np.int64))
        cursor += len(chunk)
        bounds.append(cursor)
        pstart.append(p_start)
        plen.append(p_len)

    for g in group_ids:
        a, b = int(group_offsets[g]), int(group_offsets[g + 1])
        P = int(prefix_lens[g])
        first = tokens[seq_offsets[a] : seq_offsets[a + 1]]
        prefix_at = cursor
        if P > 0:
            add_segment(first[:P], 0, 0, 0)
        for i in range(a, b):
            seq = tokens[seq_offsets[i] : seq_offsets[i + 1]]
            if len(seq) == 0:
                raise PackingError(f"sequence {i} (group {g}) is empty")
            add_segment(seq[P:], P, prefix_at if P > 0 else 0, P)
            score.append(cursor - 1)
            seq_ids.append(i)
    seg_lens = np.diff(np.asarray(bounds))
    return PackedBatch(
        input_ids=np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64),
        position_ids=np.concatenate(pos) if pos else np.zeros(0, np.int64),
        cu_seqlens=np.asarray(bounds, dtype=np.int32),
        prefix_start=np.asarray(pstart, dtype=np.int32),
        prefix_len=np.asarray(plen, dtype=np.int32),
        max_seqlen=int(seg_lens.max()) if len(seg_lens) else 0,
        score_index=np.asarray(score, dtype=np.int64),
        seq_ids=np.asarray(seq_ids, dtype=np.int64),
        group_ids=np.asarray(list(group_ids), dtype=np.int64),
    )


def plan(
    tokens: np.ndarray, seq_offsets: np.ndarray, group_offsets: np.ndarray, budget: int
) -> list[PackedBatch]:
    """Shared prefixes, first-fit-decreasing placement and the micro-batches, in bin order.
    The C++ planner where it is built (THEMIS_PLANNER=python forces plan_python); same output."""
    use_cpp = _planner is not None and environ("THEMIS_PLANNER") != "python"
    name = "C++ (themis_engine._planner)" if use_cpp else "pure Python"
    if name not in _announced:
        _announced.add(name)
        logging.getLogger("themis_engine").info("packing planner: %s", name)
    if use_cpp:
        arrays = [np.ascontiguousarray(a, dtype=np.int64) for a in (tokens, seq_offsets, group_offsets)]
        try:
            b = operator.index(budget)
        except TypeError:
            b = None
        # the C++ planner takes 1-D arrays and an int64 budget; anything else goes the Python way
        if b is not None and -(2**63) <= b < 2**63 and all(a.ndim == 1 for a in arrays):
            try:
                out = _planner.plan(*arrays, b)
            except ValueError as err:
                raise PackingError(str(err)) from None
            return [PackedBatch(*fields) for fields in out]
    return plan_python(tokens, seq_offsets, group_offsets, budget)


def plan_python(
    tokens: np.ndarray, seq_offsets: np.ndarray, group_offsets: np.ndarray, budget: int
) -> list[PackedBatch]:
    """plan in pure Python (the fallback, and the reference of the C++ planner)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    seq_offsets = np.asarray(seq_offsets, dtype=np.int64)
    group_offsets = np.asarray(group_offsets, dtype=np.int64)
    _check_layout(tokens, seq_offsets, group_offsets)
    prefix_lens = group_prefix_lengths(tokens, seq_offsets, group_offsets)
    sizes = group_token_counts(seq_offsets, group_offsets, prefix_lens)
    bins = first_fit_decreasing(sizes, budget)
    return [build_batch(tokens, seq_offsets, group_offsets, prefix_lens, b) for b in bins]


def flatten_groups(groups: Sequence[Sequence[Sequence[int]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """list of groups (each a list of token-id sequences) -> (tokens, seq_offsets, group_offsets)."""
    seqs = [s for g in groups for s in g]
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    seq_offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=seq_offsets[1:])
    group_offsets = np.zeros(len(groups) + 1, dtype=np.int64)
    np.cumsum([len(g) for g in groups], out=group_offsets[1:])
    if not seqs:
        return np.zeros(0, dtype=np.int64), seq_offsets, group_offsets
    tokens = np.concatenate([np.asarray(s, dtype=np.int64).reshape(-1) for s in seqs])  # lists or arrays
    return tokens, seq_offsets, group_offsets


def _check_layout(tokens, seq_offsets, group_offsets) -> None:
    if len(seq_offsets) < 1 or seq_offsets[0] != 0 or seq_offsets[-1] != len(tokens):
        raise PackingError("seq_offsets must start at 0 and end at len(tokens)")
    if len(group_offsets) < 1 or group_offsets[0] != 0 or group_offsets[-1] != len(seq_offsets) - 1:
        raise PackingError("group_offsets must start at 0 and end at the number of sequences")
    lengths = np.diff(seq_offsets)
    if (lengths <= 0).any():
        i = int(np.nonzero(lengths <= 0)[0][0])
        raise PackingError(f"sequence {i} is empty: every sequence needs at least one token")
    if (np.diff(group_offsets) <= 0).any():
        g = int(np.nonzero(np.diff(group_offsets) <= 0)[0][0])
        raise PackingError(f"group {g} has no sequences")
