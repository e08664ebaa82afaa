"""Mixture-of-depths (Raposo et al. 2024): on chosen layers a router sends the top
capacity x S tokens of each sequence through the block; the rest skip it along the residual.

The top-k over a sequence is not causal, so an auxiliary router (MoMa 2.4) learns to predict
the selection from the token alone and makes it in eval mode.

Shape legend: B batch, S sequence, K selected slots per sequence, d width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mm_moe.errors import UserError
from mm_moe.modality import NUM_MODALITIES
from mm_moe.model.attention_mask import AttentionMask
from mm_moe.model.context import ForwardContext
from mm_moe.model.modality_ops import ModalityRows
from mm_moe.model.moe.aux_router import AuxRouter


@dataclass
class MoDConfig:
    # Layers routed by mixture-of-depths; empty turns it off.
    layers: list[int] = field(default_factory=list)
    # Fraction of each sequence's tokens that go through a routed block.
    capacity: float = 0.5
    aux_router_hidden: int = 64
    aux_router_coef: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.capacity <= 1:
            raise UserError(f"model.mod.capacity={self.capacity} must be in (0, 1]")
        if any(i < 0 for i in self.layers):
            raise UserError(f"model.mod.layers={self.layers} must be layer indices >= 0")


class MoDBlock(nn.Module):
    def __init__(self, block: nn.Module, cfg: MoDConfig, d_model: int, layer_index: int):
        super().__init__()
        self.block, self.cfg, self.layer_index = block, cfg, layer_index
        self.router = nn.Linear(d_model, 1, bias=False)
        self.aux_router = AuxRouter(d_model, cfg.aux_router_hidden, 1)

    def _select(self, scores_BS: torch.Tensor, aux_logits_BS, valid_BS) -> torch.Tensor:
        if not self.training:
            return (aux_logits_BS > 0) & valid_BS
        S = scores_BS.shape[1]
        k = max(1, int(self.cfg.capacity * S))
        masked_BS = scores_BS.masked_fill(~valid_BS, float("-inf"))
        top_Bk = masked_BS.topk(k, dim=1).indices
        selected_BS = torch.zeros_like(valid_BS).scatter_(1, top_Bk, True)
        return selected_BS & valid_BS

    def forward(self, x_BSd: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, S, d = x_BSd.shape
        # fp32 logits from fp32 copies: a bf16 product would tie the top-k over the sequence.
        scores_BS = F.linear(x_BSd.float(), self.router.weight.float()).squeeze(-1)
        aux_logits_BS = self.aux_router(x_BSd.reshape(B * S, d)).view(B, S)
        valid_BS = ctx.valid_BS
        selected_BS = self._select(scores_BS, aux_logits_BS, valid_BS)
        loss, acc, baseline = AuxRouter.loss_and_accuracy(
            aux_logits_BS[valid_BS], selected_BS[valid_BS]
        )
        if self.training and self.cfg.aux_router_coef > 0:
            ctx.add_aux_router_loss("mod/aux_router_bce", self.cfg.aux_router_coef * loss)
        ctx.add_stat(f"mod/l{self.layer_index}/aux_router_acc", acc)
        ctx.add_stat(f"mod/l{self.layer_index}/aux_router_baseline", baseline)
        ctx.add_stat(
            f"mod/l{self.layer_index}/selected", selected_BS.sum() / valid_BS.sum().clamp_min(1)
        )

        # Selected positions first, in their original order (stable sort), padded to the
        # longest row with invalid slots. At least one slot keeps every rank's stats aligned.
        counts_B = selected_BS.sum(1)
        K = max(1, int(counts_B.max()))
        idx_BK = torch.argsort((~selected_BS).to(torch.int8), dim=1, stable=True)[:, :K]
        slot_ok_BK = torch.arange(K, device=x_BSd.device) < counts_B.unsqueeze(1)
        gather = lambda t: t.gather(1, idx_BK)
        x_BKd = x_BSd.gather(1, idx_BK.unsqueeze(-1).expand(B, K, d))
        doc_BK = gather(ctx.doc_ids_BS) if ctx.doc_ids_BS is not None else torch.zeros_like(idx_BK)
        doc_BK = torch.where(slot_ok_BK, doc_BK, -1)  # invalid slots see only each other
        modality_BK = gather(ctx.modality_ids_BS)
        sub = ForwardContext(
            modality_ids_BS=modality_BK,
            position_ids_BS=gather(ctx.position_ids_BS),
            doc_ids_BS=doc_BK,
            attn_mask=AttentionMask.build(doc_BK, ctx.backend),
            valid_BS=slot_ok_BK & gather(valid_BS),
            aux_losses=ctx.aux_losses,
            aux_router_losses=ctx.aux_router_losses,
            stats=ctx.stats,
            rows=ModalityRows.of(modality_BK, NUM_MODALITIES, ctx.rows.rows_M is not None),
            backend=ctx.backend,
        )
        y_BKd = self.block(x_BKd, sub)
        gate_BK = torch.sigmoid(gather(scores_BS)) * slot_ok_BK
        delta_BKd = (y_BKd - x_BKd) * gate_BK.unsqueeze(-1).to(x_BKd.dtype)
        return x_BSd.scatter_add(1, idx_BK.unsqueeze(-1).expand(B, K, d), delta_BKd)
