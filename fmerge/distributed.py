"""Runs launched by torchrun: one process group, rank 0 owns the store, the others help.

Steps that can split their work (the Fisher: examples sharded by rank, sums all-reduced) run on
every rank; every other step runs on rank 0 alone while the others wait at a barrier. Only rank 0
takes store locks, decides what is missing and writes artifacts; it tells the other ranks which
keys to compute, so all ranks always enter the same collective operations.
"""

from __future__ import annotations

import datetime as dt
import os
import re

import torch

from .errors import RecipeError, quoted

# Steps such as fine-tuning may keep the other ranks waiting at a barrier for hours.
_TIMEOUT = dt.timedelta(hours=12)


def launched() -> bool:
    """Whether this process is one of several started by torchrun (or another launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


_DEVICE_RE = re.compile(r"^(cpu|mps|cuda)(?::(\d{1,4}))?$")
_DEVICE_FORMS = "cpu, cuda (the first GPU), cuda:N (GPU number N) or mps (Apple silicon)"


def check_device(device: object, where: str = "--device", available: bool = True) -> str:
    """`device` in its canonical form if it is one fmerge knows and (`available`) this machine has,
    else a RecipeError naming `where` (the option or recipe key) and what to use instead. Checked
    before any work, so a typo never fails a run halfway. Commands that compute nothing (status,
    gc) check the form only: a recipe for a GPU machine can be inspected anywhere."""
    text = device if isinstance(device, str) else repr(device)
    m = _DEVICE_RE.match(text.strip().lower()) if isinstance(device, str) else None
    if m is None:
        raise RecipeError(f"{where}: unknown device {quoted(device, 60)}; use {_DEVICE_FORMS}.")
    kind, index = m.group(1), m.group(2)
    device = kind if index is None else f"{kind}:{int(index)}"
    if kind != "cpu" and not available:
        return device
    if kind == "cpu":
        if index not in (None, "0"):
            raise RecipeError(f"{where}: device '{text}': there is one CPU device; use cpu.")
        return "cpu"
    if kind == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise RecipeError(f"{where}: device '{text}' is not available here: MPS needs Apple silicon, macOS 12.3 "
                              f"or later and a PyTorch built with MPS. Use --device cpu"
                              + (" or cuda." if torch.cuda.is_available() else "."))
        if index not in (None, "0"):
            raise RecipeError(f"{where}: device '{text}': there is one MPS device; use mps.")
        return device
    if not torch.cuda.is_available():
        why = (f"this PyTorch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None else
               "no CUDA GPU is visible (check the driver, nvidia-smi and CUDA_VISIBLE_DEVICES="
               f"{os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')})")
        raise RecipeError(f"{where}: device '{text}' is not available: {why}. Use --device cpu, or install a "
                          f"CUDA build of PyTorch on a machine with a GPU.")
    count = torch.cuda.device_count()
    wanted = int(index or 0)
    if launched():  # torchrun: each rank takes the GPU of its local rank, whatever N was asked
        wanted = int(os.environ.get("LOCAL_RANK", "0"))
    if wanted >= count:
        raise RecipeError(f"{where}: device '{text}' does not exist: this machine has {count} CUDA GPU(s), "
                          f"cuda:0 to cuda:{count - 1}" + (f" (this rank's LOCAL_RANK is {wanted})" if launched() else "")
                          + ". Use one of those, or cuda for the first.")
    return device


def init(device: str, where: str = "--device", available: bool = True) -> str:
    """Check the device (`check_device`), join the process group (gloo on CPU, nccl on CUDA);
    return this rank's device."""
    import torch.distributed as dist

    device = check_device(device, where, available)
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


def sum_tensors(tensors: dict[str, torch.Tensor]) -> None:
    """Sum each tensor over the ranks in place, in name order so every rank enters the same
    collectives (no-op outside torchrun)."""
    import torch.distributed as dist

    if not active():
        return
    for name in sorted(tensors):
        dist.all_reduce(tensors[name])


def gather(items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank (plain data from our own code
    only; no-op outside torchrun). For per-row results whose metric needs all rows at once."""
    import torch.distributed as dist

    if not active():
        return items
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]
