"""trainer.precision=bf16 on CPU: the tiny MoMa on 2 ranks at EP=2 (DeepSpeed's bf16
optimizer, the expert-parallel grad norm, the casts), close to fp32, resuming exactly."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import metrics, train

JOB = ["experiment=tiny_moma", "parallel.expert_parallel_size=2", "trainer.micro_batch_size=2"]


def test_bf16_trains_on_cpu_with_expert_parallelism_and_resumes_exactly(tmp_path):
    fp32, bf16, resumed = tmp_path / "fp32", tmp_path / "bf16", tmp_path / "resumed"
    train(fp32, *JOB, "trainer.max_steps=2", "trainer.precision=fp32", nproc=2)
    proc = train(
        bf16,
        *JOB,
        "trainer.max_steps=4",
        "trainer.precision=bf16",
        "checkpoint.interval=2",
        nproc=2,
    )
    assert "using DeepSpeed's ZeRO-1 bf16 optimizer" in proc.stdout + proc.stderr
    rows = {r["step"]: r for r in metrics(bf16)}
    reference = {r["step"]: r for r in metrics(fp32)}
    for step in (1, 2):  # bf16 rounding only: the same losses and grad norms to ~1%
        assert rows[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-2)
        assert rows[step]["grad_norm"] == pytest.approx(reference[step]["grad_norm"], rel=5e-2)
    assert rows[4]["loss"] < rows[1]["loss"]

    shutil.copytree(bf16 / "checkpoints" / "step_00000002", resumed / "ckpt" / "step_00000002")
    train(
        resumed,
        *JOB,
        "trainer.max_steps=4",
        "trainer.precision=bf16",
        f"checkpoint.resume={resumed / 'ckpt' / 'step_00000002'}",
        nproc=2,
    )
    again = {r["step"]: r for r in metrics(resumed)}
    for step in (3, 4):
        assert again[step]["loss"] == rows[step]["loss"], step
