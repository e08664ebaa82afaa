"""Mixture-of-Transformers building blocks: one copy of a weight per modality.

Each token uses its own modality's copy; attention itself stays global over the sequence.
Shape legend: B batch, S sequence, T tokens, M modalities.
"""

from __future__ import annotations

import torch
from torch import nn

from mm_moe.model.mlp import SwiGLU
from mm_moe.model.norms import RMSNorm


class Linear(nn.Linear):
    """nn.Linear that accepts (and ignores) modality ids, so tied and untied projections are
    called the same way."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor, modality_BS: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class Norm(RMSNorm):
    def forward(self, x: torch.Tensor, modality_BS: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


def _by_modality(x: torch.Tensor, modality_BS: torch.Tensor, num_modalities: int, fn):
    """Apply fn(m, rows of modality m) to the rows of x ([B, S, ...]) of each modality."""
    lead = modality_BS.shape
    x_T = x.reshape(lead.numel(), *x.shape[len(lead) :])
    modality_T = modality_BS.reshape(-1)
    out = None
    for m in range(num_modalities):
        idx = (modality_T == m).nonzero(as_tuple=True)[0]
        y = fn(m, x_T.index_select(0, idx))
        if out is None:
            out = y.new_zeros(x_T.shape[0], *y.shape[1:])
        out = out.index_copy(0, idx, y)
    return out.reshape(*lead, *out.shape[1:])


class ModalityLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, num_modalities: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_modalities, out_features, in_features))
        for w in self.weight:
            nn.init.kaiming_uniform_(w, a=5**0.5)

    def forward(self, x: torch.Tensor, modality_BS: torch.Tensor) -> torch.Tensor:
        return _by_modality(x, modality_BS, len(self.weight), lambda m, r: r @ self.weight[m].t())


class ModalityNorm(nn.Module):
    """RMSNorm with one weight per modality."""

    def __init__(self, dim: int, num_modalities: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_modalities, dim))

    def forward(self, x: torch.Tensor, modality_BS: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight.float()[modality_BS]  # [B, S, dim]
        while w.dim() < normed.dim():  # per-head norms: [B, S, H, D]
            w = w.unsqueeze(-2)
        return (normed * w).type_as(x)


class ModalityFFN(nn.Module):
    """One SwiGLU per modality."""

    def __init__(self, d_model: int, hidden: int, num_modalities: int):
        super().__init__()
        self.experts = nn.ModuleList(SwiGLU(d_model, hidden) for _ in range(num_modalities))

    def forward(self, x_BSd: torch.Tensor, modality_BS: torch.Tensor) -> torch.Tensor:
        return _by_modality(x_BSd, modality_BS, len(self.experts), lambda m, r: self.experts[m](r))
