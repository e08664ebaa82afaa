"""Sort-based token permutation (megablocks' indices_and_bins, without a one-hot tensor).

Shape legend: T tokens, d width, N selected (token, expert) pairs, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Permutation:
    order_N: torch.Tensor  # pairs sorted by expert: pair order_N[i] goes to row i
    token_idx_N: torch.Tensor  # token of each sorted row
    gate_N: torch.Tensor  # gate of each sorted row
    counts_E: torch.Tensor  # rows per expert (int64, on the tokens' device)


def sort_by_expert(
    token_idx_N: torch.Tensor, expert_idx_N: torch.Tensor, gate_N: torch.Tensor, num_experts: int
) -> Permutation:
    """Sort -> histogram -> (cumsum later, by the GEMM): rows grouped by expert, in order."""
    order_N = torch.argsort(expert_idx_N, stable=True)
    counts_E = torch.bincount(expert_idx_N, minlength=num_experts)
    return Permutation(order_N, token_idx_N[order_N], gate_N[order_N], counts_E)


def permute(x_Td: torch.Tensor, perm: Permutation) -> torch.Tensor:
    return x_Td.index_select(0, perm.token_idx_N)


def unpermute(y_Nd: torch.Tensor, perm: Permutation, num_tokens: int) -> torch.Tensor:
    """Weight each expert output by its gate and sum the outputs of every token."""
    weighted_Nd = y_Nd * perm.gate_N.unsqueeze(1).to(y_Nd.dtype)
    out_Td = y_Nd.new_zeros(num_tokens, y_Nd.shape[1])
    return out_Td.index_add(0, perm.token_idx_N, weighted_Nd)
