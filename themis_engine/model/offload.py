"""Layer streaming: score with a model larger than the GPU's memory.

    srm = stream_layers(rm, "cuda")          # rm: a RewardModel (on the CPU, or already on the GPU)
    scores = srm(input_ids, position_ids, meta, score_index)      # RewardModel's forward signature

The decoder blocks' weights live in pinned host memory; the embeddings, the final norm and the
reward head move to the device. The device holds two buffers, each the size of one block's
tensors. While block i computes from one buffer, block i+1 is copied into the other on a side
stream (double buffering); CUDA events order the two streams:

    copy stream:    [copy 0 -> A] [copy 1 -> B]  wait(free A) [copy 2 -> A]  wait(free B) [copy 3 -> B] ...
    compute stream: wait(ready A) [block 0 on A] (free A) wait(ready B) [block 1 on B] (free B) ...

So at most two blocks' weights are on the device at any time. The last block's step prefetches
block 0 into the free buffer, so the next forward starts without waiting for its first copy.

Memory layout: each block's tensors are packed into one host allocation (an "arena", tensors at
256-byte aligned offsets) and each device buffer is one allocation with the same layout, so a block
moves in ONE host-to-device copy, and pinned memory is allocated once per block (torch's pinned
allocator rounds every allocation up to a power of two: per block that wastes about 10% for a
Qwen3-32B block, per tensor it could waste up to 2x). A block runs as
`torch.func.functional_call(block, buffer.tensors, ...)`: the same module code as the resident
model, on the buffer's tensors, so the scores are identical to the resident model's.

Without CUDA (or for a CPU "device") the same code runs with synchronous copies and no events:
that is how the tests check it. Inference only; the host weights must not change while wrapped
(a prefetched copy of block 0 would be stale).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
from torch.func import functional_call

from themis_engine import kernels
from themis_engine.model.decoder import RewardModel
from themis_engine.packing.batch import SegmentMeta

logger = logging.getLogger("themis_engine")

OFFLOAD_MODES = ("layers",)


_ALIGN = 256  # byte alignment of each tensor inside an arena


class BlockLayout:
    """Where each tensor of a block sits in its arena: name -> (byte offset, shape, dtype)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.entries: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        offset = 0
        for name, t in tensors.items():
            self.entries[name] = (offset, tuple(t.shape), t.dtype)
            offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        self.nbytes = offset

    def matches(self, tensors: dict[str, torch.Tensor]) -> bool:
        return list(self.entries) == list(tensors) and all(
            (tuple(t.shape), t.dtype) == self.entries[n][1:] for n, t in tensors.items())

    def views(self, arena: torch.Tensor) -> dict[str, torch.Tensor]:
        """The block's tensors as views into `arena` (uint8 [nbytes])."""
        out = {}
        for name, (offset, shape, dtype) in self.entries.items():
            n = dtype.itemsize * _numel(shape)
            out[name] = arena[offset : offset + n].view(dtype).view(shape)
        return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class BlockBuffer:
    """One device buffer for one block's tensors: an arena and its views by module-local name.

    layer: the block whose weights it holds (or is being copied in), None when empty;
    ready: recorded on the copy stream after the copy; free: recorded on the compute stream after
    the block that used it (both None without CUDA)."""

    def __init__(self, layout: BlockLayout, device: torch.device, index: int):
        self.index = index
        self.arena = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
        self.tensors = layout.views(self.arena)
        self.layer: int | None = None
        cuda = device.type == "cuda"
        self.ready = torch.cuda.Event() if cuda else None
        self.free = torch.cuda.Event() if cuda else None

    @property
    def nbytes(self) -> int:
        return self.arena.numel()


def _block_tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    """A block's parameters and buffers by module-local name (what functional_call substitutes)."""
    out = {name: p for name, p in block.named_parameters()}
    out.update({name: b for name, b in block.named_buffers()})
    return out


def _move_block_to_arena(block: nn.Module, layout: BlockLayout, pin: bool) -> torch.Tensor:
    """Copy the block's tensors into one host arena (pinned if asked) and point the block's
    parameters and buffers at their views there (the old storage is freed). Returns the arena."""
    arena = torch.empty(layout.nbytes, dtype=torch.uint8, device="cpu", pin_memory=pin)
    views = layout.views(arena)
    for module_name, module in block.named_modules():
        prefix = module_name + "." if module_name else ""
        for name, p in list(module._parameters.items()):
            if p is not None:
                views[prefix + name].copy_(p.data)
                p.data = views[prefix + name]
        for name, b in list(module._buffers.items()):
            if b is not None:
                views[prefix + name].copy_(b)
                module._buffers[name] = views[prefix + name]
    return arena


class StreamedRewardModel(nn.Module):
    """A RewardModel whose blocks are streamed from host memory (see the module docstring).

    forward(input_ids, position_ids, meta, score_index) -> rewards [N, H], as RewardModel.forward.
    `block_buffers`: the two BlockBuffers; `trace`: set it to a list to record ("copy", layer, buffer)
    and ("compute", layer, buffer) steps in issue order (the tests read it).
    """

    def __init__(self, rm: RewardModel, device: torch.device | str | None = None):
        super().__init__()
        if rm.lm_head is not None:
            raise ValueError("stream_layers: scoring models only (load without the LM head: keep_lm_head=False)")
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.rm = rm.eval()
        self.stream_device = device
        self.use_cuda = device.type == "cuda"
        layers = list(rm.model.layers)
        if not layers:
            raise ValueError("stream_layers: the model has no blocks")

        # blocks -> one host arena each (pinned where CUDA copies from it asynchronously), one
        # block at a time so that the peak is one block over the model
        pin = self.use_cuda
        self.layout = BlockLayout(_block_tensors(layers[0]))
        for i, block in enumerate(layers):
            if not self.layout.matches(_block_tensors(block)):
                raise ValueError(f"stream_layers: block {i} differs in its tensors from block 0; cannot share buffers")
        self.host_arenas = [_move_block_to_arena(block, self.layout, pin) for block in layers]
        self.host_blocks = [_block_tensors(b) for b in layers]  # views into the arenas
        # everything else -> the device
        for name, module in rm.named_children():
            if name != "model":
                module.to(device)
        rm.model.embed_tokens.to(device)
        rm.model.norm.to(device)
        rm.inv_freq = rm.inv_freq.to(device)
        self.block_buffers = [BlockBuffer(self.layout, device, k) for k in range(2)]
        self.copy_stream = torch.cuda.Stream(device=device) if self.use_cuda else None
        self.trace: list[tuple[str, int, int]] | None = None
        logger.info(
            "layer streaming: %d blocks of %.1f MiB in %s host memory, 2 device buffers on %s",
            len(layers), self.block_buffers[0].nbytes / 2**20, "pinned" if pin else "plain", device,
        )

    # RewardModel's public surface, so the Scorer and users see no difference
    @property
    def args(self):
        return self.rm.args

    @property
    def criteria(self) -> list[str]:
        return self.rm.criteria

    @property
    def device(self) -> torch.device:
        return self.stream_device

    @property
    def dtype(self) -> torch.dtype:
        return self.rm.dtype

    @property
    def num_layers(self) -> int:
        return len(self.host_blocks)

    def resident_layers(self) -> list[int]:
        """Blocks whose weights are in a device buffer now (copied or being copied)."""
        return [b.layer for b in self.block_buffers if b.layer is not None]

    # ---------------------------------------------------------------- the two streams
    def _load(self, layer: int, avoid: BlockBuffer | None) -> BlockBuffer:
        """The buffer holding `layer`, issuing its copy into a buffer other than `avoid` if needed."""
        for buf in self.block_buffers:
            if buf.layer == layer:
                return buf
        buf = next(b for b in self.block_buffers if b is not avoid)
        src = self.host_arenas[layer]
        if self.use_cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(buf.free)  # the block that last read this buffer is done
                buf.arena.copy_(src, non_blocking=True)
                buf.ready.record(self.copy_stream)
        else:
            buf.arena.copy_(src)
        buf.layer = layer
        if self.trace is not None:
            self.trace.append(("copy", layer, buf.index))
        return buf

    def _run_block(self, layer: int, buf: BlockBuffer, h, position_ids, meta, inv_freq, rope_scaling):
        if self.use_cuda:
            torch.cuda.current_stream(self.stream_device).wait_event(buf.ready)
        if self.trace is not None:
            self.trace.append(("compute", layer, buf.index))
        out = functional_call(
            self.rm.model.layers[layer], buf.tensors, (h, position_ids, meta, inv_freq, rope_scaling), strict=True
        )
        if self.use_cuda:
            buf.free.record(torch.cuda.current_stream(self.stream_device))
        return out

    # ---------------------------------------------------------------- forward
    def hidden_states(self, input_ids, position_ids, meta: SegmentMeta) -> torch.Tensor:
        """The residual stream after the last block, [T, hidden], as RewardModel.hidden_states."""
        rm = self.rm
        with torch.no_grad():
            h = rm.model.embed_tokens(input_ids)
            L = self.num_layers
            buf = self._load(0, avoid=None)
            for i in range(L):
                nxt = (i + 1) % L
                if nxt != i:
                    # prefetch the next block (block 0 of the next forward after the last) while this one runs
                    nbuf = self._load(nxt, avoid=buf)
                else:
                    nbuf = buf
                h = self._run_block(i, buf, h, position_ids, meta, rm.inv_freq, rm.rope_scaling)
                buf = nbuf
        return h

    def forward(self, input_ids, position_ids, meta: SegmentMeta, score_index) -> torch.Tensor:
        """See RewardModel.forward: rewards [N, H] in the model's dtype."""
        h = self.hidden_states(input_ids, position_ids, meta)
        with torch.no_grad():
            rm = self.rm
            return kernels.score_head(h, score_index, rm.model.norm.weight, rm.score.weight, rm.model.norm.eps)


def stream_layers(rm: RewardModel, device: torch.device | str | None = None) -> StreamedRewardModel:
    """Wrap `rm` so that its blocks stream from host memory to `device` (see the module docstring).
    Moves rm's tensors in place: afterwards use the returned model, not rm."""
    return StreamedRewardModel(rm, device)


def apply_offload(rm: RewardModel, offload: str | None, device) -> nn.Module:
    """The Scorer's `offload=` option: None -> rm unchanged; "layers" -> stream_layers(rm, device)."""
    if offload is None:
        return rm
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {OFFLOAD_MODES} or None, got {offload!r}")
    return stream_layers(rm, device)
