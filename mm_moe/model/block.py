"""One transformer block: attention and FFN, each on the residual stream."""

from __future__ import annotations

from torch import nn

from mm_moe.model.attention import Attention
from mm_moe.model.mlp import SwiGLU
from mm_moe.model.norms import RMSNorm
from mm_moe.model.rope import RotaryEmbedding


class TransformerBlock(nn.Module):
    def __init__(self, cfg, rope: RotaryEmbedding):
        super().__init__()
        self.post_norm = cfg.norm_placement == "post"
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, rope)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_dim)

    def forward(self, x_BSd, modality_ids_BS, position_ids_BS, mask_B1SS):
        # modality_ids_BS is unused by the dense block; MoE and MoT blocks route on it.
        del modality_ids_BS
        if self.post_norm:
            h_BSd = x_BSd + self.attn_norm(self.attn(x_BSd, position_ids_BS, mask_B1SS))
            return h_BSd + self.ffn_norm(self.ffn(h_BSd))
        h_BSd = x_BSd + self.attn(self.attn_norm(x_BSd), position_ids_BS, mask_B1SS)
        return h_BSd + self.ffn(self.ffn_norm(h_BSd))
