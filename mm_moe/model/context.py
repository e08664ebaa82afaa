"""What one forward pass carries through the layers, and what the layers hand back.

A new context is made per forward call, so aux losses and statistics travel with the output and
nothing is kept in module globals.

Shape legend: B batch, S sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mm_moe.modality import NUM_MODALITIES
from mm_moe.model.attention_mask import AttentionMask, Backend
from mm_moe.model.kv_cache import KVCache
from mm_moe.model.modality_ops import ModalityRows, TokenIndex


@dataclass
class ForwardContext:
    modality_ids_BS: torch.Tensor
    position_ids_BS: torch.Tensor
    doc_ids_BS: torch.Tensor | None
    # Which keys each query sees (built once, shared by every layer).
    attn_mask: AttentionMask
    # Tokens that compete for expert capacity and MoD slots (false: padding, no loss).
    valid_BS: torch.Tensor
    # Rows of each modality, for MoT's per-modality projections (computed once).
    rows: ModalityRows | None = None
    # sdpa | flex: how masks of sub-sequences (mixture-of-depths) are built.
    backend: Backend = "sdpa"
    # Incremental decoding: attention appends this forward's keys and values (kv_cache.py).
    kv_cache: KVCache | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    # The auxiliary routers' losses: their gradients reach only the auxiliary routers (inputs
    # are detached), which training steps apart from the model (parallel/aux_router_optim.py).
    aux_router_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    # Routing statistics in this forward (the trainer turns them on for the steps it logs):
    # off, the layers compute only the host-side counts (pairs, tokens) that FLOPs need.
    collect_stats: bool = True
    # Positions of each modality group's tokens, for every layer (one host sync, first use).
    tokens: TokenIndex | None = None
    # Tensors every layer of this forward shares, made by the first layer that needs them.
    cache: dict = field(default_factory=dict)

    def add_loss(self, name: str, value: torch.Tensor) -> None:
        self.aux_losses[name] = self.aux_losses[name] + value if name in self.aux_losses else value

    def add_aux_router_loss(self, name: str, value: torch.Tensor) -> None:
        losses = self.aux_router_losses
        losses[name] = losses[name] + value if name in losses else value

    def add_stat(self, name: str, value: torch.Tensor | float) -> None:
        """A statistic: a device tensor (stays there until the logged step fetches them all in
        one copy), or a number the host knows (a CPU scalar, made without a host-data copy)."""
        if isinstance(value, torch.Tensor):
            self.stats[name] = value.detach().float()
        else:
            self.stats[name] = torch.full((), float(value))

    @classmethod
    def for_layer(
        cls, modality_ids_BS: torch.Tensor, valid_BS: torch.Tensor | None = None
    ) -> ForwardContext:
        """A context for running one layer on its own (tests, benchmarks): one document per
        row, positions 0..S-1, every token valid unless `valid_BS` says otherwise."""
        B, S = modality_ids_BS.shape
        device = modality_ids_BS.device
        return cls(
            modality_ids_BS=modality_ids_BS,
            position_ids_BS=torch.arange(S, device=device).expand(B, S),
            doc_ids_BS=None,
            attn_mask=AttentionMask("causal"),
            valid_BS=torch.ones(B, S, dtype=torch.bool, device=device)
            if valid_BS is None
            else valid_BS,
        )

    def __post_init__(self) -> None:
        if self.tokens is None:
            self.tokens = TokenIndex(self.modality_ids_BS, self.valid_BS, NUM_MODALITIES)
        if self.rows is None:
            self.rows = ModalityRows(self.modality_ids_BS)
        elif self.rows.split and self.rows.modality_ids_BS is self.modality_ids_BS:
            self.rows.index = self.tokens  # MoT's rows and the expert groups: one sync
        if self.rows.split:
            # Now, outside the blocks: whole MoT blocks compile with fullgraph=True.
            self.rows.index.compute()
