"""Cluster details (issue 28 item 9): the Slurm job gets the node's CPUs, the launchers set
PYTORCH_CUDA_ALLOC_CONF, gpu-check's limits leave room for first compiles, DeepSpeed overlaps
communication on GPUs and accumulates gradients in fp32 on request, and the Docker image copies
everything `make train` reads."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from mm_moe.cli import compose
from mm_moe.errors import UserError
from mm_moe.parallel.distributed import DistInfo
from mm_moe.parallel.parallelize import deepspeed_config_for
from tests.helpers import metrics, train

REPO = Path(__file__).resolve().parents[2]


def _tool(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(0o755)


def _record_env_and_args(path: Path) -> str:
    """A stand-in command that appends one line: its CPU/allocator environment, its arguments."""
    return (
        'echo "SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-} '
        'PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-} ARGS $*" >> ' + shlex.quote(str(path))
    )


def test_the_slurm_script_run_by_hand_says_how_to_submit_it_and_makes_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["LOG_DIR"] = str(tmp_path / "logs")
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "slurm.sbatch"), "--help"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "not inside a Slurm job; submit it: sbatch" in proc.stderr
    assert not (tmp_path / "logs").exists()


def _slurm_job(tmp_path, bin_dir, submit_dir, **extra) -> subprocess.CompletedProcess:
    """launch/slurm.sbatch as a job submitted from `submit_dir` would run it, with the stand-in
    Slurm tools in `bin_dir` and `extra` environment (a key given as None is unset)."""
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_SUBMIT_DIR": str(submit_dir),
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NODELIST": "node0",
        "LOG_DIR": str(tmp_path / "logs"),
        **{k: v for k, v in extra.items() if v is not None},
    }
    for key in ("SLURM_CPUS_PER_TASK", "PYTORCH_CUDA_ALLOC_CONF", *extra):
        if extra.get(key) is None:
            env.pop(key, None)
    return subprocess.run(
        ["bash", str(REPO / "launch" / "slurm.sbatch"), "experiment=tiny_dense"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_slurm_job_gives_the_task_every_cpu_of_the_node(tmp_path):
    sbatch = (REPO / "launch" / "slurm.sbatch").read_text()
    assert re.search(r"^#SBATCH --exclusive$", sbatch, re.M)
    bin_dir, record = tmp_path / "bin", tmp_path / "record.txt"
    bin_dir.mkdir()
    _tool(bin_dir, "srun", _record_env_and_args(record))  # stands in for Slurm's srun
    _tool(bin_dir, "scontrol", 'echo "node0"')
    extra = {"SLURM_JOB_NUM_NODES": "1", "SLURM_CPUS_ON_NODE": "96", "NPROC_PER_NODE": "8"}
    proc = _slurm_job(tmp_path, bin_dir, REPO, PYTHON_BIN="/bin/true", **extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = record.read_text()
    assert "SRUN_CPUS_PER_TASK=96" in got and "--cpus-per-task=96" in got
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in got
    assert "mm_moe.train checkpoint.resume=auto experiment=tiny_dense" in got


def test_torchrun_launcher_sets_expandable_segments_unless_the_user_did(tmp_path):
    record = tmp_path / "record.txt"
    _tool(tmp_path, "python", _record_env_and_args(record))
    env = {**os.environ, "PYTHON_BIN": str(tmp_path / "python"), "NPROC_PER_NODE": "1"}
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    run = lambda **extra: subprocess.run(
        ["bash", str(REPO / "launch" / "torchrun.sh"), "experiment=tiny_dense"],
        env={**env, **extra},
        capture_output=True,
        text=True,
        check=True,
    )
    run()
    run(PYTORCH_CUDA_ALLOC_CONF="max_split_size_mb:512")
    launches = [ln for ln in record.read_text().splitlines() if "-m mm_moe.train" in ln]
    assert len(launches) == 2
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True " in launches[0]
    assert "PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:512 " in launches[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_limits_leave_room_for_first_compiles():
    gpu_check = _gpu_check()
    limits = gpu_check.LIMITS_S
    full = gpu_check._steps(Namespace(device="cuda", smoke=False, quick=False))
    assert [name for name, _ in full] == list(limits)  # every step has its limit
    # compiling the 1.4B blocks on a cold cache takes minutes: well beyond the eager run's
    assert limits["train_moma_1.4b_compiled"] >= limits["train_moma_1.4b_eager"] + 300
    assert limits["train_moma_1.4b_eager"] >= 300 and limits["tests"] >= 600
    assert min(limits.values()) >= 300  # each benchmark compiles its kernels first
    assert gpu_check.SMOKE_LIMIT_S >= 300


def _cfg(*overrides: str):
    return compose(["experiment=tiny_dense", "trainer.global_batch_size=8", *overrides])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_deepspeed_overlaps_communication_on_gpus(device):
    cfg = _cfg("trainer.micro_batch_size=4")
    dist = DistInfo(0, 2, 0, torch.device(device), "gloo")
    ds = deepspeed_config_for(cfg, dist)
    assert ds["zero_optimization"]["overlap_comm"] is (device == "cuda")
    assert "data_types" not in ds  # auto: DeepSpeed accumulates in the training dtype
    assert ds["gradient_accumulation_steps"] == 1


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_overlap_and_bucket_size_keys_reach_deepspeed_and_are_validated(device):
    dist = DistInfo(0, 2, 0, torch.device(device), "gloo")
    for overlap in (True, False):
        ds = deepspeed_config_for(
            _cfg(f"parallel.overlap_comm={str(overlap).lower()}", "parallel.reduce_bucket_size=7"),
            dist,
        )
        assert ds["zero_optimization"]["overlap_comm"] is overlap
        assert ds["zero_optimization"]["reduce_bucket_size"] == 7
    default = deepspeed_config_for(_cfg(), dist)["zero_optimization"]
    assert default["reduce_bucket_size"] == 500_000_000
    with pytest.raises(UserError, match=r"parallel.reduce_bucket_size=0 must be positive"):
        _cfg("parallel.reduce_bucket_size=0")


def test_grad_accum_dtype_fp32_reaches_deepspeed_and_is_validated():
    cfg = _cfg("trainer.micro_batch_size=2", "trainer.grad_accum_dtype=fp32")
    ds = deepspeed_config_for(cfg, DistInfo(0, 1, 0, torch.device("cuda"), "nccl"))
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["bf16"]["enabled"]
    assert ds["gradient_accumulation_steps"] == 4
    # DeepSpeed reduces the fp32 accumulators in bf16 under bf16 otherwise (rounded, even alone)
    assert ds["communication_data_type"] == "fp32"
    auto = deepspeed_config_for(
        _cfg("trainer.micro_batch_size=2"), DistInfo(0, 1, 0, torch.device("cuda"), "nccl")
    )
    assert "communication_data_type" not in auto
    with pytest.raises(UserError, match="trainer.grad_accum_dtype"):
        _cfg("trainer.grad_accum_dtype=fp16")
    with pytest.raises(UserError, match="trainer.grad_accum_dtype=fp32 needs parallel.zero"):
        _cfg("trainer.grad_accum_dtype=fp32", "parallel.zero_stage=2")


def test_bf16_with_fp32_gradient_accumulation_trains(tmp_path):
    """DeepSpeed's bf16 optimizer with fp32 accumulation over 2 micro-batches, on CPU."""
    proc = train(
        tmp_path,
        "trainer.max_steps=3",
        "trainer.precision=bf16",
        "trainer.grad_accum_dtype=fp32",
        "checkpoint.interval=0",
    )
    assert "gradient accumulation in fp32 (trainer.grad_accum_dtype): BF16_Optimizer" in (
        proc.stdout + proc.stderr
    )
    rows = metrics(tmp_path)
    assert len(rows) == 3 and all(r["grad_norm"] > 0 for r in rows)


def test_fp32_gradient_accumulation_logs_the_norm_of_bf16_accumulation(tmp_path):
    """The same steps (weights all but frozen: lr 1e-12) with gradients accumulated over 2
    micro-batches in fp32 and in bf16 have the same grad norm to bf16 rounding. DeepSpeed's
    bf16 optimizer never zeroed `.grad` between micro-batches (its backward prologue runs from
    hooks it cannot attach to the model's output) and held 2*g1 + g2 from step 2 on, where
    it computes the norm, ~1.5x too large (~2.5x at 4 micro-batches); the step read step 1's
    norm from the last micro-batch's `.grad` once that was zeroed."""
    norms = {}
    for accum in ("fp32", "auto"):
        run_dir = tmp_path / accum
        train(
            run_dir,
            "trainer.max_steps=3",
            "trainer.precision=bf16",
            f"trainer.grad_accum_dtype={accum}",
            "optim.lr=1e-12",
            "checkpoint.interval=0",
        )
        norms[accum] = [r["grad_norm"] for r in metrics(run_dir)]
    assert len(norms["fp32"]) == 3
    assert norms["fp32"] == pytest.approx(norms["auto"], rel=0.02)


# Top-level paths of the repository that `make train` never reads.
NOT_FOR_TRAIN = {".ci", ".gitignore", "docker", "docs"}


def _copied(dockerfile: str) -> set[str]:
    """The repository paths the Dockerfile's COPY lines bring into the image."""
    copied = set()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            sources = [w for w in line.split()[1:-1] if not w.startswith("--")]
            copied |= {s.rstrip("/") for s in sources}
    return copied


def test_dockerfile_copies_what_make_train_reads():
    if not shutil.which("make"):
        pytest.skip("make not installed")
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    copied = _copied(dockerfile)
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    top = {path.split("/")[0] for path in tracked}
    assert copied <= top, f"COPY of paths that do not exist: {copied - top}"
    # What make train's recipes name (a dry run of every step: -B), plus the build files
    # that `pip install -e .` reads (pyproject.toml names README.md; setup.py copies configs).
    recipes = subprocess.run(
        ["make", "-n", "-B", "train", "PYTHON=python3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    named = {w.split("/")[0] for w in re.findall(r"[\w.-]+(?:/[\w.-]+)+", recipes)}
    named |= {"mm_moe"} if "-m mm_moe." in recipes else set()
    needed = (named & top) | {"pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "configs"}
    assert "data_pipelines" in needed and "scripts" in needed
    assert needed - copied == set(), "make train reads these, the image lacks them"
    assert top - copied <= NOT_FOR_TRAIN, top - copied
    assert re.search(r"^FROM \S+$", dockerfile, re.M)
    assert "torch==2.13.0" in dockerfile and "startswith('2.13.')" in dockerfile


def test_a_job_submitted_outside_the_checkout_finds_its_python(tmp_path):
    """PYTHON_BIN defaulted to <submit folder>/.venv/bin/python: a job submitted from any
    other folder died with exit 127. The checkout the submitted script lies in (Slurm's
    `Command=`) is looked in too; neither is one line, exit 2."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record.txt"
    bin_dir.mkdir()
    _tool(bin_dir, "srun", _record_env_and_args(record))
    for script, found in ((REPO / "launch" / "slurm.sbatch", True), (Path("/nowhere/x"), False)):
        show = f'[[ "$1" == show && "$2" == job ]] && echo "   Command={script} x=1" || echo node0'
        _tool(bin_dir, "scontrol", show)
        # submitted from a folder without .venv, PYTHON_BIN unset
        proc = _slurm_job(tmp_path, bin_dir, tmp_path, NPROC_PER_NODE="1", PYTHON_BIN=None)
        if found:
            assert proc.returncode == 0, proc.stderr
            assert f"{REPO}/.venv/bin/python -m torch.distributed.run" in record.read_text()
        else:
            assert (
                proc.returncode == 2 and "no .venv/bin/python in the submit folder" in proc.stderr
            )


def test_a_gpu_check_step_that_times_out_takes_its_children_along(tmp_path):
    """A step past its limit killed only its direct child: ranks it had started kept GPU
    memory through every later step. The whole process group goes, both streams' tails kept."""
    gpu_check = _gpu_check()
    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); "
        "print('to stderr', file=sys.stderr, flush=True); time.sleep(60)"
    )
    result = gpu_check._run([sys.executable, "-c", script], timeout=3)
    assert result["exit"] == "timeout" and "to stderr" in result["tail"]
    child = Path(f"/proc/{int(pid_file.read_text())}/stat")
    time.sleep(0.5)
    # gone, or a zombie nobody reaped yet (a container's init may not): no longer running
    assert not child.exists() or child.read_text().split(")")[-1].split()[0] == "Z"
