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
    def loss(logits_TO: torch.Tensor, selected_TO: torch.Tensor, mask=None) -> torch.Tensor:
        """BCE, the mean over the elements (over those where `mask`, of logits' shape, is
        true: a weighted mean instead of a boolean index, which would sync on CUDA)."""
        if logits_TO.numel() == 0:
            return logits_TO.sum()
        if mask is None:
            return F.binary_cross_entropy_with_logits(logits_TO, selected_TO.float())
        per_TO = F.binary_cross_entropy_with_logits(
            logits_TO, selected_TO.float(), reduction="none"
        )
        weight_TO = mask.to(per_TO.dtype)
        return (per_TO * weight_TO).sum() / weight_TO.sum().clamp_min(1)

    @staticmethod
    def accuracy(logits_TO: torch.Tensor, selected_TO: torch.Tensor, mask=None):
        """(accuracy, the accuracy of always predicting "not selected"): the baseline an aux
        router must beat (with 1 in 4 pairs selected it is already 0.75). 1 when empty."""
        with torch.no_grad():
            if logits_TO.numel() == 0:
                one = logits_TO.new_ones((), dtype=torch.float32)
                return one, one
            right_TO = ((logits_TO > 0) == selected_TO).float()
            sel_TO = selected_TO.float()
            if mask is None:
                return right_TO.mean(), 1.0 - sel_TO.mean()
            weight_TO = mask.float()
            n = weight_TO.sum()
            acc = (right_TO * weight_TO).sum() / n.clamp_min(1)
            base = 1.0 - (sel_TO * weight_TO).sum() / n.clamp_min(1)
            one = torch.ones_like(acc)
            return torch.where(n > 0, acc, one), torch.where(n > 0, base, one)


def batched_logits(routers: list[AuxRouter], x_Td: torch.Tensor) -> torch.Tensor:
    """The logits of several auxiliary routers on the same tokens, side by side
    ([T, sum of outputs]), as two matmuls: the first layers stacked, the second layers as one
    block-diagonal matrix (each router sees only its own hidden units)."""
    if len(routers) == 1:
        return routers[0](x_Td)
    first, second = [r.net[0] for r in routers], [r.net[2] for r in routers]
    x = x_Td.detach().to(first[0].weight.dtype)
    hidden = F.silu(
        F.linear(x, torch.cat([f.weight for f in first]), torch.cat([f.bias for f in first]))
    )
    w_out = torch.block_diag(*[s.weight for s in second])
    return F.linear(hidden, w_out, torch.cat([s.bias for s in second])).float()
