"""Grouped-query self-attention with QK-norm, RoPE and document masking.

Shape legend: B batch, S sequence, H query heads, K key/value heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mm_moe.model.norms import RMSNorm
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
        self.w_q = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.w_k = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.w_v = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.w_o = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.rope = rope

    def forward(
        self,
        x_BSd: torch.Tensor,
        position_ids_BS: torch.Tensor,
        mask_B1SS: torch.Tensor | None,
    ) -> torch.Tensor:
        B, S, _ = x_BSd.shape
        q_BHSD = self.q_norm(self.w_q(x_BSd).view(B, S, self.n_heads, self.head_dim))
        q_BHSD = q_BHSD.transpose(1, 2)
        k_BKSD = self.k_norm(self.w_k(x_BSd).view(B, S, self.n_kv_heads, self.head_dim))
        k_BKSD = k_BKSD.transpose(1, 2)
        v_BKSD = self.w_v(x_BSd).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q_BHSD = self.rope(q_BHSD, position_ids_BS)
        k_BKSD = self.rope(k_BKSD, position_ids_BS)
        repeat = self.n_heads // self.n_kv_heads
        if repeat > 1:
            k_BKSD = k_BKSD.repeat_interleave(repeat, dim=1)
            v_BKSD = v_BKSD.repeat_interleave(repeat, dim=1)
        if mask_B1SS is None:
            out_BHSD = F.scaled_dot_product_attention(q_BHSD, k_BKSD, v_BKSD, is_causal=True)
        else:
            out_BHSD = F.scaled_dot_product_attention(q_BHSD, k_BKSD, v_BKSD, attn_mask=mask_B1SS)
        return self.w_o(out_BHSD.transpose(1, 2).reshape(B, S, -1))
