"""What the host machine holds for a run: a run on CPU whose weights, gradients and Adam state
alone exceed the machine's free memory is killed by the kernel mid-way, with no word from
Python, and one on a busy CPU crawls: both said before it starts; peak memory, measured."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

log = logging.getLogger("mm_moe")

# fp32 weights and gradients, Adam's two moments: what every parameter holds during training
# (a bf16 model keeps fp32 master weights instead of fp32 ones: about the same).
BYTES_PER_PARAMETER = 16


def available_bytes() -> int | None:
    """The kernel's MemAvailable; None where /proc/meminfo does not say it (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def warn_if_beyond_host_memory(model: nn.Module, device: torch.device) -> None:
    """On CPU: warn when this machine's processes (torchrun's LOCAL_WORLD_SIZE) need more for
    weights, gradients and Adam state than the memory free now (activations come on top)."""
    if device.type != "cpu":
        return
    free = available_bytes()
    if free is None:
        return
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    params = sum(p.numel() for p in model.parameters())
    need = params * BYTES_PER_PARAMETER * processes
    if need > free:
        gib = 2**30
        log.warning(
            "%.2fB parameters: about %.1f GiB of weights, gradients and Adam state for %d "
            "process(es) on this machine, more than the %.1f GiB free: the run will likely be "
            "killed for memory (without a message). A smaller model.*, or `python -m mm_moe.plan` "
            "to size it",
            params / 1e9,
            need / gib,
            processes,
            free / gib,
        )


def peak_memory(device: torch.device) -> dict[str, float]:
    """What this process has held at most so far, for the metrics: host RSS, and on CUDA the
    allocator's peak allocated and reserved bytes (host-side counters: no device sync), in
    GiB. Compare with `mm_moe.plan`'s estimate."""
    import resource

    out = {"memory/host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        out["memory/gpu_peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["memory/gpu_peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return out


def warn_if_cpu_busy(threads: int, processes: int) -> None:
    """Torch's CPU threads spin while they wait for each other: on cores that other jobs keep
    busy a step takes 40-60x as long (a trial: 11-20 s against 0.3 s at one thread). Said at
    the start when other work already fills the cores."""
    try:  # the cores this process may use (a cgroup's or taskset's share), else all
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return
    if threads > 1 and load > cores - 0.5:  # one thread a process (torchrun's) never spins
        log.warning(
            "the CPU is busy (load %.1f on %d cores) and this run adds %d threads: waiting "
            "threads spin, and steps can take many times as long; trainer.cpu_threads=1 (or "
            "OMP_WAIT_POLICY=PASSIVE in the environment) keeps them from it",
            load,
            cores,
            threads * processes,
        )
