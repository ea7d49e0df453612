"""Runs launched by torchrun: one process group, rank 0 owns the store, the others help.

Steps that can split their work (the Fisher: examples sharded by rank, sums all-reduced) run on
every rank; every other step runs on rank 0 alone while the others wait at a barrier. Only rank 0
takes store locks, decides what is missing and writes artifacts; it tells the other ranks which
keys to compute, so all ranks always enter the same collective operations.
"""

from __future__ import annotations

import datetime as dt
import os

import torch

# Steps such as fine-tuning may keep the other ranks waiting at a barrier for hours.
_TIMEOUT = dt.timedelta(hours=12)


def launched() -> bool:
    """Whether this process is one of several started by torchrun (or another launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> str:
    """Join the process group (gloo on CPU, nccl on CUDA); return this rank's device."""
    import torch.distributed as dist

    if not launched():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=_TIMEOUT)
    return device


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    import torch.distributed as dist

    return not active() or dist.get_rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if active():
        dist.barrier()


def broadcast(obj):
    """Rank 0's value of a picklable object on every rank (plain data from our own code only)."""
    import torch.distributed as dist

    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
