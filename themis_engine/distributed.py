"""Process-group set-up and the few collectives the trainer and evaluator use.

Under torchrun (WORLD_SIZE > 1): NCCL on CUDA (one GPU per rank, cuda:LOCAL_RANK), gloo on CPU.
A single CUDA process that trains in mixed precision also gets a one-rank group, so that FSDP2
(fp32 master weights, bf16 compute) is the one code path for one GPU and many.

The evaluator's ranks exchange nothing but barriers (its scores travel through files), so it asks
for gloo on CPU and GPU alike, with a long timeout, and runs its barriers on `gloo_group()`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world: int
    device: torch.device
    owns_group: bool = False  # init started the process group (rather than joining one)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Destroy the process group if init started it; a group the caller had is left alone."""
        if self.owns_group:
            shutdown()


def init(device: str = "", need_group: bool = False, backend: str | None = None,
         timeout: timedelta | None = None) -> DistInfo:
    """Start (or join) the process group; returns this process's rank, world size and device.

    device: "" picks cuda where present, else cpu; "cuda" means cuda:LOCAL_RANK. need_group: a
    one-rank group even without torchrun. backend: None is NCCL on CUDA and gloo on CPU; "gloo"
    for ranks that only meet at barriers. timeout: how long a collective waits for the other ranks
    (None: torch's default)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not device:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(device)
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), dev)
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if world > 1:
        dist.init_process_group(backend, timeout=timeout, device_id=dev if backend == "nccl" else None)
    elif need_group:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank, world, dev, owns_group=dist.is_initialized())


def gloo_group(timeout: timedelta | None = None):
    """A group of all ranks for CPU-side collectives (barriers): None (the default group) when
    that is gloo or there is one rank, else a new gloo group."""
    if not active() or dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo", timeout=timeout)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max_int(x: int, device) -> int:
    if not active():
        return x
    t = torch.tensor([x], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def barrier(group=None) -> None:
    """Wait for every rank (on `group`, default: the default group); nothing with one rank."""
    if active():
        dist.barrier(group=group)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
