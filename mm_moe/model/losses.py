"""The language-modelling loss per token, shared by training and evaluation.

Shape legend: B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_token_losses(
    logits_BSV: torch.Tensor, targets_BS: torch.Tensor, z_loss: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-entropy per token in fp32, and logsumexp^2 (the z-loss term) when asked for."""
    logits_BSV = logits_BSV.float()
    ce_BS = F.cross_entropy(
        logits_BSV.flatten(0, 1), targets_BS.flatten(), reduction="none"
    ).view_as(targets_BS)
    z_BS = torch.logsumexp(logits_BSV, dim=-1).pow(2) if z_loss > 0 else None
    return ce_BS, z_BS
