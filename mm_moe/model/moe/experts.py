"""SwiGLU experts stored as stacked weights and run as one grouped GEMM.

Shape legend: E experts, d width, h expert hidden, N rows sorted by expert.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: torch._grouped_mm's
    backward rejects expanded (zero-stride) gradients such as those of `y.sum()`."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9 and dtype == torch.bfloat16
    return False  # the CPU kernel exists but is no faster than the loop


def grouped_matmul(
    x_Nd: torch.Tensor, w_Edh: torch.Tensor, counts_E: torch.Tensor, use_grouped_mm: bool
) -> torch.Tensor:
    """Row block e of x (counts_E[e] rows) times w[e]."""
    if use_grouped_mm:
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
        return _ContiguousGrad.apply(torch._grouped_mm(x_Nd, w_Edh, offs=offs_E))
    splits = counts_E.tolist()
    outs = [xe @ w_Edh[e] for e, xe in enumerate(torch.split(x_Nd, splits)) if splits[e]]
    if not outs:
        return x_Nd.new_zeros(0, w_Edh.shape[2])
    return torch.cat(outs)


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, hidden: int, gemm: str = "auto"):
        super().__init__()
        self.num_experts, self.hidden, self.gemm = num_experts, hidden, gemm
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w_up = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(w, std=1 / math.sqrt(w.shape[1]))

    def _use_grouped_mm(self, x: torch.Tensor) -> bool:
        if self.gemm == "auto":
            return grouped_mm_supported(x.device, x.dtype)
        return self.gemm == "grouped_mm"

    def forward(self, x_Nd: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        grouped = self._use_grouped_mm(x_Nd)
        gate_Nh = grouped_matmul(x_Nd, self.w_gate, counts_E, grouped)
        up_Nh = grouped_matmul(x_Nd, self.w_up, counts_E, grouped)
        return grouped_matmul(F.silu(gate_Nh) * up_Nh, self.w_down, counts_E, grouped)
