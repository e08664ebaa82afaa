"""One transformer block: attention and FFN, each on the residual stream.

The FFN is a dense SwiGLU, one SwiGLU per modality (MoT, model.untie=[ffn]), or an MoE layer
(MoMa / mixed); norms are optionally per modality (model.untie=[norms]).
"""

from __future__ import annotations

import torch
from torch import nn

from mm_moe.modality import NUM_MODALITIES
from mm_moe.model.attention import Attention
from mm_moe.model.context import ForwardContext
from mm_moe.model.mlp import SwiGLU
from mm_moe.model.modality_ops import ModalityFFN, ModalityNorm, Norm
from mm_moe.model.moe.layer import MoELayer
from mm_moe.model.rope import RotaryEmbedding


class TransformerBlock(nn.Module):
    def __init__(self, cfg, rope: RotaryEmbedding, moe=None, layer_index: int = 0):
        super().__init__()
        self.post_norm = cfg.norm_placement == "post"

        def norm():
            if "norms" in cfg.untie:
                return ModalityNorm(cfg.d_model, NUM_MODALITIES, cfg.norm_eps)
            return Norm(cfg.d_model, cfg.norm_eps)

        self.attn_norm = norm()
        self.attn = Attention(cfg, rope, layer_index)
        self.ffn_norm = norm()
        if moe is not None:
            self.ffn = MoELayer(moe, cfg.d_model, cfg.ffn_dim, layer_index)
        elif "ffn" in cfg.untie:
            self.ffn = ModalityFFN(cfg.d_model, cfg.ffn_dim, NUM_MODALITIES)
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.ffn_dim)

    def _ffn(self, x_BSd: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if isinstance(self.ffn, MoELayer):
            return self.ffn(x_BSd, ctx)
        if isinstance(self.ffn, ModalityFFN):
            return self.ffn(x_BSd, ctx.rows)
        return self.ffn(x_BSd)

    def forward(self, x_BSd: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        rows = ctx.rows
        attn = lambda h: self.attn(h, rows, ctx.position_ids_BS, ctx.attn_mask, ctx.kv_cache)
        if self.post_norm:
            h_BSd = x_BSd + self.attn_norm(attn(x_BSd), rows)
            return h_BSd + self.ffn_norm(self._ffn(h_BSd, ctx), rows)
        h_BSd = x_BSd + attn(self.attn_norm(x_BSd, rows))
        return h_BSd + self._ffn(self.ffn_norm(h_BSd, rows), ctx)
