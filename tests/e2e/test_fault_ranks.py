"""A dead or hung rank ends the job within parallel.timeout_s with an error naming it (also in
the middle of an expert-parallel all-to-all), and torchrun --max-restarts resumes the job from
its last complete checkpoint with the same losses as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from tests.helpers import PYTHON, REPO, TINY, TORCHRUN, _env, free_port, losses, train

TIMEOUT_S = 20
# Expert parallelism over both ranks: rank 0 waits for rank 1 inside the MoE all-to-all.
EP = (
    "experiment=tiny_moma",
    "trainer.micro_batch_size=2",
    "trainer.max_steps=6",
    "parallel.expert_parallel_size=2",
    f"parallel.timeout_s={TIMEOUT_S}",
)


def _launch_two(run_dir, fault: str) -> list[subprocess.Popen]:
    """Two ranks started like srun does (no torchrun agent to tear the others down)."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = _env()
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            MM_MOE_FAULT_INJECT=fault,
        )
        cmd = [PYTHON, "-m", "mm_moe.train", *TINY, f"trainer.run_dir={run_dir}", *EP]
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    return procs


def _wait_for_rank0(procs, rank1_gone) -> tuple[int, str, float]:
    """Rank 0's exit status, output, and seconds from rank 1's failure to rank 0's exit."""
    deadline = time.time() + 300
    while not rank1_gone(procs[1]) and time.time() < deadline:
        if procs[0].poll() is not None:
            break
        time.sleep(0.05)
    failed_at = time.time()
    out, _ = procs[0].communicate(timeout=120)
    return procs[0].returncode, out, time.time() - failed_at


def test_sigkill_of_rank1_ends_rank0_naming_it(tmp_path):
    procs = _launch_two(tmp_path / "run", "kill:rank=1:step=3")
    try:
        code, out, waited = _wait_for_rank0(procs, lambda p: p.poll() is not None)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[1].returncode == -signal.SIGKILL
    assert code != 0, out[-3000:]
    assert "RankLostError: lost rank 1" in out, out[-3000:]
    # one line, with where it was waiting (inside the MoE token exchange), not gloo's chain
    line = next(x for x in out.splitlines() if "RankLostError: lost rank 1" in x)
    assert "This rank was waiting in" in line and "all_to_all" in line, line
    assert "Traceback" not in out, out[-3000:]
    assert waited < TIMEOUT_S, waited


def _stopped(proc) -> bool:
    with open(f"/proc/{proc.pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_hung_rank1_ends_rank0_within_timeout(tmp_path):
    """A stopped process keeps its sockets open: no collective fails, the heartbeat says it."""
    procs = _launch_two(tmp_path / "run", "hang:rank=1:step=3")
    try:
        code, out, waited = _wait_for_rank0(procs, _stopped)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert code != 0, out[-3000:]
    assert "lost rank 1: no heartbeat" in out, out[-3000:]
    assert waited < TIMEOUT_S, waited


def test_torchrun_restarts_from_last_checkpoint_with_same_losses(tmp_path):
    common = (
        "trainer.max_steps=8",
        "trainer.micro_batch_size=2",
        "parallel.zero_stage=2",
        f"parallel.timeout_s={TIMEOUT_S}",
        "checkpoint.interval=2",
        "checkpoint.async=true",
    )
    train(tmp_path / "straight", *common, nproc=2)
    marker = tmp_path / "killed-once"
    restarting = [
        "env",
        f"MM_MOE_FAULT_INJECT=kill:rank=1:step=5:once={marker}",
        TORCHRUN,
        "--standalone",
        "--nproc_per_node=2",
        "--max-restarts=1",
        "-m",
        "mm_moe.train",
    ]
    run_dir = tmp_path / "restarted"
    proc = train(run_dir, *common, "checkpoint.resume=auto", launcher=restarting)
    assert marker.exists()  # rank 1 was killed once, and the job still completed
    out = proc.stdout + proc.stderr
    assert "lost rank 1" in out and "resumed from" in out, out[-4000:]
    assert losses(run_dir) == losses(tmp_path / "straight")
    assert os.path.exists(run_dir / "checkpoints" / "step_00000008" / "meta.json")


def test_start_up_does_not_wait_on_a_stale_extension_build_lock(tmp_path):
    """A process killed while DeepSpeed JIT-built its CPU shared-memory op leaves a lock file;
    torch waits on it forever. Training does not build (or wait for) that op."""
    ext = tmp_path / "torch_extensions"
    (ext / "deepspeed_shm_comm").mkdir(parents=True)
    (ext / "deepspeed_shm_comm" / "lock").touch()
    launcher = ["env", f"TORCH_EXTENSIONS_DIR={ext}", PYTHON, "-m", "mm_moe.train"]
    train(tmp_path / "run", "trainer.max_steps=1", launcher=launcher, timeout=120)
    assert losses(tmp_path / "run")


def test_workers_of_a_killed_torchrun_agent_checkpoint_and_end(tmp_path):
    """kill -9 of torchrun (the OOM killer, a launcher killed outside Slurm's cleanup): its
    workers get SIGTERM from the kernel (PR_SET_PDEATHSIG), write a checkpoint and end, where
    they used to train on as orphans that a relaunch could not replace."""
    run_dir = tmp_path / "run"
    args = [*TINY, f"trainer.run_dir={run_dir}", "experiment=tiny_moma", "trainer.max_steps=500"]
    log = open(tmp_path / "log.txt", "w")  # noqa: SIM115 - closed below
    agent = subprocess.Popen(
        [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "mm_moe.train", *args],
        cwd=REPO,
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    workers = []
    try:
        deadline = time.time() + 120
        while "step 3 " not in (tmp_path / "log.txt").read_text() and time.time() < deadline:
            time.sleep(0.2)
        children = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True)
        workers = [int(pid) for pid in children.stdout.split()]
        assert len(workers) == 2, children.stdout
        agent.kill()
        agent.wait()
        deadline = time.time() + 60
        while any(_alive(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in workers), "workers outlived their agent"
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        agent.kill()
        log.close()
    printed = (tmp_path / "log.txt").read_text()
    assert "SIGTERM received: checkpoint of step" in printed, printed[-3000:]
    assert (run_dir / "checkpoints" / "latest").is_file()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has ended
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"
