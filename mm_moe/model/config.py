"""Model configuration: builds the early-fusion decoder and counts its parameters and FLOPs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mm_moe.modality import MODALITIES


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
    # QK-norm: Chameleon needs it for stable mixed-modal training.
    qk_norm: bool = True
    # pre: x + f(norm(x)); post: res-post-norm x + norm(f(x)) (Swin-V2 / Chameleon).
    norm_placement: Literal["pre", "post"] = "pre"
    tie_embeddings: bool = False
    # Coefficient of the z-loss on the output logits (PaLM / Chameleon: 1e-5); 0 turns it off.
    z_loss: float = 0.0
    # Block-diagonal causal attention over documents packed into one sequence.
    document_masking: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} must be a multiple of "
                f"model.n_kv_heads={self.n_kv_heads} (grouped-query attention)"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"head dim model.d_model/model.n_heads={self.d_model // self.n_heads} "
                "must be even for rotary embeddings"
            )
        if self.vocab_size < 0 or self.ffn_hidden < 0 or self.z_loss < 0:
            raise ValueError("model.vocab_size, model.ffn_hidden and model.z_loss must be >= 0")

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
            raise ValueError(
                f"model.vocab_size={self.vocab_size} is smaller than the data's vocabulary "
                f"({data_vocab_size} ids); set model.vocab_size=0 to take it from the data"
            )
        from dataclasses import replace

        return replace(self, vocab_size=self.vocab_size or data_vocab_size)

    def build(self):
        from mm_moe.model.decoder import EarlyFusionDecoder

        assert self.vocab_size > 0, "resolve vocab_size with with_vocab() before build()"
        return EarlyFusionDecoder(self)

    # ---- counting (analytic, checked against the built model in tests) ----
    def _block_matmul_params(self) -> int:
        d, hd = self.d_model, self.head_dim
        attn = d * self.n_heads * hd + 2 * d * self.n_kv_heads * hd + self.n_heads * hd * d
        return attn + 3 * d * self.ffn_dim

    def _block_params(self) -> int:
        norms = 2 * self.d_model + (2 * self.head_dim if self.qk_norm else 0)
        return self._block_matmul_params() + norms

    def num_params(self) -> dict:
        """Total and active (per-token) parameters, overall and per modality.

        A dense model activates every parameter for every token; MoE configs override the
        per-modality active counts.
        """
        embed = self.vocab_size * self.d_model
        head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        total = embed + head + self.n_layers * self._block_params() + self.d_model
        return {
            "total": total,
            "embedding": embed,
            "active": {m: total for m in MODALITIES},
        }

    def flops_per_token(self, seq_len: int) -> dict:
        """Training FLOPs per token (forward + backward = 3x forward), per modality.

        Forward: 2 FLOPs per multiply-accumulate of every active matmul weight (the embedding
        lookup is free, the output layer is not) plus causal attention scores and values:
        2 * 2 * seq_len/2 * d per layer on average over positions.
        """
        d = self.d_model
        matmul = self.n_layers * self._block_matmul_params() + self.vocab_size * d
        attention = 2 * self.n_layers * seq_len * self.n_heads * self.head_dim
        forward = 2 * matmul + attention
        return {m: 3 * forward for m in MODALITIES}
