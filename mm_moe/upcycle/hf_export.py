"""This project's models -> Hugging Face folders (`python -m mm_moe.export`): config.json,
sharded safetensors with their index, the tokenizer when the run used a published one, and
mm_moe's vocabulary layout (vocab.yaml and the tokenizer keys: recorded_vocab.py), which an
import of the folder reads back.

What maps exactly onto a transformers architecture:
- dense, pre-norm, no QK-norm: `llama`;
- dense with QK-norm as RMSNorm over the head dim (model.qk_norm=true, this project's default):
  `qwen3` (the same block, with q_norm / k_norm);
- dense with Chameleon's per-head LayerNorm QK-norm and Chameleon's vocabulary (image tokens
  inside it, its VQGAN as the image tokenizer): `chameleon` (swin_norm for post-norm);
- one `mixed` expert group, token choice, softmax scores, top-k renormalized, every layer, no
  shared experts: `mixtral`;
- the same with QK-norm as RMSNorm over the head dim: `qwen3_moe` (Qwen3-MoE), which may also
  keep the top-k unnormalized (`norm_topk_prob`) and some layers dense (`mlp_only_layers`).
Everything else is refused with the reason: modality-grouped experts (MoMa), per-modality
weights (MoT), expert choice and mixture-of-depths (they select over the batch and need the
auxiliary routers at inference) have no Hugging Face architecture.

Names are the hub's (Mixtral's experts as `block_sparse_moe.experts.<e>.w1/w2/w3`, Qwen3-MoE's
as `mlp.experts.<e>.gate_proj/up_proj/down_proj`, the layouts published checkpoints use).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from mm_moe.errors import UserError
from mm_moe.model.moe.layer import MoELayer

INDEX = "model.safetensors.index.json"


def _moe_mismatches(cfg, moe) -> list[str]:
    """`key=value (<architecture> needs value)` for every option that changes what the model
    computes in eval mode and that the MoE architecture it maps to cannot express. Both route
    by a softmax over one group's linear router logits, top-k, dropless, pre-norm; Mixtral
    (no QK-norm) also renormalizes the top-k and has an MoE FFN in every layer, Qwen3-MoE
    (RMSNorm QK-norm) says whether it renormalizes (`norm_topk_prob`) and which layers are
    dense (`mlp_only_layers`). Training-only options (noise, capacity, losses, router lr and
    init) change nothing here."""
    qwen = cfg.qk_norm_kind == "rms"
    needs = [
        ("moe.router", moe.router, "token_choice"),
        ("moe.score", moe.score, "softmax"),
        ("moe.router_logits", moe.router_logits, "linear"),
        ("moe.bias_update_rate", moe.bias_update_rate, 0.0),
        ("moe.shared_experts", moe.shared_experts, 0),
        ("model.norm_placement", cfg.norm_placement, "pre"),
    ]
    if not qwen:
        every_layer = moe.layers == "all" or sorted(moe.layers) == list(range(cfg.n_layers))
        needs += [
            ("moe.renormalize", moe.renormalize, True),
            ("moe.layers", "all" if every_layer else moe.layers, "all"),
            ("model.qk_norm", cfg.qk_norm, False),
        ]
    name = "Qwen3-MoE" if qwen else "Mixtral"
    return [
        f"{key}={_yaml(got)} ({name} needs {key}={_yaml(want)})"
        for key, got, want in needs
        if got != want
    ]


def _yaml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def architecture(model) -> str:
    """llama | qwen3 | chameleon | mixtral for a loaded model, or a UserError saying why none."""
    cfg, moe = model.cfg, model.moe_cfg
    why = []
    if cfg.untie:
        why.append(f"model.untie={cfg.untie} (Mixture-of-Transformers: weights per modality)")
    if cfg.mod.layers:
        why.append("mixture-of-depths layers (a selection over the sequence)")
    if moe.enabled and len(moe.groups()) > 1:
        why.append("experts grouped by modality (MoMa): tokens routed by their modality")
    if moe.enabled and moe.router != "token_choice":
        why.append("moe.router=expert_choice (selection over the batch, auxiliary routers)")
    if moe.enabled and not why:
        why += _moe_mismatches(cfg, moe)
    qk = cfg.qk_norm_kind
    chameleon = bool(getattr(getattr(model, "vocab", None), "image_ids", ()))
    if not why and not moe.enabled and qk == "head_layernorm" and not chameleon:
        why.append("Chameleon's QK-norm without Chameleon's vocabulary")
    if not why and not moe.enabled and cfg.norm_placement != "pre" and qk != "head_layernorm":
        why.append("post-norm blocks are Chameleon's only (swin_norm)")
    if why:
        raise UserError("no Hugging Face architecture holds this model: " + "; ".join(why))
    if moe.enabled:
        return "qwen3_moe" if qk == "rms" else "mixtral"
    return {"none": "llama", "rms": "qwen3", "head_layernorm": "chameleon"}[qk]


def _config(model, kind: str, vocab) -> dict:
    cfg = model.cfg
    names = {
        "llama": "Llama",
        "qwen3": "Qwen3",
        "chameleon": "Chameleon",
        "mixtral": "Mixtral",
        "qwen3_moe": "Qwen3Moe",
    }
    arch = names[kind] + ("ForConditionalGeneration" if kind == "chameleon" else "ForCausalLM")
    out = {
        "architectures": [arch],
        "model_type": kind,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim // model.moe_cfg.granularity,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
    }
    if vocab is not None:
        out.update(bos_token_id=vocab.bos, eos_token_id=vocab.eos, pad_token_id=vocab.pad)
    if kind == "mixtral":
        moe = model.moe_cfg
        out.update(num_local_experts=moe.groups()[0].num_experts, num_experts_per_tok=moe.k)
        out.update(sliding_window=None, router_jitter_noise=0.0, output_router_logits=False)
    if kind == "qwen3_moe":
        moe = model.moe_cfg
        out.update(
            intermediate_size=cfg.ffn_dim,  # the dense layers' (mlp_only_layers)
            moe_intermediate_size=cfg.ffn_dim // moe.granularity,
            num_experts=moe.groups()[0].num_experts,
            num_experts_per_tok=moe.k,
            norm_topk_prob=moe.renormalize,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(cfg.n_layers) if not moe.is_moe_layer(i)],
            output_router_logits=False,
        )
    if kind == "chameleon":
        out["swin_norm"] = cfg.norm_placement == "post"
    return out


def _layer_tensors(prefix: str, block, kind: str) -> dict[str, torch.Tensor]:
    """One decoder block's tensors by their hub names."""
    a = block.attn
    out = {f"{prefix}self_attn.{p}_proj.weight": getattr(a, f"w_{p}").weight for p in "qkvo"}
    out[f"{prefix}input_layernorm.weight"] = block.attn_norm.weight
    out[f"{prefix}post_attention_layernorm.weight"] = block.ffn_norm.weight
    for norm in ("q_norm", "k_norm"):
        module = getattr(a, norm)
        if module is not None:
            out[f"{prefix}self_attn.{norm}.weight"] = module.weight
            if kind == "chameleon":
                out[f"{prefix}self_attn.{norm}.bias"] = module.bias
    ffn = block.ffn
    if not isinstance(ffn, MoELayer):  # a dense model, or a dense layer of Qwen3-MoE
        for ours, theirs in (("w_gate", "gate"), ("w_up", "up"), ("w_down", "down")):
            out[f"{prefix}mlp.{theirs}_proj.weight"] = getattr(ffn, ours).weight
        return out
    # The hub's per-expert names (transformers merges them into its 3-D tensors on load).
    moe, (gate, up, down) = EXPERT_NAMES[kind]
    moe = prefix + moe
    out[moe + "gate.weight"] = ffn.routers["mixed"].weight
    gate_up, w_down = ffn.experts.w_gate_up, ffn.experts.w_down  # [E, d, 2h], [E, h, d]
    h = w_down.shape[1]
    for e in range(len(w_down)):
        out[f"{moe}experts.{e}.{gate}.weight"] = gate_up[e, :, :h].t()
        out[f"{moe}experts.{e}.{up}.weight"] = gate_up[e, :, h:].t()
        out[f"{moe}experts.{e}.{down}.weight"] = w_down[e].t()
    return out


# kind: (the MoE block's prefix, the experts' gate, up and down names)
EXPERT_NAMES = {
    "mixtral": ("block_sparse_moe.", ("w1", "w3", "w2")),
    "qwen3_moe": ("mlp.", ("gate_proj", "up_proj", "down_proj")),
}


def hf_tensors(model, kind: str) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    if not model.cfg.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    for i, block in enumerate(model.layers):
        out.update(_layer_tensors(f"model.layers.{i}.", block, kind))
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def _save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, the file then given the mode a file created here gets (0666 less
    the umask, read off a probe file: os.umask would change it for every thread a moment):
    safetensors writes 0600, which other users of a shared model folder cannot read."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    probe = path.with_name(path.name + ".mode")
    probe.touch()
    try:
        os.chmod(path, probe.stat().st_mode & 0o777)
    finally:
        probe.unlink()


def write_shards(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors with the index when larger."""

    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t, size + nbytes
    shards.append(current)
    if len(shards) == 1:
        _save_file(shards[0], out / "model.safetensors")
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save_file(shard, out / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )


def _chameleon_extras(config: dict, tensors: dict, tokenizer_path: Path) -> None:
    """Chameleon's vocabulary_map and VQGAN (config and `model.vqmodel.*` weights)."""
    from safetensors.torch import load_file

    from mm_moe.tokenization.chameleon_vq import VQ_CONFIG, VQ_WEIGHTS
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path / "tokenizer.json"))
    config["vocabulary_map"] = tok.get_vocab(with_added_tokens=True)
    config["vq_config"] = json.loads((tokenizer_path / VQ_CONFIG).read_text())
    for name, t in load_file(str(tokenizer_path / VQ_WEIGHTS)).items():
        tensors[f"model.vqmodel.{name}"] = t.contiguous()


def export(model, out: Path, max_shard_bytes: int = 5 * 2**30, dtype: str = "float32") -> str:
    """Write `model` (from `load_pretrained`) as a Hugging Face folder, its floating-point
    tensors in `dtype`; returns the type."""
    kind = architecture(model)
    vocab = getattr(model, "vocab", None)
    tok_cfg = model.train_config.tokenizer
    if kind == "chameleon" and tok_cfg.image != "chameleon":
        raise UserError("a Chameleon export needs the run's Chameleon tokenizers (its VQGAN)")
    config = _config(model, kind, vocab)
    tensors = hf_tensors(model, kind)
    if kind == "chameleon":
        _chameleon_extras(config, tensors, Path(tok_cfg.path))
    config["torch_dtype"] = dtype
    to = getattr(torch, dtype)
    tensors = {k: t.to(to) if t.is_floating_point() else t for k, t in tensors.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    write_shards(tensors, out, max_shard_bytes)
    if tok_cfg.text == "hf":  # a published tokenizer: it goes along
        from mm_moe.tokenization.hf_text import TOKENIZER_FILES

        for name in TOKENIZER_FILES:
            if (Path(tok_cfg.path) / name).is_file():
                shutil.copy(Path(tok_cfg.path) / name, out / name)
    if tok_cfg.path:  # the source's stopping ids (an eos list), kept by the upcycle
        from mm_moe.upcycle.hf_import import GENERATION_CONFIG

        if (Path(tok_cfg.path) / GENERATION_CONFIG).is_file():
            shutil.copy(Path(tok_cfg.path) / GENERATION_CONFIG, out / GENERATION_CONFIG)
    if vocab is not None:  # the layout, so that an import of this folder keeps every id
        from mm_moe.upcycle import recorded_vocab

        recorded_vocab.write(out, vocab, tok_cfg)
    return kind
