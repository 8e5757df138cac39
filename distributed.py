"""Several processes with `torchrun`, or one without it, through the same calls.

    torchrun --standalone --nproc_per_node 2 finetune.py ... --device cpu     (gloo on CPU, nccl on CUDA)

`init(device_name)` reads the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK); without them it does nothing
and every helper below behaves as the single process it is (rank 0 of 1), so the scripts need no `if distributed:`
branches, as dinov2's `distributed` module.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import commons

__all__ = [
    "init",
    "shutdown",
    "is_enabled",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "broadcast_object",
    "gather_objects",
    "gather_to_main",
    "all_reduce_sum",
    "weights_digest",
    "share_weights",
    "wrap",
    "unwrap",
]

# Rank 0 alone validates and mines while the others wait at the next collective: allow it hours, not minutes.
TIMEOUT = datetime.timedelta(hours=6)


def is_enabled() -> bool:
    """Whether this process belongs to a process group of torchrun."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (0 in a single process)."""
    return dist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    """Number of processes (1 in a single process)."""
    return dist.get_world_size() if is_enabled() else 1


def is_main_process() -> bool:
    """Rank 0: the one that logs, validates and writes files."""
    return get_rank() == 0


def init(device_name: str) -> torch.device:
    """Join torchrun's process group when its variables are set; return this process's device.

    `device_name` is `--device` (auto, cuda, cpu). Under torchrun, CUDA ranks use the GPU of their LOCAL_RANK with
    nccl; CPU ranks use gloo.
    """
    device = commons.resolve_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_enabled():
        return device
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return device


def shutdown() -> None:
    """Leave the process group (nothing in a single process)."""
    if is_enabled():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank."""
    if is_enabled():
        dist.barrier()


def broadcast_object(obj: Any, source: int = 0) -> Any:
    """`obj` of rank `source`, on every rank (picklable objects)."""
    if not is_enabled():
        return obj
    holder = [obj if get_rank() == source else None]
    dist.broadcast_object_list(holder, src=source)
    return holder[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not is_enabled():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0; None on the other ranks (which keep no copy of the others')."""
    if not is_enabled():
        return [obj]
    gathered: list[Any] | None = [None] * get_world_size() if is_main_process() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum of `tensor` over ranks (a new tensor; `tensor` itself in a single process)."""
    if not is_enabled():
        return tensor
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def weights_digest(*modules: nn.Module) -> str:
    """SHA-256 of every parameter and buffer of `modules` (names, dtypes, shapes and values), frozen ones included."""
    digest = hashlib.sha256()
    for index, module in enumerate(modules):
        for name, tensor in module.state_dict(keep_vars=False).items():
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{index}.{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def share_weights(*modules: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers of `modules`, in place, then check it by a digest.

    Each rank builds its models after its own seeding (`commons.process_seed`), so randomly initialised parts differ
    between ranks; DistributedDataParallel shares only the module it wraps, at wrapping, and a frozen part (the
    backbone of train_dhe.py) is not wrapped. Nothing to do in a single process.
    """
    if not is_enabled():
        return
    with torch.no_grad():
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)
    digests = gather_objects(weights_digest(*modules))
    if len(set(digests)) != 1:
        raise RuntimeError(f"the processes hold different model weights after sharing rank 0's: digests {digests}")


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` in DistributedDataParallel under torchrun, unchanged otherwise."""
    if not is_enabled():
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or `module` itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
