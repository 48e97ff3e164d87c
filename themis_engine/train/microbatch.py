"""Training micro-batches: tokenized preference pairs -> packed, prefix-shared streams with the
indices the objective needs.

Each pair is a group (shared prefix + chosen suffix + rejected suffix) of the packing planner. On top
of the stream, a micro-batch carries, per pair, the stream rows of the chosen and rejected last
tokens, the criteria mask and margins, and the LM targets: every stream row whose next token (in the
standalone chosen sequence) is a chosen-response token, with that token as label. A row of the
shared prefix can be such a row (when the common prefix runs into the responses, as in commit-style
pairs); the standalone chosen sequence decides its label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from themis_engine.packing import planner as packing


@dataclass
class TrainMicroBatch:
    packed: packing.PackedBatch
    pair_ids: np.ndarray  # int64 [n], indices into the caller's pair list
    chosen_rows: np.ndarray  # int64 [n]
    rejected_rows: np.ndarray  # int64 [n]
    mask: np.ndarray  # bool [n, H]
    margin: np.ndarray  # float32 [n, H]
    lm_rows: np.ndarray  # int64 [m]
    lm_labels: np.ndarray  # int64 [m]

    @property
    def num_tokens(self) -> int:
        return self.packed.num_tokens

    def to_torch(self, device) -> dict:
        def t(a):
            return torch.from_numpy(a).to(device, non_blocking=True)

        out = self.packed.to_torch(device)
        out.update(
            chosen_rows=t(self.chosen_rows), rejected_rows=t(self.rejected_rows), mask=t(self.mask),
            margin=t(self.margin), lm_rows=t(self.lm_rows), lm_labels=t(self.lm_labels),
        )
        return out


def pair_mask(aspect_index: int, num_heads: int) -> np.ndarray:
    """Which heads a pair trains: its aspect's head; all heads when it has no aspect or H == 1."""
    m = np.zeros(num_heads, dtype=bool)
    if num_heads == 1 or aspect_index < 0:
        m[:] = True
    else:
        m[aspect_index] = True
    return m


def global_counts(pairs: Sequence, pair_ids: Sequence[int], num_heads: int, with_lm: bool) -> tuple[float, float]:
    """(labelled (pair, criterion) cells, LM target tokens) of a global batch: the normalisers that
    make the summed micro-batch losses equal the whole batch's loss."""
    cells = 0
    lm = 0
    for i in pair_ids:
        p = pairs[i]
        cells += int(pair_mask(p.aspect_index, num_heads).sum())
        if with_lm:  # as _lm_targets: positions max(start-1, 0) .. end-2
            lm += max(0, lm_target_end(p) - 1 - max(p.chosen_response_start - 1, 0))
    return float(cells), float(lm)


def lm_target_end(pair) -> int:
    """End (exclusive) of the chosen side's LM targets: chosen_target_end (the answer and the
    end-of-turn token, themis_engine.chat), or the whole sequence where it is -1."""
    end = pair.chosen_target_end
    return len(pair.chosen_ids) if end < 0 else min(end, len(pair.chosen_ids))


def build_micro_batches(
    pairs: Sequence, pair_ids: Sequence[int], budget: int, num_heads: int, with_lm: bool
) -> list[TrainMicroBatch]:
    """Pack the pairs `pair_ids` (indices into `pairs`, each with chosen_ids, rejected_ids,
    chosen_response_start, aspect_index, margin) into micro-batches of at most `budget` tokens."""
    pair_ids = list(pair_ids)
    if not pair_ids:
        return []
    groups = [[pairs[i].chosen_ids, pairs[i].rejected_ids] for i in pair_ids]
    tokens, so, go = packing.flatten_groups(groups)
    out = []
    for b in packing.plan(tokens, so, go, budget):
        local = b.group_ids  # groups in stream order; sequences 2g (chosen) and 2g+1 (rejected)
        row_of = dict(zip(b.seq_ids.tolist(), b.score_index.tolist()))
        chosen_rows = np.array([row_of[2 * g] for g in local.tolist()], dtype=np.int64)
        rejected_rows = np.array([row_of[2 * g + 1] for g in local.tolist()], dtype=np.int64)
        ids = np.array([pair_ids[g] for g in local.tolist()], dtype=np.int64)
        mask = np.stack([pair_mask(pairs[i].aspect_index, num_heads) for i in ids])
        margin = np.array([[float(pairs[i].margin or 0.0)] * num_heads for i in ids], dtype=np.float32)
        lm_rows, lm_labels = (_lm_targets(b, pairs, ids, chosen_rows) if with_lm
                              else (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        out.append(TrainMicroBatch(b, ids, chosen_rows, rejected_rows, mask, margin, lm_rows, lm_labels))
    return out


def _lm_targets(b: packing.PackedBatch, pairs, ids, chosen_rows):
    rows, labels = [], []
    for i, end_row in zip(ids.tolist(), chosen_rows.tolist()):
        p = pairs[i]
        L, start = lm_target_end(p), p.chosen_response_start
        if start >= L:
            continue
        s = int(np.searchsorted(b.cu_seqlens, end_row, side="right")) - 1  # the chosen suffix's segment
        seg_start, ps, pl = int(b.cu_seqlens[s]), int(b.prefix_start[s]), int(b.prefix_len[s])
        t = np.arange(max(start - 1, 0), L - 1)  # standalone positions whose next token is a target
        stream = np.where(t < pl, ps + t, seg_start + (t - pl))
        rows.append(stream)
        labels.append(np.asarray(p.chosen_ids, dtype=np.int64)[t + 1])
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows).astype(np.int64), np.concatenate(labels)
