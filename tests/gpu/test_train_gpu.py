"""The CUDA path: bf16 on one GPU and NCCL data parallelism. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.device import DEVICE, require_device
from tests.helpers import losses, metrics, train

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda(request):
    require_device(request)  # CUDA, or the CPU for the cpu_ok tests (tests/gpu/device.py)


@pytest.mark.cpu_ok
def test_bf16_training_on_gpu_learns(tmp_path):
    train(
        tmp_path,
        "trainer.max_steps=30",
        f"trainer.device={DEVICE}",
        "trainer.precision=bf16",
        "trainer.peak_tflops=0",
    )
    rows = metrics(tmp_path)
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    if DEVICE == "cuda":  # the allocator's peaks, measured beside the plan's estimate
        peak = rows[-1]["memory/gpu_peak_allocated_gib"]
        assert 0 < peak <= rows[-1]["memory/gpu_peak_reserved_gib"]
    if DEVICE == "cuda" and any(
        name in torch.cuda.get_device_name() for name in ("H100", "H200", "A100")
    ):
        assert 0 < rows[-1]["mfu"] < 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_zero2_equals_single_gpu(tmp_path):
    common = (
        "trainer.max_steps=6",
        "trainer.micro_batch_size=2",
        "trainer.device=cuda",
        "trainer.precision=fp32",
    )
    train(tmp_path / "one", *common)
    train(tmp_path / "two", *common, "parallel.zero_stage=2", nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-4 * abs(one[step])
