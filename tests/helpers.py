"""Run the real training entry point in subprocesses and read what it wrote."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TORCHRUN = str(Path(PYTHON).with_name("torchrun"))

# A small, fast, deterministic job: fp32 on CPU, wandb off unless a test turns it on.
TINY = [
    "experiment=tiny_dense",
    "logging.wandb.mode=disabled",
    "logging.progress=lines",
    "trainer.log_interval=1",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=4",
    "trainer.cpu_threads=1",
    "data.seq_len=64",
    "optim.warmup_steps=3",
    "optim.decay_steps=20",
]


# torch.distributed's launch variables: a subprocess starts its own world.
_DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A free TCP port for a rendezvous that separately started processes must find by
    number. Drawn outside the kernel's ephemeral range (ip_local_port_range), where no
    outgoing connection (a parallel test's gloo pairs) or port-0 bind can take it between this
    check and the launcher's own bind; where that range leaves no room, a port-0 bind's."""
    low, high = 32768, 60999
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split()[:2])
    except (OSError, ValueError):
        pass
    ranges = [(max(1024, low - 12000), low), (high + 1, min(65536, high + 12001))]
    rng = random.Random()  # not the tests' seeded global generator: parallel workers differ
    for first, end in [r for r in ranges if r[0] < r[1]]:
        for _ in range(50):
            port = rng.randrange(first, end)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def train(
    run_dir: Path,
    *overrides: str,
    nproc: int = 1,
    check: bool = True,
    launcher: list[str] | None = None,
    timeout: int = 600,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """`python -m mm_moe.train` (or torchrun with nproc > 1) on the tiny job."""
    args = [*TINY, f"trainer.run_dir={run_dir}", *overrides]
    if launcher is not None:
        cmd = [*launcher, *args]
    elif nproc > 1:
        cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", "mm_moe.train", *args]
    else:
        cmd = [PYTHON, "-m", "mm_moe.train", *args]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env={**_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir)}
