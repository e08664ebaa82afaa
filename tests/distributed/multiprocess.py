"""Run a function on several processes with a real process group (gloo on CPU, nccl on GPU).

    run_distributed(check_something, world_size=2, backend="gloo")

`func(rank, world_size, *args)` must be a module-level function (it is pickled by reference);
an exception in any process fails the caller with that process's traceback.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_TIMEOUT = datetime.timedelta(seconds=120)


def _worker(rank: int, world_size: int, backend: str, port: int, func, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    from mm_moe.parallel.distributed import shutdown

    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=_TIMEOUT)
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=_TIMEOUT
    )
    try:
        func(rank, world_size, *args)
        dist.barrier()
    finally:
        shutdown()  # marks this rank's exit and stops its heartbeat thread, as training does


def run_distributed(func, *args, world_size: int = 2, backend: str = "gloo") -> None:
    # The caller hosts the rendezvous store on a port the kernel picks and holds until every
    # rank is done: no window in which a parallel test (or a gloo connection) takes the port,
    # and the ranks' heartbeats (mm_moe.parallel.distributed.Liveness) reach it to the end.
    store = dist.TCPStore(
        "127.0.0.1", 0, world_size, is_master=True, timeout=_TIMEOUT, wait_for_workers=False
    )
    mp.start_processes(
        _worker,
        args=(world_size, backend, store.port, func, args),
        nprocs=world_size,
        join=True,
        start_method="spawn",
    )
