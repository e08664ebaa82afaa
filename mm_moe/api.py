"""The public Python API: `mm_moe.load_pretrained`."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml


def load_pretrained(path: str | Path, device: str | torch.device = "cpu"):
    """A trained model from a checkpoint (step, checkpoint or run directory, or an upcycled
    checkpoint), in eval mode (causal auxiliary routers for expert choice and
    mixture-of-depths), with its training config attached as `model.train_config`."""
    from mm_moe.checkpoint.pretrained import find_step_dir, load_weights
    from mm_moe.config import TrainConfig, from_dict

    step_dir = find_step_dir(path)
    cfg = from_dict(TrainConfig, yaml.safe_load((step_dir / "config.yaml").read_text()))
    model = cfg.model.build(cfg.moe)
    load_weights(step_dir, model)
    model.train_config = cfg
    return model.to(device).eval()
