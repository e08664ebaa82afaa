"""Process-group start-up, under torchrun/slurm or as a single plain process."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_env(environ: dict) -> dict:
    """torch.distributed's variables from Slurm's, for launches with one Slurm task per process
    and no torchrun (srun, Hydra's submitit launcher); empty when they do not apply."""
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return {}
    if int(environ.get("SLURM_NTASKS", "1")) <= 1:
        return {}
    nodelist = environ.get("SLURM_JOB_NODELIST", "")
    try:
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        hosts = []
    master = hosts[0] if hosts else environ.get("SLURMD_NODENAME", "127.0.0.1")
    job = int(environ.get("SLURM_JOB_ID", "0") or 0)
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_NTASKS"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": environ.get("MASTER_ADDR", master),
        "MASTER_PORT": environ.get("MASTER_PORT", str(20000 + job % 20000)),
    }


def adopt_slurm_env() -> None:
    os.environ.update(slurm_env(dict(os.environ)))


def init_distributed(backend: str, timeout_s: int, device: str = "auto") -> DistInfo:
    """Start (or join) the default process group; one plain process gets a world of one."""
    adopt_slurm_env()
    if "RANK" not in os.environ:  # not launched by torchrun: a world of one
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but CUDA is not available on this machine")
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not use_cuda:
        raise ValueError("parallel.backend=nccl needs CUDA; use parallel.backend=gloo on CPU")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(
            dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s)
        )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    mpu = sys.modules.get("megatron.core.parallel_state")  # imported only for expert parallelism
    if mpu is not None and mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
