"""The early-fusion decoder: one causal transformer over text ids, image codes and specials.

Shape legend: B batch, S sequence, d model width, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from mm_moe.errors import UserError
from mm_moe.modality import NUM_MODALITIES
from mm_moe.model.attention_mask import (
    AttentionMask,
    after_cached,
    check_backend,
    resolve_backend,
)
from mm_moe.model.block import TransformerBlock
from mm_moe.model.context import ForwardContext
from mm_moe.model.kv_cache import KVCache
from mm_moe.model.mod import MoDBlock
from mm_moe.model.modality_ops import NORMS, ModalityNorm, ModalityRows, Norm
from mm_moe.model.moe.layer import MoELayer
from mm_moe.model.rope import RotaryEmbedding


@dataclass
class ModelOutput:
    # [B, S, V]; None under `return_hidden` (training computes the loss in chunks from
    # `hidden` and the output layer's weight: model/losses.py, chunked_lm_losses).
    logits: torch.Tensor | None
    # Auxiliary losses (already weighted) that the block layers return with their output.
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    # The auxiliary routers' losses (weighted), kept apart: see ForwardContext.
    aux_router_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    # Detached routing statistics per layer and modality (expert load, dropped fraction...).
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    # [B, S, d] after the final norm, the output layer's input (only under `return_hidden`).
    hidden: torch.Tensor | None = None


class EarlyFusionDecoder(nn.Module):
    # Routing statistics (ModelOutput.stats) in the forward: None collects them in training
    # mode only (evaluation and sampling skip them); the trainer sets it for each step, on for
    # the steps it logs (trainer/hooks.py). FLOPs' pair and token counts are always there.
    collect_stats: bool | None = None

    def __init__(self, cfg, moe):
        super().__init__()
        self.cfg, self.moe_cfg = cfg, moe
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        layers = []
        for i in range(cfg.n_layers):
            block = TransformerBlock(cfg, self.rope, moe if moe.is_moe_layer(i) else None, i)
            if i in cfg.mod.layers:
                block = MoDBlock(block, cfg.mod, cfg.d_model, i)
            layers.append(block)
        self.layers = nn.ModuleList(layers)
        # Under model.untie=[norms] (MoT) the final norm is per modality too: `norm.weight`
        # is [modalities, d] (checkpoint/compat.py loads older [d] ones).
        self.norm = (
            ModalityNorm(cfg.d_model, NUM_MODALITIES, cfg.norm_eps)
            if "norms" in cfg.untie
            else Norm(cfg.d_model, cfg.norm_eps)
        )
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        # Norm weights keep their ones, per-modality copies ([M, dim]) included.
        norms = {id(p) for m in self.modules() if isinstance(m, NORMS) for p in m.parameters()}
        for name, p in self.named_parameters():
            if p.dim() < 2 or id(p) in norms:
                continue
            # Output projections of each residual branch scaled down with depth (GPT-2 / OLMo):
            # dense, per-modality and stacked expert ones alike, so variants start comparable.
            scale = (
                1 / math.sqrt(2 * self.cfg.n_layers)
                if name.endswith(("w_o.weight", "w_down.weight", "experts.w_down"))
                else 1
            )
            nn.init.trunc_normal_(p, std=std * scale, a=-3 * std, b=3 * std)
        for module in self.modules():
            if isinstance(module, MoELayer):
                module.init_routers(std)

    def set_vocab(self, vocab) -> None:
        """The vocabulary the model was trained on: with it, a forward without modality ids
        derives them from the ids (image codes are image tokens, everything else text)."""
        mask_V = vocab.image_id_mask()
        if len(mask_V) < self.cfg.vocab_size:
            mask_V = torch.cat([mask_V, mask_V.new_zeros(self.cfg.vocab_size - len(mask_V))])
        self.register_buffer("image_id_mask_V", mask_V, persistent=False)
        self.vocab = vocab

    def forward(
        self,
        input_ids: torch.Tensor,
        modality_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> ModelOutput:
        """All [B, S]. modality_ids: None derives them from the vocabulary (`set_vocab`; all
        text without one). doc_ids: the document of each position in a packed row (None: one
        document per row, plain causal attention). token_mask: tokens that compete for expert
        capacity and MoD slots (the loss mask in training; None is all tokens). Positions, when
        given, must be below model.max_seq_len (not checked here: no host sync per forward).
        kv_cache: incremental decoding (eval mode, one document per row, no MoD layers): the
        ids continue the positions the cache holds, and their keys and values join it.
        return_hidden: the final-normed hidden states instead of the logits (never [B, S, V]:
        the training loss applies `lm_head.weight` in chunks)."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:  # shapes: no host sync
            raise UserError(
                f"input_ids must be [batch, sequence] token ids with at least one token, got "
                f"shape {tuple(input_ids.shape)} (one sequence: ids[None])"
            )
        _check_per_token(
            input_ids,
            modality_ids=modality_ids,
            doc_ids=doc_ids,
            position_ids=position_ids,
            token_mask=token_mask,
        )
        input_ids_BS = input_ids
        S = input_ids_BS.shape[1]
        past = kv_cache.length if kv_cache is not None else 0
        ctx = self._context(input_ids_BS, modality_ids, doc_ids, position_ids, token_mask, kv_cache)
        h_BSd = self.embed(input_ids_BS)
        for layer in self.layers:
            h_BSd = layer(h_BSd, ctx)
        if kv_cache is not None:
            kv_cache.length = past + S
        h_BSd = self.norm(h_BSd, ctx.rows)
        if return_hidden:
            return ModelOutput(None, ctx.aux_losses, ctx.aux_router_losses, ctx.stats, h_BSd)
        logits_BSV = self.lm_head(h_BSd)
        return ModelOutput(logits_BSV, ctx.aux_losses, ctx.aux_router_losses, ctx.stats)

    def _modality_ids(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        """[B, S] modality of each id, derived from the vocabulary (`set_vocab`); all text
        without one."""
        if hasattr(self, "image_id_mask_V"):
            return self.image_id_mask_V[input_ids_BS].long()
        return torch.zeros_like(input_ids_BS)

    def _positions(self, input_ids_BS: torch.Tensor, past: int) -> torch.Tensor:
        """[B, S] positions continuing the `past` cached ones."""
        B, S = input_ids_BS.shape
        if self.cfg.max_seq_len < past + S:
            raise UserError(f"{past + S} positions exceed model.max_seq_len={self.cfg.max_seq_len}")
        return torch.arange(past, past + S, device=input_ids_BS.device).expand(B, S)

    def _attention_mask(self, doc_ids_BS, backend, kv_cache: KVCache | None, S: int, device):
        if kv_cache is None:
            return AttentionMask.build(doc_ids_BS, backend)
        assert doc_ids_BS is None and not self.training, "a KV cache decodes in eval mode"
        if self.cfg.mod.layers:  # see kv_cache.py
            raise UserError("models with mixture-of-depths layers decode without a KV cache")
        return after_cached(kv_cache.length, S, device)

    def _context(
        self, input_ids_BS, modality_ids, doc_ids, position_ids, token_mask, kv_cache
    ) -> ForwardContext:
        """The per-forward state every layer reads (see `forward` for the arguments)."""
        device = input_ids_BS.device
        if modality_ids is None:
            modality_ids = self._modality_ids(input_ids_BS)
        if position_ids is None:
            past = kv_cache.length if kv_cache is not None else 0
            position_ids = self._positions(input_ids_BS, past)
        doc_ids_BS = doc_ids if self.cfg.document_masking else None
        backend = resolve_backend(self.cfg.attention, device)
        check_backend(backend, device, torch.is_grad_enabled() and self.training)
        attn_mask = self._attention_mask(
            doc_ids_BS, backend, kv_cache, input_ids_BS.shape[1], device
        )
        return ForwardContext(
            modality_ids_BS=modality_ids,
            position_ids_BS=position_ids,
            doc_ids_BS=doc_ids_BS,
            attn_mask=attn_mask,
            valid_BS=token_mask.bool()
            if token_mask is not None
            else torch.ones_like(input_ids_BS, dtype=torch.bool),
            rows=ModalityRows.of(modality_ids, NUM_MODALITIES, bool(self.cfg.untie)),
            backend=backend,
            kv_cache=kv_cache,
            collect_stats=self.training if self.collect_stats is None else self.collect_stats,
        )


def _check_per_token(input_ids_BS: torch.Tensor, **given: torch.Tensor | None) -> None:
    """Each per-token argument given has input_ids' [batch, sequence] shape and its dtype kind
    (integer ids, a bool token_mask): their shapes and dtypes only, no host sync."""
    for name, t in given.items():
        if t is None:
            continue
        shape, want = tuple(t.shape), tuple(input_ids_BS.shape)
        if shape != want:
            raise UserError(
                f"{name} must have input_ids' [batch, sequence] shape {want}, got {shape}"
            )
        ok = t.dtype == torch.bool if name == "token_mask" else not t.is_floating_point()
        if not ok or t.is_complex():
            kind = "bool" if name == "token_mask" else "an integer dtype (torch.long)"
            raise UserError(f"{name} must be {kind}, got {t.dtype}")
