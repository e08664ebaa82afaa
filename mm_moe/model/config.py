"""Model configuration: builds the early-fusion decoder and counts its parameters and FLOPs."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from mm_moe.errors import UserError
from mm_moe.modality import MODALITIES, NUM_MODALITIES
from mm_moe.model.moe.config import MoEConfig, refuse_repeated_layers


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
        refuse_repeated_layers("model.mod.layers", self.layers)
        defaults = MoDConfig.__dataclass_fields__
        inert = [
            f"model.mod.{name}={getattr(self, name)}"
            for name in ("capacity", "aux_router_hidden", "aux_router_coef")
            if getattr(self, name) != defaults[name].default
        ]
        if inert and not self.layers:
            raise UserError(
                f"{', '.join(inert)} has no effect with model.mod.layers=[] (no layer is routed "
                "by mixture-of-depths): list the routed layers, e.g. model.mod.layers=[1,3], or "
                "drop the key"
            )


@dataclass
class ModelConfig:
    """Early-fusion decoder-only transformer over one unified text+image vocabulary."""

    # 0 takes the size of the data's unified vocabulary; a larger value leaves room for more ids.
    vocab_size: int = 0
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    # Grouped-query attention: n_heads must be a multiple of n_kv_heads.
    n_kv_heads: int = 2
    # SwiGLU hidden size; 0 derives 8/3 * d_model rounded up to `ffn_multiple_of` (Llama rule).
    ffn_hidden: int = 0
    ffn_multiple_of: int = 64
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    norm_eps: float = 1e-5
    # QK-norm: Chameleon needs it for stable mixed-modal training. true (or rms): RMSNorm over
    # the head dim, one weight shared by the heads; head_layernorm: Chameleon's LayerNorm over
    # the head dim with a weight and bias per head (eps 1e-5); false: none.
    qk_norm: bool | Literal["rms", "head_layernorm"] = True
    # pre: x + f(norm(x)); post: res-post-norm x + norm(f(x)) (Swin-V2 / Chameleon).
    norm_placement: Literal["pre", "post"] = "pre"
    tie_embeddings: bool = False
    # Coefficient of the z-loss on the output logits (PaLM / Chameleon: 1e-5); 0 turns it off.
    z_loss: float = 0.0
    # Block-diagonal causal attention over documents packed into one sequence.
    document_masking: bool = True
    # Attention kernel: flex (FlexAttention with a document BlockMask), sdpa (a dense
    # document mask; the flash path when rows hold one document), auto (flex on CUDA, sdpa
    # on CPU, where FlexAttention has no backward).
    attention: Literal["auto", "flex", "sdpa"] = "auto"
    init_std: float = 0.02
    # Mixture-of-Transformers: parts with one copy per modality (ffn, attention projections,
    # norms); self-attention stays global.
    untie: list[Literal["ffn", "attention", "norms"]] = field(default_factory=list)
    # Mixture-of-depths on chosen layers.
    mod: MoDConfig = field(default_factory=MoDConfig)

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise UserError(
                f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}"
            )
        if self.n_heads % self.n_kv_heads:
            raise UserError(
                f"model.n_heads={self.n_heads} must be a multiple of "
                f"model.n_kv_heads={self.n_kv_heads} (grouped-query attention)"
            )
        if (self.d_model // self.n_heads) % 2:
            raise UserError(
                f"head dim model.d_model/model.n_heads={self.d_model // self.n_heads} "
                "must be even for rotary embeddings"
            )
        if self.vocab_size < 0 or self.ffn_hidden < 0 or self.z_loss < 0:
            raise UserError("model.vocab_size, model.ffn_hidden and model.z_loss must be >= 0")
        bad = [i for i in self.mod.layers if i >= self.n_layers]
        if bad:
            raise UserError(f"model.mod.layers {bad} exceed model.n_layers={self.n_layers}")

    @property
    def qk_norm_kind(self) -> str:
        """none | rms | head_layernorm."""
        if self.qk_norm is True:
            return "rms"
        return self.qk_norm or "none"

    def _qk_norm_params(self) -> int:
        if self.qk_norm_kind == "rms":
            return 2 * self.head_dim
        if self.qk_norm_kind == "head_layernorm":  # weight and bias per head, q and k
            return 2 * (self.n_heads + self.n_kv_heads) * self.head_dim
        return 0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        hidden = int(8 * self.d_model / 3)
        return -(-hidden // self.ffn_multiple_of) * self.ffn_multiple_of

    def with_vocab(self, data_vocab_size: int) -> ModelConfig:
        """This config with `vocab_size` resolved against the data's vocabulary."""
        if self.vocab_size and self.vocab_size < data_vocab_size:
            raise UserError(
                f"model.vocab_size={self.vocab_size} is smaller than the data's vocabulary "
                f"({data_vocab_size} ids); set model.vocab_size=0 to take it from the data"
            )
        return replace(self, vocab_size=self.vocab_size or data_vocab_size)

    def check_moe(self, moe: MoEConfig) -> None:
        bad = [i for i in (moe.layers if moe.layers != "all" else []) if i >= self.n_layers]
        if bad:
            raise UserError(f"moe.layers {bad} exceed model.n_layers={self.n_layers}")
        if moe.enabled and self.ffn_dim % moe.granularity:
            raise UserError(
                f"moe.granularity={moe.granularity} must divide the FFN hidden size "
                f"{self.ffn_dim} (model.ffn_hidden)"
            )
        every_layer_moe = all(moe.is_moe_layer(i) for i in range(self.n_layers))
        if "ffn" in self.untie and every_layer_moe:
            raise UserError(_untie_ffn_message(moe))

    def build(self, moe: MoEConfig | None = None):
        from mm_moe.model.decoder import EarlyFusionDecoder

        assert self.vocab_size > 0, "resolve vocab_size with with_vocab() before build()"
        moe = moe or MoEConfig()
        self.check_moe(moe)
        return EarlyFusionDecoder(self, moe)

    # ---- counting (analytic; tests check it against the built model and a FLOP counter) ----
    def _attention_params(self) -> int:
        d, hd = self.d_model, self.head_dim
        return d * self.n_heads * hd + 2 * d * self.n_kv_heads * hd + self.n_heads * hd * d

    def _layer_counts(self, index: int, moe: MoEConfig) -> dict:
        """Parameters of one block: total, and active per token of each modality."""
        d, f, M = self.d_model, self.ffn_dim, NUM_MODALITIES
        copies = lambda part: M if part in self.untie else 1
        attn = self._attention_params()
        norms = 2 * d + self._qk_norm_params()
        total = attn * copies("attention") + norms * copies("norms")
        active = {m: attn + norms for m in MODALITIES}
        if moe.is_moe_layer(index):
            h = f // moe.granularity
            expert = 3 * d * h
            shared = moe.shared_experts * expert
            for group in moe.groups():
                n = group.num_experts
                aux = (
                    (
                        d * moe.aux_router_hidden
                        + moe.aux_router_hidden
                        + moe.aux_router_hidden * n
                        + n
                    )
                    if moe.router == "expert_choice"
                    else 0
                )
                total += d * n + n * expert + (shared if shared else 0) + aux
                for mi in group.modalities:
                    m = MODALITIES[mi]
                    ffn_active = d * n + moe.expected_experts_per_token() * expert + shared
                    active[m] += ffn_active + aux
        else:
            ffn = 3 * d * f
            total += ffn * copies("ffn")
            for m in MODALITIES:
                active[m] += ffn
        if index in self.mod.layers:
            hid = self.mod.aux_router_hidden
            router = d + d * hid + hid + hid + 1
            c = self.mod.capacity
            total += router
            for m in MODALITIES:
                active[m] = c * active[m] + router
        return {"total": total, "active": active}

    def num_params(self, moe: MoEConfig | None = None) -> dict:
        """Total parameters, and parameters active per token of each modality (expected over
        routing: expert-choice capacity, mixture-of-depths capacity)."""
        moe = moe or MoEConfig()
        embed = self.vocab_size * self.d_model
        head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        final_norm = self.d_model * (NUM_MODALITIES if "norms" in self.untie else 1)
        outer = embed + head + final_norm
        layers = [self._layer_counts(i, moe) for i in range(self.n_layers)]
        return {
            "total": outer + sum(layer["total"] for layer in layers),
            "embedding": embed,
            "active": {m: outer + sum(layer["active"][m] for layer in layers) for m in MODALITIES},
        }

    def flops_per_token(
        self, seq_len: int, moe: MoEConfig | None = None, attention: str = "causal"
    ) -> dict:
        """Training FLOPs per token (forward + backward), per modality: every matmul of the
        attention (projections and, over `seq_len`, causal scores and values), the active
        experts, shared experts, routers and auxiliary routers, mixture-of-depths capacity and
        the output layer. mm_moe/model/flops.py documents the count; `flops_breakdown` there
        gives forward and backward by part."""
        from mm_moe.model.flops import training_flops_per_token

        return training_flops_per_token(self, moe or MoEConfig(), seq_len, attention)


def _untie_ffn_message(moe: MoEConfig) -> str:
    """Why model.untie=[ffn] changes nothing when every layer's FFN is an MoE layer: it gives
    per-modality copies to dense FFNs only (model/block.py), and there are none."""
    if "mixed" in moe.experts_per_modality:
        groups = (
            "whose one 'mixed' expert group is shared by the modalities; for experts per "
            "modality use MoMa groups (moe.experts_per_modality.text=N "
            "moe.experts_per_modality.image=N, e.g. moe=moma_4t4i_ec)"
        )
    else:
        groups = "whose expert groups are already per modality (MoMa)"
    return (
        "model.untie=[ffn] has no effect: it gives the dense layers' FFNs per-modality copies, "
        f"and every layer's FFN is an MoE layer (moe.layers={moe.layers}) {groups}. Drop ffn "
        "from model.untie, or list the MoE layers in moe.layers so that the others stay "
        "dense and get per-modality FFNs"
    )
