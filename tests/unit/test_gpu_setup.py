"""Setup on GPU machines (issue 28 item 1), with a fake `nvidia-smi` on PATH: `make setup`
chooses torch==2.13.0 for CUDA and replaces a CPU-only torch in .venv (scripts/torch_setup.sh,
in dry runs: nothing is installed), and `make gpu-check` stops in one line when GPUs are
listed but torch is a CPU build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SETUP = REPO / "scripts" / "torch_setup.sh"
CPU_SPEC = "torch==2.13.0"


def _fake_bin(tmp_path: Path, gpus: int) -> Path:
    """A folder with an `nvidia-smi` that lists `gpus` GPUs (like the real `-L`)."""
    bin_dir = tmp_path / f"bin{gpus}"
    bin_dir.mkdir(parents=True)
    lines = "".join(f'echo "GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})"\n' for i in range(gpus))
    tool = bin_dir / "nvidia-smi"
    tool.write_text(f'#!/bin/sh\n[ "$1" = "-L" ] || exit 0\n{lines}exit 0\n')
    tool.chmod(0o755)
    return bin_dir


def _fake_python(tmp_path: Path, probe: str | None) -> Path:
    """A `python` whose torch probe answers "VERSION CUDA WHERE" (None: no torch)."""
    py = tmp_path / f"python_{abs(hash(probe))}"
    body = "exit 1" if probe is None else f'echo "{probe}"'
    py.write_text(f"#!/bin/sh\n{body}\n")
    py.chmod(0o755)
    return py


def _env(bin_dir: Path, **extra) -> dict:
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **extra}


def _choose(tmp_path, gpus: int, probe: str | None) -> subprocess.CompletedProcess:
    py = _fake_python(tmp_path, probe)
    return subprocess.run(
        ["bash", str(SETUP), "choose", str(py), CPU_SPEC],
        env=_env(_fake_bin(tmp_path / str(abs(hash((gpus, probe)))), gpus), DRY_RUN="1"),
        capture_output=True,
        text=True,
        check=True,
    )


@pytest.mark.parametrize(
    "gpus, probe, pip_args, message",
    [
        (1, None, "torch==2.13.0", "installing torch==2.13.0 (CUDA)"),
        (2, "2.13.0+cpu none venv", "torch==2.13.0", "torch 2.13.0+cpu in .venv is CPU-only"),
        (
            1,
            "2.13.0+cpu none system",
            "--ignore-installed torch==2.13.0",
            "in the system site-packages is CPU-only",
        ),
        (1, "2.9.0a0+nv25.09 12.9 system", "--ignore-installed torch==2.13.0", "is not 2.13"),
        (1, "2.13.0+cu128 12.8 venv", "", "leaving existing torch 2.13.0+cu128 (CUDA 12.8)"),
        (0, None, CPU_SPEC, "installing the CPU wheel"),
        (0, "2.13.0+cpu none venv", "", "leaving existing torch 2.13.0+cpu alone"),
    ],
)
def test_torch_choice_follows_the_gpus_that_nvidia_smi_lists(
    tmp_path, gpus, probe, pip_args, message
):
    proc = _choose(tmp_path, gpus, probe)
    assert proc.stdout.strip() == pip_args, proc.stderr
    assert message in proc.stderr
    replaced = "replacing it in .venv" in proc.stderr
    assert replaced == ("--ignore" in pip_args or "cpu none venv" in str(probe) and gpus > 0)
    if replaced:  # said in one line; .venv's own CPU torch is uninstalled first
        assert len([ln for ln in proc.stderr.splitlines() if "replacing" in ln]) == 1
        assert ("pip uninstall -y torch" in proc.stderr) == probe.endswith("venv")


def test_verify_stops_a_setup_that_got_a_cpu_torch_on_a_gpu_machine(tmp_path):
    cpu = _fake_python(tmp_path, "2.13.0+cpu none venv")
    cuda = _fake_python(tmp_path, "2.13.0+cu128 12.8 venv")
    run = lambda py, gpus: subprocess.run(
        ["bash", str(SETUP), "verify", str(py)],
        env=_env(_fake_bin(tmp_path / f"{py.name}{gpus}", gpus)),
        capture_output=True,
        text=True,
    )
    bad = run(cpu, 1)
    assert bad.returncode == 1 and len(bad.stderr.splitlines()) == 1
    assert "torch.version.cuda is None" in bad.stderr and "1 GPU" in bad.stderr
    assert run(cuda, 1).returncode == 0 and run(cpu, 0).returncode == 0


@pytest.mark.skipif(not shutil.which("make"), reason="make not installed")
def test_make_setup_runs_again_where_gpus_meet_the_cpu_torch_of_venv(tmp_path):
    """The .venv stamp is remade (FORCE) when nvidia-smi lists GPUs and .venv's torch is
    CPU-only, and not otherwise (make -n: printed, not run; the Makefile's own mtime aside)."""
    py = REPO / ".venv" / "bin" / "python"
    if not (REPO / ".venv" / ".mm_moe_installed").exists() or not py.exists():
        pytest.skip("no set-up .venv (make setup-run)")
    if torch.version.cuda is not None:
        pytest.skip("this .venv has a CUDA torch")
    dry = lambda gpus: (
        subprocess.run(
            ["make", "-n", "-o", "Makefile", "-o", "pyproject.toml", "setup-run"],
            cwd=REPO,
            env=_env(_fake_bin(tmp_path, gpus)),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert "Nothing to be done" in dry(0)
    with_gpu = dry(1)
    assert "scripts/torch_setup.sh choose" in with_gpu and "torch_setup.sh verify" in with_gpu
    # and what that step would do to this .venv (a dry run: nothing uninstalled)
    proc = subprocess.run(
        ["bash", str(SETUP), "choose", str(py), CPU_SPEC],
        env=_env(_fake_bin(tmp_path / "again", 1), DRY_RUN="1"),
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.strip() == "torch==2.13.0"
    assert "is CPU-only: replacing it in .venv with torch==2.13.0" in proc.stderr


def test_gpu_check_exits_1_naming_a_cpu_torch_when_gpus_are_listed(tmp_path):
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    out = tmp_path / "gpu_check.json"
    env = _env(_fake_bin(tmp_path, 2))
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), f"--out={out}"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.count("\n") == 1, proc.stdout
    assert "lists 2 GPU(s)" in proc.stdout and "torch.version.cuda is None" in proc.stdout
    assert not out.exists()
    if shutil.which("make"):  # the same through `make gpu-check` (setup skipped: -o setup)
        made = subprocess.run(
            ["make", "-o", "setup", "gpu-check", f"PY={sys.executable}", f"ARGS=--out={out}"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        assert made.returncode != 0 and "torch.version.cuda is None" in made.stdout
