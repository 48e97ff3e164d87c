"""The packed batch contract (ARCHITECTURE.md section 3) as data: one micro-batch's arrays on the
host (`PackedBatch`, numpy, built by the planner) and the segment metadata the model's attention
reads on the device (`SegmentMeta`, torch), with the host -> device transfer between them.

A stream of T tokens holds S segments: a group's shared prefix, one of its suffixes, or a whole
unshared sequence. Per segment:

    stream:        [ P0 | S0_1 | S0_2 ] [ P1 | S1_1 ] [ Q ]
    prefix_start:    0    a0     a0       0    a1      0     (a_g: the stream row where P_g starts)
    prefix_len:      0   |P0|   |P0|      0   |P1|     0     (0: a prefix or an unshared sequence)

A token of a suffix attends to its group's prefix and causally within its suffix; positions restart
at |P| in every suffix, so each suffix scores as P + S alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SegmentMeta:
    """Segment metadata of a packed stream (all on the model's device).

    cu_seqlens: int32 [S+1], segment start offsets; prefix_start, prefix_len: int32 [S], the prefix
    range each segment also sees (prefix_len 0: none); max_seqlen: the longest segment.
    """

    cu_seqlens: torch.Tensor
    prefix_start: torch.Tensor
    prefix_len: torch.Tensor
    max_seqlen: int


@dataclass
class PackedBatch:
    """One micro-batch: a flat stream of T tokens in S segments, scoring N sequences.

    input_ids, position_ids: int64 [T]; cu_seqlens: int32 [S+1]; prefix_start, prefix_len: int32 [S]
    (a suffix's prefix rows in this stream; 0 length for prefixes and unshared sequences);
    max_seqlen: the longest segment; score_index: int64 [N], the stream row of each scored
    sequence's last token; seq_ids: int64 [N], which input sequence each score row is;
    group_ids: int64 [G], the groups in this micro-batch, in stream order.
    """

    input_ids: np.ndarray
    position_ids: np.ndarray
    cu_seqlens: np.ndarray
    prefix_start: np.ndarray
    prefix_len: np.ndarray
    max_seqlen: int
    score_index: np.ndarray
    seq_ids: np.ndarray
    group_ids: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def to_torch(self, device=None, with_seq_ids: bool = False) -> dict:
        """The model's inputs as torch tensors on `device`: input_ids, position_ids, meta, score_index
        (and seq_ids when asked). To a CUDA device the arrays go as two pinned host buffers (one
        int64, one int32) and two asynchronous copies, so the host does not wait for the device."""
        wide = [self.input_ids, self.position_ids, self.score_index] + ([self.seq_ids] if with_seq_ids else [])
        narrow = [self.cu_seqlens, self.prefix_start, self.prefix_len]
        if device is not None and torch.device(device).type == "cuda":
            wide, narrow = _to_device_in_one_copy(wide, torch.int64, device), _to_device_in_one_copy(
                narrow, torch.int32, device)
        else:
            wide = [torch.from_numpy(a).to(device) for a in wide]
            narrow = [torch.from_numpy(a).to(device) for a in narrow]
        out = dict(input_ids=wide[0], position_ids=wide[1], meta=SegmentMeta(*narrow, self.max_seqlen),
                   score_index=wide[2])
        if with_seq_ids:
            out["seq_ids"] = wide[3]
        return out


def _to_device_in_one_copy(arrays, dtype, device) -> list:
    """numpy arrays -> views of one device tensor, filled by one non-blocking copy from pinned memory
    to a CUDA device (the caching host allocator keeps the pinned buffer until the copy has run)."""
    sizes = [int(a.shape[0]) for a in arrays]
    host = torch.empty(sum(sizes), dtype=dtype, pin_memory=torch.device(device).type == "cuda")
    np.concatenate([np.asarray(a) for a in arrays], out=host.numpy(), casting="same_kind")
    return list(torch.split(host.to(device, non_blocking=True), sizes))
