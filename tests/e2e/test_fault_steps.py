"""Bad steps: a NaN on one rank is skipped by every rank before the optimizer step, too many in
a row stop the run, and a loss spike rolls back to the last checkpoint and moves the data on."""

from __future__ import annotations

import json

import torch

from tests.helpers import PYTHON, TORCHRUN, losses, metrics, train

K = 3  # the step that goes wrong


def _inject(fault: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return ["env", f"MM_MOE_FAULT_INJECT={fault}", PYTHON, "-m", "mm_moe.train"]
    return [
        "env",
        f"MM_MOE_FAULT_INJECT={fault}",
        TORCHRUN,
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "mm_moe.train",
    ]


def _step_files(run_dir, step: int) -> tuple[dict, dict, dict]:
    d = run_dir / "checkpoints" / f"step_{step:08d}"
    load = lambda name: torch.load(d / name, weights_only=True)  # noqa: E731
    return load("model.pt"), load("optimizer.pt"), json.loads((d / "meta.json").read_text())


def _assert_same_state(run_dir, before: int, after: int) -> None:
    model_a, optim_a, meta_a = _step_files(run_dir, before)
    model_b, optim_b, meta_b = _step_files(run_dir, after)
    assert model_a.keys() == model_b.keys()
    for name in model_a:
        assert torch.equal(model_a[name], model_b[name]), name
    assert optim_a["step"] == optim_b["step"]  # Adam's step count (bias correction)
    for name, moments in optim_a["moments"].items():
        for k, value in moments.items():
            assert torch.equal(value, optim_b["moments"][name][k]), (name, k)
    assert meta_a["scheduler"] == meta_b["scheduler"]


def test_nan_on_rank1_is_skipped_by_both_ranks_zero2(tmp_path):
    common = (
        "trainer.micro_batch_size=2",
        "parallel.zero_stage=2",
        "checkpoint.keep_last=0",
    )
    faulty = tmp_path / "faulty"
    proc = train(
        faulty,
        *common,
        "trainer.max_steps=6",
        "checkpoint.interval=1",
        launcher=_inject(f"nan:rank=1:step={K}", nproc=2),
    )
    out = proc.stdout + proc.stderr
    for rank in (0, 1):  # both ranks skip, naming the rank whose own loss went bad
        said = f"[rank{rank}] WARNING mm_moe: step {K}: non-finite loss on rank(s) 1;"
        assert said in out, out[-3000:]
    _assert_same_state(faulty, K - 1, K)
    by_step = {m["step"]: m for m in metrics(faulty)}
    assert by_step[K]["loss"] is None and by_step[K]["skipped_steps"] == 1
    assert by_step[K - 1]["skipped_steps"] == 0 and by_step[6]["skipped_steps"] == 1

    # The reference never sees batch K: it drops it and trains on.
    reference = tmp_path / "reference"
    train(reference, *common, "trainer.max_steps=5", launcher=_inject(f"drop_batch:step={K}", 2))
    got, want = losses(faulty), losses(reference)
    for step in range(1, K):
        assert got[step] == want[step], step
    for step in range(K + 1, 7):
        assert got[step] == want[step - 1], (step, got[step], want[step - 1])


def test_too_many_consecutive_skips_stop_the_run_zero0(tmp_path):
    run_dir = tmp_path / "run"
    proc = train(
        run_dir,
        "trainer.max_steps=8",
        "trainer.max_consecutive_skips=2",
        "checkpoint.interval=1",
        "checkpoint.keep_last=0",
        launcher=_inject("nan:step=3-5"),
        check=False,
    )
    assert proc.returncode != 0
    assert "more than trainer.max_consecutive_skips=2: stopping" in proc.stdout + proc.stderr
    # ZeRO-0 (one process, torch's own AdamW): skipped steps left everything as it was.
    _assert_same_state(run_dir, 2, 3)
    _assert_same_state(run_dir, 3, 4)
    assert [m["skipped_steps"] for m in metrics(run_dir)] == [0, 0, 1, 2]


def test_loss_spike_rolls_back_and_moves_the_data_on(tmp_path):
    spike = (
        "trainer.spike.window=6",
        "trainer.spike.min_steps=4",
        "trainer.spike.action=rollback",
        "checkpoint.interval=4",
        "checkpoint.async=true",
    )
    faulty = tmp_path / "faulty"
    proc = train(faulty, "trainer.max_steps=13", *spike, launcher=_inject("spike:step=10:scale=30"))
    out = proc.stdout + proc.stderr
    assert "step 10: loss spike" in out and "rolled back to the checkpoint of step 8" in out
    last = metrics(faulty)[-1]
    assert last["rollbacks"] == 1 and last["loss_spikes"] == 1

    # After the rollback the run holds step 8's state and reads batch 11 on: like a run that
    # drops batches 9 and 10.
    reference = tmp_path / "reference"
    train(reference, "trainer.max_steps=11", launcher=_inject("drop_batch:step=9:count=2"))
    got, want = losses(faulty), losses(reference)
    for step in range(1, 9):
        assert got[step] == want[step], step
    for step in range(11, 14):
        assert got[step] == want[step - 2], (step, got[step], want[step - 2])
