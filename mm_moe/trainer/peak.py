"""Peak bf16 dense FLOP/s of one device, for MFU: by the exact name CUDA reports.

Names, not substrings: "NVIDIA H100 PCIe" (756 TFLOPS) and "NVIDIA H100 NVL" (835) contain
"H100" as the SXM part (989) does; a substring match gave them the SXM peak and an MFU up to
31% too low. A device not in the table gets no MFU (logged once) unless `trainer.peak_tflops`
says its peak. Figures: NVIDIA's data sheets, dense (without sparsity).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("mm_moe")

PEAK_TFLOPS_BF16 = {
    "NVIDIA H100 80GB HBM3": 989.0,  # SXM5
    "NVIDIA H100 SXM5 80GB": 989.0,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,  # SXM
    "NVIDIA B200": 2250.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
}


def peak_flops(device_name: str | None, override_tflops: float = 0.0) -> float:
    """Peak FLOP/s of one device: `override_tflops` (trainer.peak_tflops) where set, else the
    table's figure for `device_name` (None: not a CUDA device); 0.0 (and a log line) where
    unknown: MFU is then not reported."""
    if override_tflops:
        return override_tflops * 1e12
    peak = PEAK_TFLOPS_BF16.get(device_name or "", 0.0)
    if not peak:
        log.info(
            "MFU is not reported: no peak FLOP/s known for %s; set trainer.peak_tflops to the "
            "device's bf16 dense peak (TFLOPS) to report it",
            repr(device_name) if device_name else "a CPU",
        )
    return peak * 1e12


def device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None
