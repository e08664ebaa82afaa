"""Grouped-query self-attention with QK-norm, RoPE and document masking; projections and
QK-norms optionally untied per modality (MoT), attention itself global.

The kernel is chosen once per micro-batch by the mask (attention_mask.py): SDPA's causal
(flash) path, SDPA with a dense document mask, or FlexAttention with a document BlockMask.
Grouped-query attention copies K and V per query head only where a kernel needs it: SDPA
with a dense document mask on CUDA (its memory-efficient kernel has no GQA; `sdpa_call` in
attention_mask.py); FlexAttention and SDPA's causal path take `enable_gqa=True`.

Shape legend: B batch, S sequence, H query heads, K key/value heads, D head dim.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from mm_moe.errors import UserError
from mm_moe.modality import NUM_MODALITIES
from mm_moe.model.attention_mask import AttentionMask, document_causal_mask, sdpa_call
from mm_moe.model.kv_cache import KVCache
from mm_moe.model.modality_ops import (
    HeadNorm,
    Linear,
    ModalityHeadLayerNorm,
    ModalityLinear,
    ModalityNorm,
    ModalityRows,
    Norm,
)
from mm_moe.model.rope import RotaryEmbedding

__all__ = ["Attention", "document_causal_mask"]


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # FlexAttention is fast only compiled (eager runs an unfused reference); compiled once
    # per process and shared by every layer, with static shapes, as torchtitan does (training
    # shapes are fixed; torch 2.13's CPU kernel also fails to build with dynamic shapes).
    return torch.compile(flex_attention, dynamic=False)


def attend(
    q_BHSD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor, mask: AttentionMask
) -> torch.Tensor:
    gqa = q_BHSD.shape[1] != k_BKSD.shape[1]
    if mask.kind == "block":
        S = q_BHSD.shape[2]
        pad = lambda t: F.pad(t, (0, 0, 0, mask.block_length - S)) if mask.block_length > S else t
        out_BHPD = _compiled_flex_attention()(
            pad(q_BHSD), pad(k_BKSD), pad(v_BKSD), block_mask=mask.block, enable_gqa=gqa
        )
        return out_BHPD[:, :, :S]
    how = sdpa_call(q_BHSD.device.type, mask.kind, gqa, q_BHSD.shape[-1])
    if how == "repeat_kv":  # for CUDA's memory-efficient kernel (sdpa_call says why)
        repeats = q_BHSD.shape[1] // k_BKSD.shape[1]
        k_BKSD = k_BKSD.repeat_interleave(repeats, dim=1)
        v_BKSD = v_BKSD.repeat_interleave(repeats, dim=1)
    call = functools.partial(
        F.scaled_dot_product_attention,
        q_BHSD,
        k_BKSD,
        v_BKSD,
        attn_mask=mask.dense_B1SS,
        is_causal=mask.kind == "causal",
        enable_gqa=how == "gqa",
    )
    if not _fast_kernels_only(q_BHSD.device.type, mask.kind):
        return call()
    try:
        with _no_math_kernel():
            return call()
    except RuntimeError as exc:
        if "No available kernel" not in str(exc):
            raise
        # A user-fixable choice, not a crash: the message, not the C++ traceback.
        raise UserError(
            "model.attention=sdpa with document masks on CUDA: no fast SDPA kernel takes "
            f"these inputs (head_dim={q_BHSD.shape[-1]}, {q_BHSD.dtype}) and the math kernel "
            "is refused ([B, H, S, S] fp32 scores); use model.attention=flex (or auto)"
        ) from exc


def _fast_kernels_only(device_type: str, mask_kind: str) -> bool:
    """Dense masks on CUDA: SDPA may take any kernel but the math one (an error, not a silent
    [B, H, S, S] fp32 score matrix)."""
    return device_type == "cuda" and mask_kind == "dense"


def _no_math_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
    return sdpa_kernel(fast)


def _qk_norm(cfg, heads: int) -> nn.Module | None:
    """model.qk_norm's norm over each head's [head_dim] (per modality under untie=[norms])."""
    kind, untied, hd = cfg.qk_norm_kind, "norms" in cfg.untie, cfg.head_dim
    if kind == "rms":
        return ModalityNorm(hd, NUM_MODALITIES, cfg.norm_eps) if untied else Norm(hd, cfg.norm_eps)
    if kind == "head_layernorm":
        return ModalityHeadLayerNorm(heads, hd, NUM_MODALITIES) if untied else HeadNorm(heads, hd)
    return None


class Attention(nn.Module):
    def __init__(self, cfg, rope: RotaryEmbedding, layer_index: int = 0):
        super().__init__()
        self.layer_index = layer_index  # its entry in a KVCache
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
        self.q_norm = _qk_norm(cfg, cfg.n_heads)
        self.k_norm = _qk_norm(cfg, cfg.n_kv_heads)
        self.rope = rope

    def forward(
        self,
        x_BSd: torch.Tensor,
        rows: ModalityRows,
        position_ids_BS: torch.Tensor,
        mask: AttentionMask,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, S, _ = x_BSd.shape
        q_BSHD = self.w_q(x_BSd, rows).view(B, S, self.n_heads, self.head_dim)
        k_BSKD = self.w_k(x_BSd, rows).view(B, S, self.n_kv_heads, self.head_dim)
        v_BSKD = self.w_v(x_BSd, rows).view(B, S, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q_BSHD, k_BSKD = self.q_norm(q_BSHD, rows), self.k_norm(k_BSKD, rows)
        q_BHSD = self.rope(q_BSHD.transpose(1, 2), position_ids_BS)
        k_BKSD = self.rope(k_BSKD.transpose(1, 2), position_ids_BS)
        v_BKSD = v_BSKD.transpose(1, 2)
        if kv_cache is not None:
            k_BKSD, v_BKSD = kv_cache.append(self.layer_index, k_BKSD, v_BKSD)
        out_BHSD = attend(q_BHSD, k_BKSD, v_BKSD, mask)
        return self.w_o(out_BHSD.transpose(1, 2).reshape(B, S, -1), rows)
