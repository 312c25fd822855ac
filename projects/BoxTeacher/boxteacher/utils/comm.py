"""Helpers for multi-process (DDP) runs; every function also works in a single process.

Pure ``torch.distributed``: the modeling code may use it for its loss normalisers.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

# Set by the launcher: the process group of the processes on this machine.
_LOCAL_PROCESS_GROUP = None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_local_rank() -> int:
    """Rank of this process among the processes of its machine."""
    if _LOCAL_PROCESS_GROUP is None:
        return get_rank()
    return dist.get_rank(group=_LOCAL_PROCESS_GROUP)


def set_local_process_group(group) -> None:
    global _LOCAL_PROCESS_GROUP
    _LOCAL_PROCESS_GROUP = group


def is_main_process() -> bool:
    return get_rank() == 0


def synchronize() -> None:
    """Barrier over all processes (no-op in a single process)."""
    if get_world_size() > 1:
        if dist.get_backend() == dist.Backend.NCCL and torch.cuda.is_available():
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


@functools.lru_cache()
def _object_group():
    """A gloo group for exchanging picklable objects (NCCL only moves CUDA tensors)."""
    if dist.get_backend() == "nccl":
        return dist.new_group(backend="gloo")
    return dist.group.WORLD


def all_gather(obj: Any) -> list[Any]:
    """Gather a picklable object from every process; returns the list in rank order."""
    if get_world_size() == 1:
        return [obj]
    output: list[Any] = [None] * get_world_size()
    dist.all_gather_object(output, obj, group=_object_group())
    return output


def gather(obj: Any, dst: int = 0) -> list[Any]:
    """Gather a picklable object on rank ``dst``; other ranks get an empty list."""
    if get_world_size() == 1:
        return [obj]
    group = _object_group()
    if get_rank() == dst:
        output: list[Any] = [None] * get_world_size()
        dist.gather_object(obj, output, dst=dst, group=group)
        return output
    dist.gather_object(obj, None, dst=dst, group=group)
    return []


def reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """All-reduce SUM divided by the world size (AdelaiDet's ``reduce_mean``); a new tensor."""
    world_size = get_world_size()
    if world_size == 1:
        return tensor.clone()
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor / world_size


def shared_random_seed() -> int:
    """A random integer that is the same in every process (drawn on rank 0)."""
    seed = int(np.random.randint(2**31))
    return all_gather(seed)[0]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model
