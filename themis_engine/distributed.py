"""Process-group set-up and the few collectives the trainer and evaluator use.

Under torchrun (WORLD_SIZE > 1): NCCL on CUDA (one GPU per rank, cuda:LOCAL_RANK), gloo on CPU.
A single CUDA process that trains in mixed precision also gets a one-rank group, so that FSDP2
(fp32 master weights, bf16 compute) is the one code path for one GPU and many.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = "", need_group: bool = False) -> DistInfo:
    """Start (or join) the process group; returns this process's rank, world size and device."""
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
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if world > 1:
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    elif need_group:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank, world, dev)


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


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
