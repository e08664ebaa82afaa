"""Older checkpoints in today's shapes.

- Per-modality norms (`model.untie=[norms]`, MoT) hold one weight row per modality,
  `[M, d]`. Checkpoints written before the final norm (`norm.weight`) was untied store it
  shared, `[d]`: such a tensor, and its Adam moments, are copied to every modality's row.
"""

from __future__ import annotations

import torch
from torch import nn

from mm_moe.model.modality_ops import ModalityNorm


def _untied_norm_weights(model: nn.Module) -> dict[str, torch.Size]:
    return {
        f"{prefix}.weight" if prefix else "weight": m.weight.shape
        for prefix, m in model.named_modules()
        if isinstance(m, ModalityNorm)
    }


def _upgrade(tensors: dict, shapes: dict[str, torch.Size], fn) -> dict:
    out = dict(tensors)
    for name, shape in shapes.items():
        if name in out:
            out[name] = fn(out[name], shape)
    return out


def _expand(value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if value.dim() == 1 and len(shape) == 2 and value.shape[0] == shape[1]:
        return value.unsqueeze(0).expand(shape).clone()
    return value


def upgrade_model_state(state: dict, model: nn.Module) -> dict:
    return _upgrade(state, _untied_norm_weights(model), _expand)


def upgrade_moments(moments: dict, model: nn.Module) -> dict:
    expand_all = lambda per_key, shape: {k: _expand(v, shape) for k, v in per_key.items()}
    return _upgrade(moments, _untied_norm_weights(model), expand_all)
