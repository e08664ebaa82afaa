"""Why CUDA cannot be used here, in one sentence for an error message."""

from __future__ import annotations

import torch


def cuda_missing() -> str | None:
    """None where CUDA is usable; else what this machine's torch reports."""
    if torch.cuda.is_available():
        return None
    built = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
    return (
        f"CUDA is not available on this machine (torch {torch.__version__}, {built}, "
        f"{torch.cuda.device_count()} GPUs visible)"
    )
