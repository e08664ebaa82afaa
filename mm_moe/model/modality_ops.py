"""Mixture-of-Transformers building blocks: one copy of a weight per modality.

Each token uses its own modality's copy; attention itself stays global over the sequence.
Shape legend: B batch, S sequence, T tokens, M modalities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mm_moe.model.mlp import SwiGLU
from mm_moe.model.norms import HeadLayerNorm, RMSNorm


class TokenIndex:
    """Where each modality's tokens sit among the flattened B*S tokens: all of them (MoT's
    per-modality weights), the valid ones (MoMa's expert groups) and every valid token (a
    mixed group), each in token order.

    Computed on first use, for every layer of the forward at once, with one host sync (the
    sizes, which fix the shapes of everything routed by group); a forward that needs none of
    it (dense) makes none. Counts are scatter-adds, not bincount (which syncs on CUDA)."""

    def __init__(self, modality_ids_BS, valid_BS, num_modalities: int):
        self.modality_ids_BS, self.valid_BS = modality_ids_BS, valid_BS
        self.num_modalities = num_modalities
        self._done = False
        # Expert parallelism (set from outside, `share_sizes`): the sizes of every process
        # that exchanges tokens with this one, gathered before the one host sync.
        self._gather = None
        self._peer = 0
        self._peer_valid: list[list[int]] | None = None

    def share_sizes(self, gather, peer: int) -> None:
        """Every peer's group sizes (`peer_sizes`), by `gather`: a collective that maps this
        process's [K] int64 sizes to every peer's [peers, K] (all-gather), and this process's
        row in it. Every peer must ask in the same forwards. Before the first use, the
        gathered sizes come in the forward's one host sync; after it, in one more."""
        if self._gather is not None:
            return
        self._gather, self._peer = gather, peer
        if self._done:  # computed already (MoT's rows): the sizes the host has, gathered
            # [valid_M, all_M] as `compute` gathers them: the collective's size must not
            # depend on which of the two a peer took.
            sizes = torch.tensor(self.valid_M + self.all_M, device=self.modality_ids_BS.device)
            self._peer_valid = [row[: self.num_modalities] for row in gather(sizes).tolist()]

    def compute(self) -> None:
        """Now (before compiled code that must not break on the sync); idempotent."""
        if self._done:
            return
        M = self.num_modalities
        modality_T = self.modality_ids_BS.reshape(-1)
        valid_T = self.valid_BS.reshape(-1) if self.valid_BS is not None else None
        if valid_T is None:
            valid_T = torch.ones_like(modality_T, dtype=torch.bool)
        ones_T = torch.ones_like(modality_T)
        # Stable sorts keep token order within each modality (expert choice breaks ties, and
        # capacity-limited token choice drops, in token order).
        self.by_modality_T = torch.argsort(modality_T, stable=True)
        group_key_T = torch.where(valid_T, modality_T, M)  # invalid tokens sort last
        self.by_group_T = torch.argsort(group_key_T, stable=True)
        self.valid_first_T = torch.argsort((~valid_T).to(torch.int8), stable=True)
        all_M = modality_T.new_zeros(M).scatter_add_(0, modality_T, ones_T)
        valid_M = modality_T.new_zeros(M + 1).scatter_add_(0, group_key_T, ones_T)
        sizes_K = torch.cat([valid_M[:M], all_M])
        if self._gather is None:
            sizes = sizes_K.tolist()  # the forward's one host sync
        else:
            peers = self._gather(sizes_K).tolist()  # the same one sync, every peer's sizes
            self._peer_valid = [row[:M] for row in peers]
            sizes = peers[self._peer]
        self.valid_M, self.all_M = sizes[:M], sizes[M:]
        self.starts_M = [sum(self.valid_M[:m]) for m in range(M)]
        self._rows_M = tuple(self.by_modality_T.split(self.all_M))
        self._done = True

    @property
    def rows_M(self) -> tuple[torch.Tensor, ...]:
        """Per modality, the positions of its tokens (padding included)."""
        self.compute()
        return self._rows_M

    def peer_sizes(self, modalities: tuple[int, ...]) -> list[int]:
        """The valid tokens of these modalities (one, or all) on each peer (`share_sizes`),
        in peer order; without peers, this process's alone."""
        self.compute()
        peers = self._peer_valid if self._peer_valid is not None else [self.valid_M]
        return [sum(valid_M[m] for m in modalities) for valid_M in peers]

    def group(self, modalities: tuple[int, ...]) -> tuple[torch.Tensor, int]:
        """(positions, count) of the valid tokens of these modalities (one, or all)."""
        self.compute()
        if len(modalities) == 1:
            (m,) = modalities
            start, n = self.starts_M[m], self.valid_M[m]
            return self.by_group_T[start : start + n], n
        assert sorted(modalities) == list(range(self.num_modalities)), modalities
        n = sum(self.valid_M)
        return self.valid_first_T[:n], n


class ModalityRows:
    """Which of the flattened B*S tokens hold each modality: computed once per forward (by the
    forward's `TokenIndex`, in its one host sync) and shared by every per-modality op of
    every layer. Without untied parts nothing needs the rows (`split` false, no sync)."""

    def __init__(self, modality_ids_BS: torch.Tensor, split: bool = False, index=None):
        self.modality_ids_BS, self.split, self.index = modality_ids_BS, split, index

    @classmethod
    def of(cls, modality_ids_BS: torch.Tensor, num_modalities: int, split: bool) -> ModalityRows:
        index = TokenIndex(modality_ids_BS, None, num_modalities) if split else None
        return cls(modality_ids_BS, split, index)

    @property
    def rows_M(self) -> tuple[torch.Tensor, ...] | None:
        return self.index.rows_M if self.split else None


class Linear(nn.Linear):
    """nn.Linear that accepts (and ignores) the modality rows, so tied and untied projections
    are called the same way."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor, rows: ModalityRows | None = None) -> torch.Tensor:
        return super().forward(x)


class Norm(RMSNorm):
    def forward(self, x: torch.Tensor, rows: ModalityRows | None = None) -> torch.Tensor:
        return super().forward(x)


def _by_modality(x: torch.Tensor, rows: ModalityRows, fn):
    """Apply fn(m, rows of modality m) to the rows of x ([B, S, ...]) of each modality."""
    assert rows.rows_M is not None, "ModalityRows.of(..., split=True) for untied parts"
    lead = rows.modality_ids_BS.shape
    x_T = x.reshape(lead.numel(), *x.shape[len(lead) :])
    out = None
    for m, idx in enumerate(rows.rows_M):
        y = fn(m, x_T.index_select(0, idx))
        if out is None:
            out = y.new_empty(x_T.shape[0], *y.shape[1:])
        out = out.index_copy(0, idx, y)
    return out.reshape(*lead, *out.shape[1:])


class ModalityLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, num_modalities: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_modalities, out_features, in_features))
        for w in self.weight:
            nn.init.kaiming_uniform_(w, a=5**0.5)

    def forward(self, x: torch.Tensor, rows: ModalityRows) -> torch.Tensor:
        return _by_modality(x, rows, lambda m, r: r @ self.weight[m].t())


class ModalityNorm(nn.Module):
    """RMSNorm with one weight per modality."""

    def __init__(self, dim: int, num_modalities: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_modalities, dim))

    def forward(self, x: torch.Tensor, rows: ModalityRows) -> torch.Tensor:
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight.float()[rows.modality_ids_BS]  # [B, S, dim]
        while w.dim() < normed.dim():  # per-head norms: [B, S, H, D]
            w = w.unsqueeze(-2)
        return (normed * w).type_as(x)


class HeadNorm(HeadLayerNorm):
    """HeadLayerNorm that accepts (and ignores) the modality rows."""

    def forward(self, x: torch.Tensor, rows: ModalityRows | None = None) -> torch.Tensor:
        return super().forward(x)


class ModalityHeadLayerNorm(nn.Module):
    """Chameleon's per-head LayerNorm with one weight and bias per modality ([M, heads, D])."""

    def __init__(self, heads: int, head_dim: int, num_modalities: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_modalities, heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(num_modalities, heads, head_dim))

    def forward(self, x: torch.Tensor, rows: ModalityRows) -> torch.Tensor:
        normed = F.layer_norm(x.float(), x.shape[-1:], eps=HeadLayerNorm.eps)
        m = rows.modality_ids_BS  # x: [B, S, heads, D]
        return (normed * self.weight.float()[m] + self.bias.float()[m]).type_as(x)


class ModalityFFN(nn.Module):
    """One SwiGLU per modality."""

    def __init__(self, d_model: int, hidden: int, num_modalities: int):
        super().__init__()
        self.experts = nn.ModuleList(SwiGLU(d_model, hidden) for _ in range(num_modalities))

    def forward(self, x_BSd: torch.Tensor, rows: ModalityRows) -> torch.Tensor:
        return _by_modality(x_BSd, rows, lambda m, r: self.experts[m](r))


# Every norm module (plain and per modality): their weights start at one (biases at zero) and
# get no weight decay.
NORMS = (RMSNorm, HeadLayerNorm, ModalityNorm, ModalityHeadLayerNorm)
