"""Expert parallelism on CUDA: NCCL all-to-all, bf16 and grouped GEMM. Skipped without CUDA;
the 2-rank cases need 2 GPUs. The dispatcher checks are the CPU test's table
(tests/distributed/test_expert_parallel_dispatch.py), run with NCCL."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.multiprocess import run_distributed
from tests.distributed.test_expert_parallel_dispatch import _all_checks
from tests.gpu.device import require_device
from tests.helpers import metrics, train

pytestmark = pytest.mark.gpu

needs_two = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
MOMA = (
    "experiment=tiny_moma",
    "trainer.micro_batch_size=2",
    "trainer.global_batch_size=8",
    "optim.lr=3e-4",  # see tests/distributed/test_expert_parallel.py
    "optim.eps=1e-6",
    "trainer.device=cuda",
    "trainer.peak_tflops=0",
)


@pytest.fixture(autouse=True)
def _needs_cuda(request):
    require_device(request)  # CUDA, or the CPU for the cpu_ok tests (tests/gpu/device.py)


@needs_two
def test_dispatcher_and_layer_over_nccl():
    run_distributed(_all_checks, "cuda", world_size=2, backend="nccl")


@needs_two
def test_ep2_fp32_equals_one_gpu(tmp_path):
    common = (*MOMA, "trainer.max_steps=6", "trainer.precision=fp32")
    train(tmp_path / "one", *common)
    train(tmp_path / "ep2", *common, "parallel.expert_parallel_size=2", nproc=2)
    one, ep2 = metrics(tmp_path / "one"), metrics(tmp_path / "ep2")
    for a, b in zip(one, ep2):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a["step"], a, b)


@needs_two
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_ep2_bf16_grouped_gemm_trains(tmp_path, zero_stage):
    """bf16 on sm90+ takes torch._grouped_mm for the local experts."""
    train(
        tmp_path,
        *MOMA,
        "optim.lr=3e-3",
        "trainer.max_steps=30",
        "trainer.precision=bf16",
        "parallel.expert_parallel_size=2",
        f"parallel.zero_stage={zero_stage}",
        nproc=2,
    )
    rows = metrics(tmp_path)
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
