"""Grouped-query self-attention with QK-norm, RoPE and document masking; projections and
QK-norms optionally untied per modality (MoT), attention itself global.

Shape legend: B batch, S sequence, H query heads, K key/value heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mm_moe.modality import NUM_MODALITIES
from mm_moe.model.modality_ops import Linear, ModalityLinear, ModalityNorm, Norm
from mm_moe.model.rope import RotaryEmbedding


def document_causal_mask(doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] boolean mask: position i sees j iff j <= i and both lie in one document."""
    seq_len = doc_ids_BS.shape[1]
    causal_SS = torch.ones(seq_len, seq_len, dtype=torch.bool, device=doc_ids_BS.device).tril()
    same_doc_BSS = doc_ids_BS.unsqueeze(2) == doc_ids_BS.unsqueeze(1)
    return (same_doc_BSS & causal_SS).unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, cfg, rope: RotaryEmbedding):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d, hd = cfg.d_model, cfg.head_dim

        def proj(i, o):
            return (
                ModalityLinear(i, o, NUM_MODALITIES) if "attention" in cfg.untie else Linear(i, o)
            )

        self.w_q = proj(d, cfg.n_heads * hd)
        self.w_k = proj(d, cfg.n_kv_heads * hd)
        self.w_v = proj(d, cfg.n_kv_heads * hd)
        self.w_o = proj(cfg.n_heads * hd, d)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            untied = "norms" in cfg.untie
            self.q_norm = (
                ModalityNorm(hd, NUM_MODALITIES, cfg.norm_eps) if untied else Norm(hd, cfg.norm_eps)
            )
            self.k_norm = (
                ModalityNorm(hd, NUM_MODALITIES, cfg.norm_eps) if untied else Norm(hd, cfg.norm_eps)
            )
        self.rope = rope

    def forward(
        self,
        x_BSd: torch.Tensor,
        modality_BS: torch.Tensor,
        position_ids_BS: torch.Tensor,
        mask_B1SS: torch.Tensor | None,
    ) -> torch.Tensor:
        B, S, _ = x_BSd.shape
        q_BSHD = self.w_q(x_BSd, modality_BS).view(B, S, self.n_heads, self.head_dim)
        k_BSKD = self.w_k(x_BSd, modality_BS).view(B, S, self.n_kv_heads, self.head_dim)
        v_BSKD = self.w_v(x_BSd, modality_BS).view(B, S, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q_BSHD, k_BSKD = self.q_norm(q_BSHD, modality_BS), self.k_norm(k_BSKD, modality_BS)
        q_BHSD = self.rope(q_BSHD.transpose(1, 2), position_ids_BS)
        k_BKSD = self.rope(k_BSKD.transpose(1, 2), position_ids_BS)
        v_BKSD = v_BSKD.transpose(1, 2)
        repeat = self.n_heads // self.n_kv_heads
        if repeat > 1:
            k_BKSD = k_BKSD.repeat_interleave(repeat, dim=1)
            v_BKSD = v_BKSD.repeat_interleave(repeat, dim=1)
        if mask_B1SS is None:
            out_BHSD = F.scaled_dot_product_attention(q_BHSD, k_BKSD, v_BKSD, is_causal=True)
        else:
            out_BHSD = F.scaled_dot_product_attention(q_BHSD, k_BKSD, v_BKSD, attn_mask=mask_B1SS)
        return self.w_o(out_BHSD.transpose(1, 2).reshape(B, S, -1), modality_BS)
