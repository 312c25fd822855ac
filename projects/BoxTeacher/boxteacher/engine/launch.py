"""Start (multi-process) training: ``--num-gpus`` processes per machine, or under ``torchrun``."""

from __future__ import annotations

import datetime
import logging
import os
import socket
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..utils import comm

__all__ = ["DEFAULT_TIMEOUT", "launch", "started_by_torchrun"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def _find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def started_by_torchrun() -> bool:
    """Whether ``torchrun`` (or another launcher of the ``env://`` protocol) started us."""
    return all(name in os.environ for name in _TORCHRUN_VARIABLES)


def _use_cuda(processes_per_machine: int) -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= processes_per_machine


def launch(
    main_func: Callable[..., Any],
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args: Sequence[Any] = (),
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
) -> None:
    """Run ``main_func(*args)`` in every process of a (possibly) distributed job.

    Args:
        main_func: a picklable (module-level) function.
        num_gpus_per_machine: processes per machine. Each uses one GPU when CUDA has that
            many devices; otherwise the processes run on the CPU with the "gloo" backend.
        num_machines, machine_rank: multi-machine jobs.
        dist_url: ``tcp://host:port`` of the machine of rank 0, or "auto" for a free port on
            this machine (single machine only).
        args: arguments of ``main_func``.
        timeout: timeout of collective operations.

    With world size 1 ``main_func`` runs in this process. When the ``torchrun`` variables
    (RANK, WORLD_SIZE, LOCAL_RANK) are set, this process joins the job with ``env://`` and runs
    ``main_func`` itself (the process-count arguments are then ignored). An exception in any
    process terminates the others and is raised here.
    """
    if started_by_torchrun():
        _run_under_torchrun(main_func, args, timeout)
        return
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        main_func(*args)
        return
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError(
                "dist_url 'auto' works on one machine only; give the tcp://host:port of machine 0."
            )
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    logger.info(
        "Launching %d processes per machine with dist_url %s", num_gpus_per_machine, dist_url
    )
    mp.start_processes(
        _worker,
        nprocs=num_gpus_per_machine,
        args=(
            main_func,
            world_size,
            num_gpus_per_machine,
            machine_rank,
            dist_url,
            tuple(args),
            timeout,
        ),
        daemon=False,
        start_method="spawn",
    )


def _worker(
    local_rank: int,
    main_func: Callable[..., Any],
    world_size: int,
    num_gpus_per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: tuple[Any, ...],
    timeout: datetime.timedelta,
) -> None:
    use_cuda = _use_cuda(num_gpus_per_machine)
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        init_method=dist_url,
        world_size=world_size,
        rank=machine_rank * num_gpus_per_machine + local_rank,
        timeout=timeout,
    )
    _finish_setup(world_size // num_gpus_per_machine, num_gpus_per_machine)
    main_func(*args)
    # Together: a process that tears gloo down while another still runs can be aborted by it.
    comm.synchronize()
    dist.destroy_process_group()


def _run_under_torchrun(
    main_func: Callable[..., Any], args: Sequence[Any], timeout: datetime.timedelta
) -> None:
    world_size = int(os.environ["WORLD_SIZE"])
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    init_here = world_size > 1 and not dist.is_initialized()
    if init_here:
        use_cuda = _use_cuda(per_machine)
        if use_cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
        _finish_setup(world_size // per_machine, per_machine)
    main_func(*args)
    if init_here:
        comm.synchronize()
        dist.destroy_process_group()


def _finish_setup(num_machines: int, per_machine: int) -> None:
    """Create the process group of this machine's processes, then wait for everybody."""
    machine = comm.get_rank() // per_machine
    for index in range(num_machines):  # every process must create every group
        group = dist.new_group(list(range(index * per_machine, (index + 1) * per_machine)))
        if index == machine:
            comm.set_local_process_group(group)
    comm.synchronize()
