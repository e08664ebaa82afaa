"""Balancing and stability losses of one router group (all unweighted; the layer weights them).

Shape legend: T tokens of the group, E experts of the group.
"""

from __future__ import annotations

import torch


def routing_probs(logits_TE: torch.Tensor, score: str) -> torch.Tensor:
    """A distribution over experts per token (sigmoid scores are normalised to sum to 1)."""
    if score == "softmax":
        return torch.softmax(logits_TE, dim=-1)
    s_TE = torch.sigmoid(logits_TE)
    return s_TE / s_TE.sum(-1, keepdim=True).clamp_min(1e-20)


def load_balance_loss(probs_TE: torch.Tensor, chosen_TE: torch.Tensor) -> torch.Tensor:
    """Switch / GShard: E * sum_e f_e * P_e, with f_e the fraction of selections that chose e
    (before capacity dropping) and P_e the mean routing probability of e. 1 when balanced."""
    E = probs_TE.shape[1]
    f_E = chosen_TE.float().sum(0) / chosen_TE.float().sum().clamp_min(1)
    return E * (f_E * probs_TE.mean(0)).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE: mean squared logsumexp of the router logits."""
    return torch.logsumexp(logits_TE, dim=-1).pow(2).mean()


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-20))).sum(-1)


def local_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """LIMoE local entropy: mean per-token routing entropy (minimised: confident routing)."""
    return entropy(probs_TE).mean()


def global_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """LIMoE global entropy: entropy of the mean routing distribution (maximised: balance)."""
    return entropy(probs_TE.mean(0))
