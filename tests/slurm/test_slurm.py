"""launch/slurm.sbatch under a real (local, single-node) Slurm."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.helpers import REPO, TINY, _env, losses
from tests.slurm.local_slurm import LocalSlurm

pytestmark = pytest.mark.slurm


def _can_run_slurm() -> str | None:
    if os.geteuid() != 0:
        return "needs root to start slurmctld/slurmd"
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        return "needs Debian's slurm packages"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = _can_run_slurm()
    if reason:
        pytest.skip(reason)
    with LocalSlurm(tmp_path_factory.mktemp("slurm"), cpus=2) as cluster:
        yield cluster


def test_sbatch_runs_the_tiny_job_on_two_processes(slurm, tmp_path):
    run_dir = tmp_path / "run"
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    env = dict(_env(), NPROC_PER_NODE="2", LOG_DIR=str(log_dir), MASTER_PORT="29611")
    proc = slurm.sbatch(
        [
            "--wait",
            "--ntasks-per-node=1",
            "--cpus-per-task=2",
            f"--output={log_dir}/%x-%j.out",
            "launch/slurm.sbatch",
            *TINY,
            f"trainer.run_dir={run_dir}",
            "trainer.max_steps=4",
            "checkpoint.interval=2",
            "parallel.zero_stage=2",
        ],
        cwd=REPO,
        env=env,
    )
    logs = "\n".join(p.read_text() for p in sorted(log_dir.glob("*.out")))
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{logs[-5000:]}"
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert "2 process(es)" in logs
