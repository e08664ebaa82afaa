"""Small tensors made from host numbers and sent to the device without making the host wait."""

from __future__ import annotations

import torch


def host_to_device(values: list, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`values` as a tensor on `device`. On CUDA through pinned memory, non_blocking: a copy
    from pageable memory would make the host wait for the GPU (a sync in the step)."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)
