"""Mixture-of-depths (Raposo et al. 2024): on chosen layers a router sends the top
capacity x S tokens of each sequence through the block; the rest skip it along the residual.

The top-k over a sequence is not causal, so an auxiliary router (MoMa 2.4) learns to predict
the selection from the token alone and makes it in eval mode.

Shape legend: B batch, S sequence, K selected slots per sequence, d width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mm_moe.modality import NUM_MODALITIES
from mm_moe.model.attention_mask import AttentionMask
from mm_moe.model.context import ForwardContext
from mm_moe.model.modality_ops import ModalityRows
from mm_moe.model.moe.aux_router import AuxRouter

if TYPE_CHECKING:  # annotations only: the config's one import path is its config.py
    from mm_moe.model.config import MoDConfig


# Slot counts an inference forward of length S may take: its longest row's selection rounded up
# to a multiple of S / EVAL_SLOT_SIZES. A compiled block then meets a few shapes, not one per
# count (Dynamo recompiles for each new one, and past its limit runs FlexAttention unfused).
EVAL_SLOT_SIZES = 8


def eval_slots(selected: int, S: int) -> int:
    """K for an inference forward whose longest row selects `selected` of its S positions."""
    step = -(-S // EVAL_SLOT_SIZES)
    return min(S, max(1, -(-selected // step)) * step)


class MoDBlock(nn.Module):
    # Its keys exist only for the tokens its router took, a different set per row: sampling
    # decodes without a KV cache (kv_cache.supports_kv_cache).
    breaks_kv_cache = True

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
        # Masked means over the valid tokens (a boolean index would sync the host).
        if self.training and self.cfg.aux_router_coef > 0:
            loss = AuxRouter.loss(aux_logits_BS, selected_BS, valid_BS)
            ctx.add_aux_router_loss("mod/aux_router_bce", self.cfg.aux_router_coef * loss)
        if ctx.collect_stats:
            acc, baseline = AuxRouter.accuracy(aux_logits_BS, selected_BS, valid_BS)
            prefix = f"mod/l{self.layer_index}"
            ctx.add_stat(f"{prefix}/aux_router_acc", acc)
            ctx.add_stat(f"{prefix}/aux_router_baseline", baseline)
            ctx.add_stat(f"{prefix}/selected", selected_BS.sum() / valid_BS.sum().clamp_min(1))

        # Selected positions first, in their original order (stable sort), padded to K slots
        # with invalid ones. Training selects at most k per row: K = k, a static shape (no
        # host sync); at inference the auxiliary router's count decides (the longest row,
        # rounded up: `eval_slots`).
        # At least one slot keeps every rank's stats aligned.
        counts_B = selected_BS.sum(1)
        if self.training:
            K = max(1, int(self.cfg.capacity * S))
        else:
            K = eval_slots(int(counts_B.max()), S)
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
            rows=ModalityRows.of(modality_BK, NUM_MODALITIES, ctx.rows.split),
            backend=ctx.backend,
            collect_stats=ctx.collect_stats,
        )
        y_BKd = self.block(x_BKd, sub)
        gate_BK = torch.sigmoid(gather(scores_BS)) * slot_ok_BK
        delta_BKd = (y_BKd - x_BKd) * gate_BK.unsqueeze(-1).to(x_BKd.dtype)
        return x_BSd.scatter_add(1, idx_BK.unsqueeze(-1).expand(B, K, d), delta_BKd)
