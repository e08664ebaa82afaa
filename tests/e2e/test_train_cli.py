"""The training command end to end: it trains, logs, validates its config."""

from __future__ import annotations

import subprocess

import pytest

from tests.helpers import PYTHON, REPO, _env, metrics, train

REQUIRED = {
    "step",
    "loss",
    "loss_text",
    "loss_image",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "tokens_per_s_padded",
    "flops_step",
    "step_time_s",
}


def test_tiny_dense_loss_falls_and_metrics_are_written(tmp_path):
    run_dir = tmp_path / "run"
    # A made-up peak (1 GFLOP/s) so that the CPU run reports an MFU to check.
    proc = train(
        run_dir, "trainer.max_steps=20", "logging.wandb.mode=offline", "trainer.peak_tflops=0.001"
    )
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 21))
    for r in rows:
        assert r.keys() >= REQUIRED, REQUIRED - r.keys()
        # MFU from the step's own FLOPs; tokens/s without the padding, and with it beside.
        assert r["mfu"] == pytest.approx(r["flops_step"] / r["step_time_s"] / 1e9, rel=1e-6)
        assert r["tokens_per_s"] <= r["tokens_per_s_padded"]
        assert r["tokens_per_s"] * r["step_time_s"] > r["tokens_loss"]
        # Measured memory beside the plan's estimate: this process's peak RSS (a tiny run
        # with torch loaded holds at least 100 MiB), never falling
        assert 0.1 < r["memory/host_peak_gib"] < 64
    assert [r["memory/host_peak_gib"] for r in rows] == sorted(
        r["memory/host_peak_gib"] for r in rows
    )
    first, last = rows[0], rows[-1]
    # Both modalities learn: the synthetic source has structure in text and images.
    assert last["loss"] < first["loss"] - 1.0
    assert last["loss_text"] < first["loss_text"] - 0.5
    assert last["loss_image"] < first["loss_image"] - 0.5
    assert (run_dir / "wandb").is_dir() and any((run_dir / "wandb").glob("offline-run-*"))
    assert "step 20 loss" in proc.stdout  # plain lines when not on a terminal


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "mm_moe.train", *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_unknown_key_on_command_line_names_it():
    proc = _run_cli("trainer.max_stepz=5")
    assert proc.returncode != 0
    assert "trainer.max_stepz" in proc.stderr and "max_steps" in proc.stderr


def test_bad_value_names_key_and_choices(tmp_path):
    proc = _run_cli("parallel.zero_stage=3", f"trainer.run_dir={tmp_path}")
    assert proc.returncode == 2
    assert "parallel.zero_stage=3" in proc.stderr and "0, 1, 2" in proc.stderr


def test_unknown_key_in_user_yaml_names_it(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ntrainer:\n  max_steps: 3\n  log_intervl: 1\n"
    )
    proc = _run_cli(
        "--config-dir", str(tmp_path), "experiment=mine", f"trainer.run_dir={tmp_path / 'run'}"
    )
    assert proc.returncode == 2
    assert "trainer.log_intervl" in proc.stderr and "log_interval" in proc.stderr


def test_batch_sizes_that_do_not_divide_fail_clearly(tmp_path):
    proc = _run_cli(
        "trainer.global_batch_size=6", "trainer.micro_batch_size=4", f"trainer.run_dir={tmp_path}"
    )
    assert proc.returncode == 2
    assert "trainer.global_batch_size=6" in proc.stderr


def test_fresh_run_refuses_to_clobber_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, "trainer.max_steps=2", "checkpoint.interval=2")
    proc = train(run_dir, "trainer.max_steps=2", "checkpoint.interval=2", check=False)
    assert proc.returncode == 2
    assert "checkpoint.resume=auto" in proc.stderr
    train(run_dir, "trainer.max_steps=2", "checkpoint.interval=2", "checkpoint.overwrite=true")
    # Starting from another run's checkpoint begins a new line here: refused just the same.
    other = tmp_path / "other"
    train(other, "trainer.max_steps=1", "checkpoint.interval=1")
    resume = f"checkpoint.resume={other}/checkpoints"
    proc = train(run_dir, "trainer.max_steps=2", "checkpoint.interval=2", resume, check=False)
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr


def test_multirun_sweep_gives_each_job_its_own_run_dir(tmp_path):
    proc = _run_cli(
        "-m",
        "experiment=tiny_dense",
        "trainer.max_steps=2",
        "logging.wandb.mode=disabled",
        "optim.lr=1e-3,2e-3",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = metrics(tmp_path / "0")
    second = metrics(tmp_path / "1")
    # Step 2 of a 10-step warmup: 2/10 of each sweep point's learning rate.
    assert [first[-1]["lr"], second[-1]["lr"]] == pytest.approx([2e-4, 4e-4])


def test_a_resume_with_wandb_off_keeps_the_wandb_run_for_the_next(tmp_path):
    """The wandb run id travels in meta.json through a resume with wandb disabled: the next
    resume with wandb on continues the same wandb run, not a new one."""
    import json

    steps = tmp_path / "checkpoints"
    train(tmp_path, "trainer.max_steps=1", "checkpoint.interval=1", "logging.wandb.mode=offline")
    first = json.loads((steps / "step_00000001" / "meta.json").read_text())["wandb_id"]
    assert first
    train(tmp_path, "trainer.max_steps=2", "checkpoint.interval=1", "checkpoint.resume=auto")
    assert json.loads((steps / "step_00000002" / "meta.json").read_text())["wandb_id"] == first
    train(
        tmp_path,
        "trainer.max_steps=3",
        "checkpoint.interval=1",
        "checkpoint.resume=auto",
        "logging.wandb.mode=offline",
    )
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{first}") for name in runs), runs
    # a resume back at step 1 (behind the wandb run's step 3): a new wandb run, said
    proc = train(
        tmp_path,
        "trainer.max_steps=2",
        "checkpoint.interval=1",
        f"checkpoint.resume={steps / 'step_00000001'}",
        "logging.wandb.mode=offline",
    )
    assert f"behind wandb run {first}, which logged up to step 3" in proc.stdout
    again = json.loads((steps / "step_00000002" / "meta.json").read_text())["wandb_id"]
    assert again and again != first
    # checkpoint.overwrite=true replaces the run: its wandb runs go too (a sync uploaded them)
    train(
        tmp_path, "trainer.max_steps=1", "checkpoint.overwrite=true", "logging.wandb.mode=offline"
    )
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and first not in runs[0] and again not in runs[0], runs
