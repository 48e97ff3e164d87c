"""Glue shared by every kernel module: the op namespace and the one call path, launch settings, row
views. No kernel imports a helper from a sibling kernel; they all import this module.

The call path of every op (ARCHITECTURE.md section 5):

    public function -> torch.autograd.Function -> KernelOp (custom op "themis::<name>") -> launcher

`custom_op(name)` registers a launcher as the torch.library op `themis::<name>` and returns a
`KernelOp`; its fake (shape-only) implementation is registered right under it with
`@<op>.register_fake`. Calling the KernelOp runs the launcher directly in plain eager mode (the
dispatcher's Python round trip costs tens of microseconds of host time per call) and goes through
the registered op whenever something traces: Dynamo, a dispatch mode (make_fx, FakeTensorMode) or a
tensor subclass (FSDP2's DTensor, FakeTensor). Both ways run the same launcher, so the results are
bit-identical; `ALWAYS_DISPATCH = True` forces the registered op (tests check the equality).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

NAMESPACE = "themis"  # the one torch.library namespace of the engine's ops: torch.ops.themis.<name>

ALWAYS_DISPATCH = False

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _tracing(args) -> bool:
    return (
        ALWAYS_DISPATCH
        or torch.compiler.is_compiling()
        or _get_current_dispatch_mode() is not None
        or any(torch.is_tensor(a) and type(a) not in _PLAIN for a in args)
    )


class KernelOp:
    """A launcher registered as the custom op `themis::<name>` (see the module docstring).

    `op(*args)` runs it (eagerly or through the dispatcher); `op.impl` is the launcher itself and
    `op.op` the torch.library op (`torch.ops.themis.<name>`)."""

    def __init__(self, name: str, impl: Callable, mutates_args=()):
        self.name = f"{NAMESPACE}::{name}"
        self.impl = impl
        self._def = torch.library.custom_op(self.name, impl, mutates_args=mutates_args)
        self.op = getattr(torch.ops.themis, name)
        functools.update_wrapper(self, impl)

    def register_fake(self, fn: Callable) -> Callable:
        """Decorator: the shape / dtype function torch.compile and FakeTensorMode use."""
        self._def.register_fake(fn)
        return fn

    def __call__(self, *args):
        if _tracing(args):
            return self.op(*args)
        return self.impl(*args)

    def __repr__(self) -> str:
        return f"KernelOp({self.name})"


def custom_op(name: str, mutates_args=()) -> Callable[[Callable], KernelOp]:
    """Decorator: register the type-annotated launcher as `themis::<name>`; returns the KernelOp."""

    def wrap(impl: Callable) -> KernelOp:
        return KernelOp(name, impl, mutates_args)

    return wrap


# --------------------------------------------------------------------------------------------
# Launch settings
# --------------------------------------------------------------------------------------------
def num_warps_for(elems: int, max_warps: int = 16) -> int:
    """Warps for a program whose tile holds `elems` elements: 4 up to 2048, 8 up to 8192, else 16."""
    warps = 4 if elems <= 2048 else 8 if elems <= 8192 else 16
    return min(warps, max_warps)


def row_tile(n_cols: int, tile_elems: int = 4096, max_block_cols: int | None = None,
             max_rows: int = 64) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS) of a row-wise kernel: the columns rounded up to a power of two
    (capped at max_block_cols), and as many rows (<= max_rows) as fit `tile_elems` elements."""
    import triton  # here, so that the CUDA-extension backend (cuda_ext) imports without Triton

    block_cols = triton.next_power_of_2(n_cols)
    if max_block_cols is not None:
        block_cols = min(block_cols, max_block_cols)
    block_rows = max(1, min(max_rows, tile_elems // block_cols))
    return block_rows, block_cols


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(t: torch.Tensor, n_tiles: int) -> int:
    """How many programs a persistent (grid-stride) kernel launches: 2 per SM on a GPU. Off the GPU
    (the interpreter) 2, so that the tests walk the grid-stride loop."""
    if t.is_cuda:
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        cap = 2 * _sm_count(index)
    else:
        cap = 2
    return max(1, min(n_tiles, cap))


# --------------------------------------------------------------------------------------------
# Gradients: per-program weight partials, the empty tensor of a gradient not asked for
# --------------------------------------------------------------------------------------------
def weight_grad_partials(t: torch.Tensor, n_tiles: int, width: int, compute_dw: bool) -> tuple[int, torch.Tensor]:
    """(programs, partial) of a persistent backward kernel that also makes a weight gradient of
    `width` columns: persistent_programs(t, n_tiles) programs (0 when n_tiles is 0: nothing to
    launch), and the float32 [programs, width] buffer of their partial sums ([0, width] when not
    compute_dw). `weight_grad` sums it."""
    n_programs = persistent_programs(t, n_tiles) if n_tiles > 0 else 0
    partial = torch.empty((n_programs if compute_dw else 0, width), dtype=torch.float32, device=t.device)
    return n_programs, partial


def weight_grad(partial: torch.Tensor, weight: torch.Tensor, compute_dw: bool) -> torch.Tensor:
    """The weight gradient from the per-program partials [programs, width] (float32): their sum in
    weight's dtype (deterministic, no atomics), or `empty_unless(False, weight)` when not compute_dw."""
    return partial.sum(0).to(weight.dtype) if compute_dw else empty_unless(False, weight)


def empty_unless(needed: bool, like: torch.Tensor) -> torch.Tensor:
    """torch.empty_like(like) when needed, else the empty [0] tensor (like's dtype and device) that the
    ops return in place of a gradient nobody asked for."""
    return torch.empty_like(like) if needed else like.new_empty((0,))


# --------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------
def rowmajor(t: torch.Tensor) -> torch.Tensor:
    """t with a unit stride in its last dim (copied only when it has not)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """t viewed as [rows, n_cols] with unit column stride (copies only when it must)."""
    return rowmajor(t.reshape(-1, n_cols))


__all__ = [
    "ALWAYS_DISPATCH",
    "KernelOp",
    "NAMESPACE",
    "as_rows",
    "custom_op",
    "empty_unless",
    "num_warps_for",
    "persistent_programs",
    "row_tile",
    "rowmajor",
    "weight_grad",
    "weight_grad_partials",
]
