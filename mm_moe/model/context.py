"""What one forward pass carries through the layers, and what the layers hand back.

A new context is made per forward call, so aux losses and statistics travel with the output and
nothing is kept in module globals.

Shape legend: B batch, S sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ForwardContext:
    modality_ids_BS: torch.Tensor
    position_ids_BS: torch.Tensor
    doc_ids_BS: torch.Tensor | None
    mask_B1SS: torch.Tensor | None
    # Tokens that compete for expert capacity and MoD slots (false: padding, no loss).
    valid_BS: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    def add_loss(self, name: str, value: torch.Tensor) -> None:
        self.aux_losses[name] = self.aux_losses[name] + value if name in self.aux_losses else value

    def add_stat(self, name: str, value: torch.Tensor | float) -> None:
        self.stats[name] = torch.as_tensor(value).detach().float()
