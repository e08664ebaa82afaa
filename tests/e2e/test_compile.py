"""trainer.compile=true: every decoder block compiled (inductor on CPU), the same losses as
eager over 10 steps, through the real training command."""

from __future__ import annotations

import pytest

from tests.helpers import metrics, train

JOB = ["trainer.max_steps=10", "data.seq_len=32", "checkpoint.interval=0", "optim.lr=3e-4"]


def test_compiled_blocks_train_with_the_losses_of_eager(tmp_path):
    train(tmp_path / "eager", *JOB)
    proc = train(tmp_path / "compiled", *JOB, "trainer.compile=true")
    assert "4 blocks compiled whole" in proc.stdout + proc.stderr
    eager, compiled = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 10
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4), a["step"]
