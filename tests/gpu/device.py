"""Where the `gpu` tests run: CUDA (`make gpu-check`, or pytest on a GPU machine), or the CPU
with MM_MOE_GPU_TESTS_DEVICE=cpu (`scripts/gpu_check.py --device cpu --smoke`, which CI runs):
there only the tests marked `cpu_ok` run, each on the CPU, so that the command a GPU machine
runs is one CI has run. Tests that need CUDA itself (FlexAttention's backward, the sync debug
mode, NCCL) stay unmarked and skip."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("MM_MOE_GPU_TESTS_DEVICE", "cuda")
assert DEVICE in ("cuda", "cpu"), f"MM_MOE_GPU_TESTS_DEVICE={DEVICE}: cuda or cpu"


def require_device(request) -> None:
    """Skip the test unless it can run on DEVICE here."""
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if DEVICE == "cpu" and request.node.get_closest_marker("cpu_ok") is None:
        pytest.skip("CUDA only (MM_MOE_GPU_TESTS_DEVICE=cpu)")
