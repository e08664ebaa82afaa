"""Rotary position embeddings (RoPE), half-rotation layout as in Llama / Hugging Face.

Shape legend: B batch, S sequence, H heads, D head dim.
"""

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        exponents_D2 = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
        inv_freq_D2 = 1.0 / theta**exponents_D2
        angles_PD2 = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq_D2)
        # Not saved in checkpoints: derived from the config.
        self.register_buffer("cos_PD2", angles_PD2.cos().float(), persistent=False)
        self.register_buffer("sin_PD2", angles_PD2.sin().float(), persistent=False)

    def forward(self, x_BHSD: torch.Tensor, position_ids_BS: torch.Tensor) -> torch.Tensor:
        # Positions are not checked here (that would sync with the host in every layer): the
        # data path bounds them by data.seq_len <= model.max_seq_len, the decoder checks the
        # length of implicit positions, and sampling checks its own.
        cos_B1SD2 = self.cos_PD2[position_ids_BS].unsqueeze(1)
        sin_B1SD2 = self.sin_PD2[position_ids_BS].unsqueeze(1)
        x1, x2 = x_BHSD.float().chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos_B1SD2 - x2 * sin_B1SD2, x2 * cos_B1SD2 + x1 * sin_B1SD2], -1)
        return rotated.type_as(x_BHSD)
