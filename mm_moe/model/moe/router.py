"""Routing: which (token, expert) pairs are computed, and with which gate.

Shape legend: T tokens of one group, E experts of the group, K experts per token, C tokens per
expert, N selected (token, expert) pairs. All router math is fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Routing:
    token_idx_N: torch.Tensor  # index into the group's tokens
    expert_idx_N: torch.Tensor  # expert within the group
    gate_N: torch.Tensor  # fp32 weight of the expert's output
    # [T, E] bool: the selection before capacity dropping (for balance losses / aux routers)
    chosen_TE: torch.Tensor
    # Scalar: pairs dropped by token-choice capacity; None where it is the share of tokens no
    # expert took (expert choice), computed from chosen_TE only when statistics are collected.
    dropped_fraction: torch.Tensor | None
    # Expert choice in training: every expert took exactly this many tokens, and the pairs
    # are expert-major (static shapes the host knows); None otherwise.
    capacity: int | None = None


def scores_from_logits(logits_TE: torch.Tensor, score: str) -> torch.Tensor:
    return torch.sigmoid(logits_TE) if score == "sigmoid" else torch.softmax(logits_TE, dim=-1)


def logistic_noise_like(x: torch.Tensor) -> torch.Tensor:
    """Difference of two Gumbels: Gumbel-sigmoid noise for the logits."""
    u = torch.rand_like(x).clamp_(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float, k: int) -> int:
    """Tokens each expert takes under expert choice: capacity_factor * k * T / E rounded down,
    at least 1 (a group with fewer tokens than experts still has every token processed, as
    the auxiliary routers may route it at inference) and at most T."""
    return min(
        num_tokens, max(1, math.floor(_per_expert(num_tokens, num_experts, capacity_factor, k)))
    )


def _per_expert(num_tokens: int, num_experts: int, capacity_factor: float, k: int) -> float:
    """capacity_factor * k * T / E, nudged off the float error that would take an exact
    integer one below (0.7 * 180 / 2 is 62.99999999999999) or one above when rounded."""
    x = capacity_factor * k * num_tokens / num_experts
    nearest = round(x)
    return float(nearest) if abs(x - nearest) < 1e-9 * max(1.0, x) else x


def expert_choice(
    scores_TE: torch.Tensor, select_TE: torch.Tensor, capacity: int, normalize: bool = False
) -> Routing:
    """Each expert takes its top-`capacity` tokens by `select_TE`; gates are `scores_TE`,
    or with `normalize` those divided by their sum over the experts that took the token.
    The pairs come expert-major (expert e's C tokens at rows e*C..e*C+C-1): static shapes,
    already sorted by expert."""
    T, E = scores_TE.shape
    _, token_idx_EC = torch.topk(select_TE.t(), capacity, dim=1, sorted=False)
    expert_idx_EC = torch.arange(E, device=scores_TE.device).unsqueeze(1).expand(E, capacity)
    gate_EC = scores_TE.t().gather(1, token_idx_EC)
    if normalize:
        sum_T = scores_TE.new_zeros(T).index_add(0, token_idx_EC.reshape(-1), gate_EC.reshape(-1))
        gate_EC = gate_EC / sum_T[token_idx_EC].clamp_min(1e-20)
    chosen_ET = torch.zeros(E, T, dtype=torch.bool, device=scores_TE.device)
    chosen_ET.scatter_(1, token_idx_EC, True)
    return Routing(
        token_idx_EC.reshape(-1),
        expert_idx_EC.reshape(-1),
        gate_EC.reshape(-1),
        chosen_ET.t(),
        None,
        capacity,
    )


def unprocessed_fraction(chosen_TE: torch.Tensor) -> torch.Tensor:
    """Share of the tokens that no expert took."""
    if not len(chosen_TE):
        return chosen_TE.new_zeros((), dtype=torch.float32)
    return (~chosen_TE.any(1)).float().mean()


def from_mask(scores_TE: torch.Tensor, chosen_TE: torch.Tensor) -> Routing:
    """Routing for an explicit selection mask (auxiliary-router inference; data-dependent
    shapes: a host sync, in eval only)."""
    token_idx_N, expert_idx_N = chosen_TE.nonzero(as_tuple=True)
    return Routing(token_idx_N, expert_idx_N, scores_TE[token_idx_N, expert_idx_N], chosen_TE, None)


def renormalized(gate_TK: torch.Tensor, straight_through: bool) -> torch.Tensor:
    """A token's gates over its k experts divided by their sum. With k = 1 that is 1 whatever
    the score, with zero gradient; `straight_through` keeps the value 1 and passes the
    score's gradient (1 + p - sg(p)), so the router learns from the model's loss."""
    if gate_TK.shape[1] == 1 and straight_through:
        return 1.0 + (gate_TK - gate_TK.detach())
    return gate_TK / gate_TK.sum(1, keepdim=True).clamp_min(1e-20)


def token_choice(
    scores_TE: torch.Tensor,
    select_TE: torch.Tensor,
    k: int,
    renormalize: bool,
    capacity: int | None,
    straight_through: bool = True,
) -> Routing:
    """Each token takes its top-k experts by `select_TE`; beyond `capacity` tokens per expert,
    later tokens are dropped (first come, first served). capacity None is dropless.
    straight_through: see `renormalized`."""
    T, E = scores_TE.shape
    _, expert_idx_TK = torch.topk(select_TE, k, dim=1)
    gate_TK = scores_TE.gather(1, expert_idx_TK)
    if renormalize:
        gate_TK = renormalized(gate_TK, straight_through)
    chosen_TE = torch.zeros(T, E, dtype=torch.bool, device=scores_TE.device)
    chosen_TE.scatter_(1, expert_idx_TK, True)
    token_idx_N = torch.arange(T, device=scores_TE.device).repeat_interleave(k)
    expert_idx_N, gate_N = expert_idx_TK.reshape(-1), gate_TK.reshape(-1)
    dropped = scores_TE.new_zeros(())
    if capacity is not None and T:
        # Position of each pair among its expert's pairs, in token order (stable sort).
        order_N = torch.argsort(expert_idx_N, stable=True)
        counts_E = expert_idx_N.new_zeros(E).scatter_add_(
            0, expert_idx_N, torch.ones_like(expert_idx_N)
        )
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        rank_sorted = (
            torch.arange(len(order_N), device=order_N.device) - starts_E[expert_idx_N[order_N]]
        )
        rank_N = torch.empty_like(rank_sorted)
        rank_N[order_N] = rank_sorted
        keep_N = rank_N < capacity
        dropped = 1.0 - keep_N.float().mean()
        token_idx_N, expert_idx_N, gate_N = (
            token_idx_N[keep_N],
            expert_idx_N[keep_N],
            gate_N[keep_N],
        )
    return Routing(token_idx_N, expert_idx_N, gate_N, chosen_TE, dropped)


def token_capacity(num_tokens: int, num_experts: int, capacity_factor: float, k: int) -> int:
    """Token-choice capacity per expert: ceil(capacity_factor * k * T / E)."""
    return max(1, math.ceil(_per_expert(num_tokens, num_experts, capacity_factor, k)))
