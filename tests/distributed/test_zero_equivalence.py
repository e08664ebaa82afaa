"""Data parallelism under torchrun with ZeRO equals one process with gradient accumulation
over the same global batch; checkpoints move between world sizes."""

from __future__ import annotations

import pytest

from tests.helpers import losses, train

STEPS = 8
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, micro-batch 2: four accumulation steps per global batch of 8."""
    run_dir = tmp_path_factory.mktemp("single")
    train(
        run_dir, f"trainer.max_steps={STEPS}", "trainer.micro_batch_size=2", "checkpoint.interval=4"
    )
    return losses(run_dir)


def _assert_close(got: dict, want: dict, steps) -> None:
    for step in steps:
        rel = abs(got[step] - want[step]) / abs(want[step])
        assert rel <= REL_TOL, (step, got[step], want[step], rel)


# What GPUs run (overlap_comm), with buckets small enough to fill during a backward, as a
# billion-parameter model's 5e8-element buckets do: ZeRO must know which micro-batch ends the
# accumulation before its backward starts (DeepSpeed's backward prologue, which it could not
# hook to the model's output: deepspeed_fixes.run_backward_prologue). Without it, ZeRO-1
# reduced the first micro-batch's full buckets on their own.
OVERLAPPED_SMALL_BUCKETS = ("parallel.overlap_comm=true", "parallel.reduce_bucket_size=5000")


@pytest.mark.parametrize("buckets", ["default", "overlapped_small"])
@pytest.mark.parametrize("zero_stage", [2, 1])
def test_two_ranks_equal_one_rank_with_accumulation(tmp_path, single, zero_stage, buckets):
    run_dir = tmp_path / "run"
    train(
        run_dir,
        f"trainer.max_steps={STEPS}",
        "trainer.micro_batch_size=2",
        f"parallel.zero_stage={zero_stage}",
        "checkpoint.interval=4",
        *(OVERLAPPED_SMALL_BUCKETS if buckets == "overlapped_small" else ()),
        nproc=2,
    )
    _assert_close(losses(run_dir), single, range(1, STEPS + 1))


def test_checkpoint_from_two_ranks_zero2_resumes_on_one(tmp_path, single):
    run_dir = tmp_path / "run"
    train(
        run_dir,
        "trainer.max_steps=4",
        "trainer.micro_batch_size=2",
        "parallel.zero_stage=2",
        "checkpoint.interval=4",
        nproc=2,
    )
    train(
        run_dir,
        f"trainer.max_steps={STEPS}",
        "trainer.micro_batch_size=4",
        "checkpoint.resume=auto",
    )
    _assert_close(losses(run_dir), single, range(5, STEPS + 1))


def test_moma_two_ranks_equal_one_rank(tmp_path):
    """Expert-choice routing looks only at each micro-batch, so data parallelism with the
    same micro-batches gives the same numbers as accumulation on one rank."""
    common = (
        "experiment=tiny_moma",
        "trainer.max_steps=4",
        "trainer.micro_batch_size=2",
        "trainer.global_batch_size=8",
        "trainer.log_interval=1",
    )
    train(tmp_path / "one", *common)
    train(tmp_path / "two", *common, "parallel.zero_stage=2", nproc=2)
    _assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), range(1, 5))
