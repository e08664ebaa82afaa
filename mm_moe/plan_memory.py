"""Activation and output-layer memory of one micro-batch, for `mm_moe.plan`.

Per token and layer, the values saved for backward (elements), measured on CPU with a
saved-tensor hook over dense blocks of several widths (tests/unit/test_plan.py checks the
formula against that measurement):
- attention: 6 d + 4.5 kv (kv = n_kv_heads x head_dim): norm input, projections' input,
  q/k before and after QK-norm, RoPE tables, v, the kernel's output and its copy for w_o;
- the rest of the block: 6 d + 4.75 f for a SwiGLU FFN of width f (norm input and output,
  w1/w3 outputs, SiLU, product, residual); an MoE layer keeps per routed copy of a token the
  permuted input and output (2 d) and its expert's SwiGLU (4.75 h), plus the router's fp32
  logits and scores per expert of the group, each group's gathered tokens (2 d); expert
  choice keeps about 6 d more for its selection over the batch, and its auxiliary routers'
  hidden layer (3 x aux_router_hidden).
On GPU (bf16) each element is 2 bytes, and the two norms keep fp32 inputs (8 d bytes).

`trainer.activation_checkpointing` (parallel/checkpointing.py): `full` keeps each block's
input and recomputes one block at a time in backward; `selective` keeps the rest and
recomputes one attention at a time.

The loss (model/losses.py) runs the output layer in chunks of LOSS_CHUNK_TOKENS tokens:
fp32 logits and softmax and their bf16 gradient for one chunk at a time, and one fp32
logsumexp per token kept. Unchunked (before), the bf16 logits, their fp32 copy and the
log-softmax (10 V bytes per token) were kept, and as much again in backward.
"""

from __future__ import annotations

from mm_moe.model.losses import LOSS_CHUNK_TOKENS

ATTENTION_D, ATTENTION_KV = 6.0, 4.5
REST_D, SWIGLU_F = 6.0, 4.75
MOE_GROUP_D, EXPERT_CHOICE_D = 2.0, 6.0


def layer_elements(model, moe, index: int) -> tuple[float, float]:
    """(attention, rest of the block) elements saved per token of layer `index`."""
    d = model.d_model
    attention = ATTENTION_D * d + ATTENTION_KV * model.n_kv_heads * model.head_dim
    if moe.enabled and moe.is_moe_layer(index):
        h = model.ffn_dim // moe.granularity
        copies = moe.expected_experts_per_token()
        experts = max(g.num_experts for g in moe.groups())
        ffn = copies * (2 * d + SWIGLU_F * h) + moe.shared_experts * SWIGLU_F * h + 2 * experts
        ffn += MOE_GROUP_D * d  # each group's tokens gathered and scattered back
        if moe.router == "expert_choice":  # selection over the batch, auxiliary routers
            ffn += EXPERT_CHOICE_D * d + 3 * moe.aux_router_hidden + 2 * experts
    else:
        ffn = SWIGLU_F * model.ffn_dim
    rest = REST_D * d + ffn
    if index in model.mod.layers:  # the block runs on the selected share of the tokens
        attention, rest = attention * model.mod.capacity, rest * model.mod.capacity + 2 * d
    return attention, rest


def activation_bytes(
    model,
    moe,
    tokens: int,
    mode: str,
    element_bytes: int = 2,
    fp32_norms: bool = True,
    peak: bool = True,
) -> float:
    """Bytes kept for backward by the decoder blocks of one micro-batch of `tokens`, at the
    peak of backward (one recomputed block or attention on top of what is kept; `peak=False`:
    what the forward leaves kept)."""
    extra = 8 * model.d_model if fp32_norms else 0
    layers = [layer_elements(model, moe, i) for i in range(model.n_layers)]
    per_layer = [(a * element_bytes, r * element_bytes + extra) for a, r in layers]
    if mode == "none":
        kept, recomputed = sum(a + r for a, r in per_layer), 0.0
    elif mode == "selective":
        # the attention's input is among `rest` (the norm input of the block)
        kept, recomputed = sum(r for _, r in per_layer), max(a for a, _ in per_layer)
    elif mode == "full":
        kept = model.n_layers * model.d_model * element_bytes
        recomputed = max(a + r for a, r in per_layer)
    else:
        raise ValueError(f"activation checkpointing mode {mode!r}")
    return tokens * kept + (tokens * recomputed if peak else 0.0)


def logits_bytes(model, tokens: int, chunked: bool = True) -> float:
    """The output layer and loss: saved and transient, at the peak."""
    V = model.vocab_size
    if not chunked:  # bf16 logits, fp32 copy, log-softmax kept; gradients as large
        return 2 * 10 * V * tokens
    chunk = min(tokens, LOSS_CHUNK_TOKENS)
    # fp32 logits and softmax and their bf16 gradient for one chunk, the output layer's
    # weight gradient summed in fp32; logsumexp and final hidden states (bf16) of every token
    return chunk * V * 10 + 4 * V * model.d_model + tokens * (4 + 2 * model.d_model)
