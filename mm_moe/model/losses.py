"""The language-modelling loss per token, shared by training and evaluation.

Shape legend: B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_token_losses(
    logits_BSV: torch.Tensor, targets_BS: torch.Tensor, z_loss: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-entropy per token in fp32, and logsumexp^2 (the z-loss term) when asked for."""
    logits_BSV = logits_BSV.float()
    ce_BS = F.cross_entropy(
        logits_BSV.flatten(0, 1), targets_BS.flatten(), reduction="none"
    ).view_as(targets_BS)
    z_BS = torch.logsumexp(logits_BSV, dim=-1).pow(2) if z_loss > 0 else None
    return ce_BS, z_BS


# Tokens per chunk of the chunked loss: [chunk, V] fp32 logits at a time (1024 x 73,736
# x 4 bytes = 0.3 GB) instead of [B, S, V] (16,384 tokens: 4.8 GB each for the fp32 copy and
# the log-softmax saved for backward, the bf16 logits besides).
LOSS_CHUNK_TOKENS = 1024


class _ChunkedLMHeadLoss(torch.autograd.Function):
    """Output layer and cross-entropy (+ logsumexp^2) over chunks of tokens: forward keeps
    only the logsumexp per token; backward recomputes each chunk's logits and takes the
    gradient of softmax cross-entropy in closed form, d ce / d logits = softmax - onehot,
    d lse^2 / d logits = 2 lse softmax. Rounding as the unchunked path: logits in the
    hidden states' dtype, then fp32; their gradient back in that dtype before the matmuls."""

    @staticmethod
    def forward(ctx, h_Nd, weight_Vd, targets_N, chunk: int):
        lse_N = h_Nd.new_empty(h_Nd.shape[0], dtype=torch.float32)
        target_logit_N = torch.empty_like(lse_N)
        for start in range(0, h_Nd.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits_CV = (h_Nd[rows] @ weight_Vd.t()).float()
            lse_N[rows] = torch.logsumexp(logits_CV, dim=-1)
            target_logit_N[rows] = logits_CV.gather(1, targets_N[rows, None]).squeeze(1)
        ctx.save_for_backward(h_Nd, weight_Vd, targets_N, lse_N)
        ctx.chunk = chunk
        return lse_N - target_logit_N, lse_N

    @staticmethod
    def backward(ctx, grad_ce_N, grad_lse_N):
        h_Nd, weight_Vd, targets_N, lse_N = ctx.saved_tensors
        grad_h_Nd = torch.empty_like(h_Nd) if ctx.needs_input_grad[0] else None
        grad_w_Vd = torch.zeros_like(weight_Vd, dtype=torch.float32)
        for start in range(0, h_Nd.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            logits_CV = (h_Nd[rows] @ weight_Vd.t()).float()
            probs_CV = torch.exp(logits_CV - lse_N[rows, None])
            g_ce_C = grad_ce_N[rows]
            # d ce / d lse = 1 (ce = lse - target logit), plus the caller's gradient of lse
            coef_C = g_ce_C + grad_lse_N[rows]
            grad_CV = probs_CV.mul_(coef_C[:, None])
            grad_CV.scatter_add_(1, targets_N[rows, None], -g_ce_C[:, None])
            grad_CV = grad_CV.to(h_Nd.dtype)
            if grad_h_Nd is not None:
                grad_h_Nd[rows] = grad_CV @ weight_Vd
            grad_w_Vd += (grad_CV.t() @ h_Nd[rows]).float()  # summed over chunks in fp32
        return grad_h_Nd, grad_w_Vd.to(weight_Vd.dtype), None, None


def chunked_lm_losses(
    h_BSd: torch.Tensor,
    weight_Vd: torch.Tensor,
    targets_BS: torch.Tensor,
    z_loss: float,
    chunk: int = LOSS_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`per_token_losses(h_BSd @ weight_Vd.T, targets_BS, z_loss)` (final-normed hidden states
    and the output layer's weight), never holding more than `chunk` tokens' fp32 logits: what
    is saved for backward is the hidden states and one fp32 number per token."""
    B, S, d = h_BSd.shape
    ce_N, lse_N = _ChunkedLMHeadLoss.apply(
        h_BSd.reshape(B * S, d), weight_Vd, targets_BS.reshape(B * S), chunk
    )
    z_BS = lse_N.pow(2).view(B, S) if z_loss > 0 else None
    return ce_N.view(B, S), z_BS
