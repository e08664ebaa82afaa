"""Routing-health statistics of one expert group: is the router still routing?

A collapsing expert-choice router shows as its experts' router rows aligning (they rank the
tokens alike), so the experts pick the same tokens (selection overlap), many tokens get no
expert and the ones that do get small gates. These are the numbers to watch; all are tensors
(no host sync), a few small reductions per layer and group.

Shape legend: T tokens of the group, E experts of the group, d width, N selected pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mm_moe.model.moe.router import Routing

NAMES = (
    "gate_mean",  # mean gate of the selected (token, expert) pairs
    "gate_sum",  # a processed token's gates summed over its experts, mean over such tokens
    "taken_0",  # share of the group's tokens that no expert processed
    "taken_1",  # ... exactly one expert
    "taken_2plus",  # ... two or more
    "router_cosine",  # mean cosine between the group's router rows, over pairs of experts
    "jaccard",  # mean selection overlap |A & B| / |A | B| over pairs of experts
    "logit_mean",
    "logit_std",
)


def _mean_off_diagonal(m_EE: torch.Tensor) -> torch.Tensor:
    E = m_EE.shape[0]
    if E < 2:
        return m_EE.new_zeros(())
    return (m_EE.sum() - m_EE.diagonal().sum()) / (E * (E - 1))


def router_cosine(weight_Ed: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine of the router rows: 1 when every expert ranks tokens alike."""
    rows_Ed = F.normalize(weight_Ed.detach().float(), dim=-1)
    return _mean_off_diagonal(rows_Ed @ rows_Ed.t())


def selection_jaccard(token_idx_N, expert_idx_N, T: int, E: int) -> torch.Tensor:
    """Mean over expert pairs of |tokens both took| / |tokens either took|."""
    chosen_TE = token_idx_N.new_zeros((T, E), dtype=torch.float32)
    ones_N = torch.ones_like(token_idx_N, dtype=torch.float32)  # not a host scalar: no copy
    chosen_TE.index_put_((token_idx_N, expert_idx_N), ones_N)
    both_EE = chosen_TE.t() @ chosen_TE
    size_E = both_EE.diagonal()
    either_EE = size_E[:, None] + size_E[None, :] - both_EE
    return _mean_off_diagonal(both_EE / either_EE.clamp_min(1.0))


def routing_health(
    logits_TE: torch.Tensor, routing: Routing, weight_Ed: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The NAMES statistics (fp32 scalars); zeros for a group without tokens, so every rank
    reports the same keys (its token count, zero, leaves them out of the step's means:
    moe/stat_means.py), except the router rows' cosine, which needs no tokens."""
    T, E = logits_TE.shape
    if T == 0:
        zero = logits_TE.new_zeros(())
        return {**{name: zero for name in NAMES}, "router_cosine": router_cosine(weight_Ed)}
    token_idx_N, gate_N = routing.token_idx_N, routing.gate_N.detach().float()
    # Scatter-adds, not bincount (which reads the input's max on CUDA: a host sync).
    zeros_T = gate_N.new_zeros(T)
    experts_T = zeros_T.index_add(0, token_idx_N, torch.ones_like(gate_N))
    gates_T = zeros_T.index_add(0, token_idx_N, gate_N)
    processed_T = experts_T > 0
    logits = logits_TE.detach().float()
    return {
        "gate_mean": gate_N.sum() / max(gate_N.numel(), 1),
        "gate_sum": gates_T.sum() / processed_T.sum().clamp_min(1),
        "taken_0": (~processed_T).float().mean(),
        "taken_1": (experts_T == 1).float().mean(),
        "taken_2plus": (experts_T >= 2).float().mean(),
        "router_cosine": router_cosine(weight_Ed),
        "jaccard": selection_jaccard(token_idx_N, routing.expert_idx_N, T, E),
        "logit_mean": logits.mean(),
        "logit_std": logits.std() if logits.numel() > 1 else logits.new_zeros(()),
    }
