"""Sort-based token permutation (megablocks' indices_and_bins, without a one-hot tensor).

Shape legend: T tokens, d width, N selected (token, expert) pairs, E experts, K pairs per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Permutation:
    order_N: torch.Tensor  # pairs sorted by expert: pair order_N[i] goes to row i
    token_idx_N: torch.Tensor  # token of each sorted row
    gate_N: torch.Tensor  # gate of each sorted row
    counts_E: torch.Tensor  # rows per expert (int64, on the tokens' device)
    # When every routed token has exactly K pairs (dropless token choice): the slot
    # token * K + j of each sorted row, and per slot the row it holds (src_TK) and whether it
    # holds one (present_TK; unrouted tokens, e.g. padding, have empty slots that read row 0).
    # Token outputs and input gradients are then sums over K slots, not scatter-adds.
    slot_N: torch.Tensor | None = None
    src_TK: torch.Tensor | None = None
    present_TK: torch.Tensor | None = None


def sort_by_expert(
    token_idx_N: torch.Tensor,
    expert_idx_N: torch.Tensor,
    gate_N: torch.Tensor,
    num_experts: int,
    slot_N: torch.Tensor | None = None,
    num_tokens: int = 0,
    fanout: int = 0,
) -> Permutation:
    """Sort -> histogram -> (cumsum later, by the GEMM): rows grouped by expert, in order.
    The histogram is a scatter-add: bincount reads the input's max on CUDA (a host sync)."""
    order_N = torch.argsort(expert_idx_N, stable=True)
    counts_E = expert_idx_N.new_zeros(num_experts).scatter_add_(
        0, expert_idx_N, torch.ones_like(expert_idx_N)
    )
    perm = Permutation(order_N, token_idx_N[order_N], gate_N[order_N], counts_E)
    if slot_N is not None and len(slot_N):
        perm.slot_N = slot_N[order_N]
        S = num_tokens * fanout
        rows_N = torch.arange(len(order_N), device=order_N.device)
        src_S = torch.zeros(S, dtype=torch.long, device=order_N.device)
        perm.src_TK = src_S.index_copy_(0, perm.slot_N, rows_N).view(num_tokens, fanout)
        present_S = torch.zeros(S, dtype=torch.float32, device=order_N.device)
        perm.present_TK = present_S.index_fill_(0, perm.slot_N, 1.0).view(num_tokens, fanout)
    return perm


def _slot_sum(rows_Nd: torch.Tensor, src_TK: torch.Tensor, weight_TK: torch.Tensor):
    """out[t] = sum_j weight[t, j] * rows[src[t, j]]: a fused gather and weighted sum (no
    [T, K, d] intermediate)."""
    return F.embedding_bag(
        src_TK, rows_Nd, per_sample_weights=weight_TK.to(rows_Nd.dtype), mode="sum"
    )


class _PermuteRows(torch.autograd.Function):
    """rows = x[token of each row]; the backward sums each token's K row gradients."""

    @staticmethod
    def forward(ctx, x_Td, token_idx_N, src_TK, present_TK):
        ctx.save_for_backward(src_TK, present_TK)
        return x_Td.index_select(0, token_idx_N)

    @staticmethod
    def backward(ctx, grad_Nd):
        src_TK, present_TK = ctx.saved_tensors
        return _slot_sum(grad_Nd.contiguous(), src_TK, present_TK), None, None, None


def permute(x_Td: torch.Tensor, perm: Permutation) -> torch.Tensor:
    if perm.src_TK is not None:
        return _PermuteRows.apply(x_Td, perm.token_idx_N, perm.src_TK, perm.present_TK)
    return x_Td.index_select(0, perm.token_idx_N)


class _CombineSlots(torch.autograd.Function):
    """out[t] = sum_j gate[t, j] * y[row of slot (t, j)] (empty slots have gate 0). The
    backward gathers each row's token gradient once: no scatter-add."""

    @staticmethod
    def forward(ctx, y_Nd, gate_N, slot_N, src_TK, token_idx_N):
        gate_S = gate_N.new_zeros(src_TK.numel()).index_copy(0, slot_N, gate_N)
        ctx.save_for_backward(y_Nd, gate_N, token_idx_N)
        return _slot_sum(y_Nd, src_TK, gate_S.view(src_TK.shape))

    @staticmethod
    def backward(ctx, grad_Td):
        y_Nd, gate_N, token_idx_N = ctx.saved_tensors
        grad_rows_Nd = grad_Td.index_select(0, token_idx_N)
        grad_gate_N = None
        if ctx.needs_input_grad[1]:
            # Row-wise dots as [1, d] x [d, 1] products: no [N, d] temporary (vecdot makes one).
            dot_N11 = torch.bmm(grad_rows_Nd.unsqueeze(1), y_Nd.unsqueeze(2))
            grad_gate_N = dot_N11.view(-1).to(gate_N.dtype)
        grad_rows_Nd.mul_(gate_N.unsqueeze(1).to(grad_rows_Nd.dtype))
        return grad_rows_Nd, grad_gate_N, None, None, None


def unpermute(y_Nd: torch.Tensor, perm: Permutation, num_tokens: int) -> torch.Tensor:
    """Weight each expert output by its gate and sum the outputs of every token."""
    if perm.src_TK is not None:
        return _CombineSlots.apply(y_Nd, perm.gate_N, perm.slot_N, perm.src_TK, perm.token_idx_N)
    weighted_Nd = y_Nd * perm.gate_N.unsqueeze(1).to(y_Nd.dtype)
    out_Td = y_Nd.new_zeros(num_tokens, y_Nd.shape[1])
    return out_Td.index_add(0, perm.token_idx_N, weighted_Nd)
