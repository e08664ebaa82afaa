"""Sort-based token permutation (megablocks' indices_and_bins, without a one-hot tensor).

Shape legend: T tokens, d width, N selected (token, expert) pairs, E experts, K pairs per token.
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
    # When every routed token has exactly `fanout` pairs (dropless token choice): the slot
    # token * fanout + j of each sorted row, so outputs combine by gather instead of scatter.
    slot_N: torch.Tensor | None = None
    fanout: int = 0


def sort_by_expert(
    token_idx_N: torch.Tensor,
    expert_idx_N: torch.Tensor,
    gate_N: torch.Tensor,
    num_experts: int,
    slot_N: torch.Tensor | None = None,
    fanout: int = 0,
) -> Permutation:
    """Sort -> histogram -> (cumsum later, by the GEMM): rows grouped by expert, in order."""
    order_N = torch.argsort(expert_idx_N, stable=True)
    counts_E = torch.bincount(expert_idx_N, minlength=num_experts)
    slot = slot_N[order_N] if slot_N is not None else None
    return Permutation(order_N, token_idx_N[order_N], gate_N[order_N], counts_E, slot, fanout)


def permute(x_Td: torch.Tensor, perm: Permutation) -> torch.Tensor:
    return x_Td.index_select(0, perm.token_idx_N)


class _GatherRows(torch.autograd.Function):
    """out = x[src]; each row of x is read by exactly one entry of src (listed in `back`), the
    other entries read a placeholder row and must get zero weight downstream. The backward is
    then a gather (grad[back]) instead of autograd's scatter-add."""

    @staticmethod
    def forward(ctx, x_Nd, src_S, back_N):
        ctx.save_for_backward(back_N)
        return x_Nd.index_select(0, src_S)

    @staticmethod
    def backward(ctx, grad_Sd):
        (back_N,) = ctx.saved_tensors
        return grad_Sd.index_select(0, back_N), None, None


def unpermute(y_Nd: torch.Tensor, perm: Permutation, num_tokens: int) -> torch.Tensor:
    """Weight each expert output by its gate and sum the outputs of every token."""
    if perm.slot_N is not None and len(perm.slot_N):
        return _combine_slots(y_Nd, perm, num_tokens)
    weighted_Nd = y_Nd * perm.gate_N.unsqueeze(1).to(y_Nd.dtype)
    out_Td = y_Nd.new_zeros(num_tokens, y_Nd.shape[1])
    return out_Td.index_add(0, perm.token_idx_N, weighted_Nd)


def _combine_slots(y_Nd: torch.Tensor, perm: Permutation, num_tokens: int) -> torch.Tensor:
    """[T, K] slots per token (empty slots of unrouted tokens read row 0 with gate 0), then
    one batched [1, K] x [K, d] product per token: the gate weighting and the sum in one GEMM."""
    K, S = perm.fanout, num_tokens * perm.fanout
    rows_N = torch.arange(len(perm.slot_N), device=y_Nd.device)
    src_S = torch.zeros(S, dtype=torch.long, device=y_Nd.device).index_copy_(0, perm.slot_N, rows_N)
    gate_S = perm.gate_N.new_zeros(S).index_copy(0, perm.slot_N, perm.gate_N)
    y_TKd = _GatherRows.apply(y_Nd, src_S, perm.slot_N).view(num_tokens, K, -1)
    return torch.bmm(gate_S.view(num_tokens, 1, K).to(y_Nd.dtype), y_TKd).squeeze(1)
