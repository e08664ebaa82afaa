"""Run a function on several processes with a real process group (gloo on CPU, nccl on GPU).

    run_distributed(check_something, world_size=2, backend="gloo")

`func(rank, world_size, *args)` must be a module-level function (it is pickled by reference);
an exception in any process fails the caller with that process's traceback.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, backend: str, port: int, func, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120)
    )
    try:
        func(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(func, *args, world_size: int = 2, backend: str = "gloo") -> None:
    mp.start_processes(
        _worker,
        args=(world_size, backend, _free_port(), func, args),
        nprocs=world_size,
        join=True,
        start_method="spawn",
    )
