"""Which keys each query sees, built once per micro-batch and shared by every layer.

Packed rows hold several documents; a token attends causally within its own document. Three
forms, by backend and batch:

- `causal`: no mask at all, `scaled_dot_product_attention(is_causal=True)`, which keeps the
  flash kernel: rows that each hold one document (the caller passes no document ids), or
  `model.document_masking=false`;
- `dense` (SDPA): a [B, 1, S, S] boolean mask;
- `block` (FlexAttention): a document-causal `BlockMask`, which skips whole blocks of keys
  outside the query's document and never materialises [S, S].

`model.attention=auto` takes FlexAttention on CUDA and SDPA elsewhere: torch's CPU
FlexAttention has no backward ("FlexAttention does not support backward on CPU").

Shape legend: B batch, S sequence.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from mm_moe.errors import UserError

Backend = Literal["sdpa", "flex"]
# How SDPA is called: `gqa` passes K/V heads as they are (enable_gqa=True), `repeat_kv` copies
# them per query head first, `plain` has as many K/V heads as query heads.
SdpaCall = Literal["gqa", "repeat_kv", "plain"]
_BLOCK = 128  # FlexAttention's default block size


def resolve_backend(attention: str, device: torch.device) -> Backend:
    """`model.attention` (auto | flex | sdpa) on this device."""
    if attention == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return attention  # type: ignore[return-value]


def document_causal_mask(doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] boolean mask: position i sees j iff j <= i and both lie in one document."""
    seq_len = doc_ids_BS.shape[1]
    causal_SS = torch.ones(seq_len, seq_len, dtype=torch.bool, device=doc_ids_BS.device).tril()
    same_doc_BSS = doc_ids_BS.unsqueeze(2) == doc_ids_BS.unsqueeze(1)
    return (same_doc_BSS & causal_SS).unsqueeze(1)


@functools.cache
def _compiled_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    # Compiled, as torchtitan does: eager block-mask creation evaluates the mask over [S, S].
    return torch.compile(create_block_mask)


def flex_length(seq_len: int, device: torch.device) -> int:
    """The sequence length FlexAttention runs at. torch 2.13's compiled CPU kernel returns
    wrong values (or NaN) for some lengths that are not multiples of 16 (40, 72, 120 among
    those checked), so CPU inputs are padded to a multiple of 16 (padding is its own
    document, and the output is cut back)."""
    return -(-seq_len // 16) * 16 if device.type == "cpu" else seq_len


def document_block_mask(doc_ids_BS: torch.Tensor, length: int):
    """FlexAttention `BlockMask` of the same document-causal pattern, over `length` >= S
    positions (the positions past S form a document of their own)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, S = doc_ids_BS.shape
    # mask_mod is evaluated over whole blocks, also past `length`: pad the document ids to a
    # whole number of blocks, so that no index reads outside them.
    blocks = -(-length // _BLOCK) * _BLOCK
    doc_BP = F.pad(doc_ids_BS, (0, blocks - S), value=-1)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (doc_BP[b, q_idx] == doc_BP[b, kv_idx])

    build = _compiled_create_block_mask() if doc_ids_BS.is_cuda else create_block_mask
    return build(mask_mod, B, None, length, length, device=doc_ids_BS.device)


@dataclass
class AttentionMask:
    kind: Literal["causal", "dense", "block"]
    dense_B1SS: torch.Tensor | None = None
    block: object | None = None  # torch.nn.attention.flex_attention.BlockMask
    block_length: int = 0  # the (padded) length the BlockMask covers

    @classmethod
    def build(cls, doc_ids_BS: torch.Tensor | None, backend: Backend) -> AttentionMask:
        """None document ids: plain causal attention (one document per row)."""
        if doc_ids_BS is None:
            return cls("causal")
        if backend == "flex":
            length = flex_length(doc_ids_BS.shape[1], doc_ids_BS.device)
            return cls("block", block=document_block_mask(doc_ids_BS, length), block_length=length)
        return cls("dense", dense_B1SS=document_causal_mask(doc_ids_BS))


def after_cached(past: int, S: int, device: torch.device) -> AttentionMask:
    """S new positions after `past` cached ones (one document): causal among the new ones,
    every cached key visible. SDPA forms only: decoding steps are short."""
    if past == 0:
        return AttentionMask("causal")
    if S == 1:
        return AttentionMask("dense")  # no mask: the one query sees every key
    keys_SL = torch.ones(S, past + S, dtype=torch.bool, device=device).tril(past)
    return AttentionMask("dense", dense_B1SS=keys_SL[None, None])


def sdpa_call(device_type: str, mask_kind: str, gqa: bool, head_dim: int) -> SdpaCall:
    """How SDPA runs a mask of `mask_kind` on `device_type`, never through CUDA's math kernel.

    On CUDA the flash kernel takes no mask, and the memory-efficient kernel, the one that
    takes a dense document mask, has no grouped-query attention: SDPA with a mask and
    `enable_gqa=True` falls to the math kernel, which materialises [B, H, S, S] fp32 scores
    (out of memory at 4096). So dense masks on CUDA repeat K/V per query head (the
    memory-efficient kernel then runs), and a head_dim that kernel cannot take (not a multiple
    of 8) is refused. The causal form keeps the flash kernel with GQA; CPU kernels take both."""
    if device_type == "cuda" and mask_kind == "dense":
        if head_dim % 8:
            raise UserError(
                f"model.attention=sdpa with document masks on CUDA needs a head_dim that is a "
                f"multiple of 8 for the memory-efficient kernel (head_dim={head_dim}); use "
                "model.attention=flex (or auto), which skips masked blocks"
            )
        return "repeat_kv" if gqa else "plain"
    return "gqa" if gqa else "plain"


def check_backend(backend: Backend, device: torch.device, training: bool) -> None:
    if backend == "flex" and device.type == "cpu" and training:
        raise UserError(
            "model.attention=flex cannot train on CPU: torch's CPU FlexAttention has no "
            "backward. Use model.attention=auto (SDPA on CPU) or sdpa"
        )
