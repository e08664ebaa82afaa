"""Auxiliary routers (MoMa 2.4): predict a non-causal selection from the token alone.

Expert choice and mixture-of-depths select over the whole batch, which leaks the future at
inference. A small MLP per router learns to predict the selection from the token's hidden
state (stop-gradient input, binary cross-entropy), and replaces the selection in eval mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AuxRouter(nn.Module):
    def __init__(self, d_model: int, hidden: int, num_outputs: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_model, hidden), nn.SiLU(), nn.Linear(hidden, num_outputs)
        )

    def forward(self, x_Td: torch.Tensor) -> torch.Tensor:
        """Logits [T, outputs]: > 0 predicts `selected`."""
        # Training keeps the auxiliary routers in fp32 whatever the model's precision.
        return self.net(x_Td.detach().to(self.net[0].weight.dtype)).float()

    @staticmethod
    def loss_and_accuracy(logits_TO: torch.Tensor, selected_TO: torch.Tensor):
        """BCE loss, accuracy, and the accuracy of always predicting "not selected" (the
        baseline an aux router must beat: with 1 in 4 pairs selected it is already 0.75)."""
        target = selected_TO.float()
        if logits_TO.numel() == 0:
            zero = logits_TO.sum()
            return zero, zero.detach() + 1.0, zero.detach() + 1.0
        loss = F.binary_cross_entropy_with_logits(logits_TO, target)
        acc = ((logits_TO > 0) == selected_TO).float().mean().detach()
        return loss, acc, 1.0 - target.mean()
