"""Hugging Face checkpoints -> this project's dense model, with the same function, and the
vocabulary layout and tokenizer that come with them.

A source folder holds `config.json` and either `model.safetensors` or shards
`model-0000x-of-0000y.safetensors` listed in `model.safetensors.index.json`. Supported:
- Llama (and Mistral without a sliding window): grouped-query attention, tied or untied
  embeddings, RoPE configured either way transformers has written it (`rope_theta` +
  `rope_scaling` before v5, `rope_parameters` since);
- Qwen3 (dense, without a sliding window): Llama's block with QK-norm as an RMSNorm over the
  head dim (model.qk_norm=true), the architecture mm_moe.export writes for this project's
  default dense model;
- Chameleon (`model_type: chameleon`, and the models built on it): RMSNorm blocks, QK-norm as
  a LayerNorm over the head dim with a weight and bias per head (model.qk_norm=
  head_layernorm), `swin_norm` (res-post-norm: model.norm_placement=post), grouped-query
  attention; its image tokens sit inside its vocabulary (`vocabulary_map`, `IMGIMG<A-J>Z`).
Anything that would change the function silently (other RoPE scalings, biases, another
activation, a head_dim that is not hidden/heads) is refused.

Why the mapping is exact: both models compute norms in fp32, rotate query/key halves the same
way (mm_moe/model/rope.py is Llama's `rotate_half` layout, so q/k rows need no permutation),
share key/value heads with the same grouping (head h reads kv head h // (H / K)), scale scores
by head_dim^-1/2 and apply SwiGLU as down(silu(gate(x)) * up(x)). Llama has no QK-norm, so the
imported model uses model.qk_norm=false (Qwen3: true, its q_norm / k_norm weights copied).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from mm_moe.errors import UserError
from mm_moe.utils.json_files import read_json_object

log = logging.getLogger(__name__)
CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
SUPPORTED_TYPES = ("llama", "mistral", "qwen3", "chameleon")
# What each imports as, for the refusal of any other type.
SUPPORTED_NAMES = (
    "llama, mistral (without a sliding window), qwen3 (dense, QK-norm; without a sliding "
    "window) and chameleon"
)
# Chameleon's begin/end-of-image tokens in its vocabulary_map.
CHAMELEON_BOI, CHAMELEON_EOI = "<racm3:break>", "<eoss>"


def _refuse(path: Path, message: str) -> None:
    raise UserError(f"{path}: {message}")


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise UserError(
            f"source={folder}: no {CONFIG} there (source_format=hf expects a Hugging Face "
            f"folder with {CONFIG} and {SINGLE} or sharded safetensors with {INDEX})"
        )
    return read_json_object(path, "a Hugging Face model's configuration")


def _rope_theta(hf: dict, path: Path) -> float:
    """RoPE base from either config style; only unscaled ('default') RoPE is exact here."""
    params = hf.get("rope_parameters")
    if params is not None:
        # transformers >= 5: one dict (or one per layer type, which Llama does not use).
        if "rope_theta" not in params and all(isinstance(v, dict) for v in params.values()):
            _refuse(path, f"per-layer-type rope_parameters {sorted(params)} are not supported")
        scaling = params
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    else:
        scaling = hf.get("rope_scaling") or {}
        theta = hf.get("rope_theta", 10000.0)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear" and scaling.get("factor") == 1.0:  # positions divided by 1: unscaled
        kind = "default"
    if kind != "default":
        _refuse(
            path,
            f"RoPE scaling {kind!r} is not supported (only unscaled RoPE, rope_type 'default', "
            "maps exactly onto mm_moe/model/rope.py)",
        )
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse(path, f"partial_rotary_factor={hf['partial_rotary_factor']} is not supported")
    return float(theta)


def model_fields(hf: dict, folder: str | Path) -> dict:
    """ModelConfig fields that reproduce the Hugging Face model (vocab_size included)."""
    path = Path(folder) / CONFIG
    kind = hf.get("model_type")
    if kind not in SUPPORTED_TYPES:
        moe = (
            "; an MoE cannot be a source (upcycling starts from a dense model): for a mixtral "
            "that mm_moe exported, use the mm_moe checkpoint it was exported from "
            "(source=<that checkpoint> source_format=native)"
            if kind in ("mixtral", "qwen3_moe")
            else ""
        )
        _refuse(
            path,
            f"model_type={kind!r} is not supported; these import: {SUPPORTED_NAMES} "
            f"(architectures {hf.get('architectures')}){moe}",
        )
    if kind == "chameleon" and not hf.get("vocabulary_map"):
        _refuse(path, "a Chameleon config without vocabulary_map (the image tokens' ids)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            _refuse(path, f"{flag}=true is not supported (this project's layers have no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        _refuse(path, f"hidden_act={hf['hidden_act']!r} is not supported (SwiGLU needs 'silu')")
    window = hf.get("sliding_window") if kind == "mistral" else None
    # A window at least as long as any sequence the model takes never limits attention.
    if window is not None and window < hf.get("max_position_embeddings", window + 1):
        _refuse(
            path,
            f"sliding_window={window} is not supported (global attention; a window of at "
            f"least max_position_embeddings={hf.get('max_position_embeddings')} is)",
        )
    sliding = [t for t in hf.get("layer_types") or [] if t != "full_attention"]
    if kind == "qwen3" and (hf.get("use_sliding_window") or sliding):
        _refuse(path, "a sliding window is not supported (use_sliding_window, layer_types)")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d // heads
    if head_dim * heads != d:
        _refuse(
            path,
            f"head_dim={head_dim} with {heads} heads does not equal hidden_size={d}; this "
            "project's attention uses head_dim = hidden_size / num_attention_heads",
        )
    return {
        "vocab_size": hf["vocab_size"],
        "d_model": d,
        "n_layers": hf["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": hf.get("num_key_value_heads") or heads,
        "ffn_hidden": hf["intermediate_size"],
        "rope_theta": _rope_theta(hf, path),
        "max_seq_len": hf.get("max_position_embeddings", 4096),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        # Qwen3's q_norm / k_norm: RMSNorm over the head dim (model.qk_norm=true, "rms").
        "qk_norm": {"chameleon": "head_layernorm", "qwen3": True}.get(kind, False),
        "norm_placement": "post" if hf.get("swin_norm") else "pre",
        # transformers' Llama and Mistral configs default to untied embeddings.
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "untie": [],
    }


def _shard_files(folder: Path) -> list[Path]:
    if (folder / INDEX).is_file():
        weight_map = read_json_object(folder / INDEX, "a safetensors index").get("weight_map")
        if not weight_map:
            _refuse(folder / INDEX, "no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            _refuse(folder / INDEX, f"lists shards that are not there: {missing[:3]}")
        return files
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    pickled = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
    hint = (
        f"; it holds {pickled[0]}: convert it where you trust it, e.g. "
        "AutoModelForCausalLM.from_pretrained(SRC).save_pretrained(DST) with transformers"
        if pickled
        else ""
    )
    raise UserError(
        f"source={folder}: neither {SINGLE} nor {INDEX} there (only safetensors checkpoints "
        f"are read: they cannot run code when loaded){hint}"
    )


def load_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, by its Hugging Face name, in fp32."""
    from safetensors.torch import load_file

    out = {}
    for f in _shard_files(Path(folder)):
        try:
            tensors = load_file(str(f))
        except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file
            raise UserError(f"cannot read {f}: {exc.__class__.__name__}: {exc}") from exc
        out.update({k: v.float() for k, v in tensors.items()})
    return out


_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn.w_q.weight",
    "self_attn.k_proj.weight": "attn.w_k.weight",
    "self_attn.v_proj.weight": "attn.w_v.weight",
    "self_attn.o_proj.weight": "attn.w_o.weight",
    "mlp.gate_proj.weight": "ffn.w_gate.weight",
    "mlp.up_proj.weight": "ffn.w_up.weight",
    "mlp.down_proj.weight": "ffn.w_down.weight",
    # Chameleon's QK-norm (per-head LayerNorm)
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.q_norm.bias": "attn.q_norm.bias",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "self_attn.k_norm.bias": "attn.k_norm.bias",
}


def to_dense_state(hf_state: dict[str, torch.Tensor], fields: dict, folder) -> dict:
    """Hugging Face names -> this project's dense model names (same layouts: [out, in])."""
    where = Path(folder)
    state = {}
    for name, tensor in hf_state.items():
        key = name.removeprefix("model.")
        if key.endswith("rotary_emb.inv_freq") or key.startswith("vqmodel."):
            continue  # derived from the config; Chameleon's VQGAN is the image tokenizer's
        if key == "embed_tokens.weight":
            state["embed.weight"] = tensor
        elif key in ("norm.weight", "lm_head.weight"):
            state[key] = tensor
        elif key.startswith("layers."):
            _, index, rest = key.split(".", 2)
            if rest not in _LAYER_NAMES:
                _refuse(where, f"unexpected tensor {name!r} for a {fields_kind(fields)} model")
            state[f"layers.{index}.{_LAYER_NAMES[rest]}"] = tensor
        else:
            _refuse(where, f"unexpected tensor {name!r} for a {fields_kind(fields)} model")
    if fields["tie_embeddings"]:
        state.pop("lm_head.weight", None)  # transformers ties it to the embedding
    if "embed.weight" in state and state["embed.weight"].shape[0] != fields["vocab_size"]:
        _refuse(
            where,
            f"embed_tokens has {state['embed.weight'].shape[0]} rows but config.json says "
            f"vocab_size={fields['vocab_size']}",
        )
    return state


def import_dense(folder: str | Path):
    """(ModelConfig, EarlyFusionDecoder in eval mode) with the Hugging Face model's weights."""
    from mm_moe.model.config import ModelConfig

    fields = model_fields(read_config(folder), folder)
    cfg = ModelConfig(**fields)
    model = cfg.build()
    state = to_dense_state(load_tensors(folder), fields, folder)
    if cfg.tie_embeddings and "embed.weight" in state:
        state["lm_head.weight"] = state["embed.weight"]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a shape that does not match config.json
        raise UserError(f"source={folder}: {exc}") from exc
    missing = [n for n in missing if "rope" not in n]
    if missing or unexpected:
        raise UserError(
            f"source={folder}: the checkpoint does not match its config.json: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return cfg, model.eval()


def fields_kind(fields: dict) -> str:
    return "Chameleon" if fields.get("qk_norm") == "head_layernorm" else "Llama-family"


# ---- the vocabulary and the tokenizer that come with the model ----
def chameleon_image_ids(hf: dict) -> tuple[int, ...]:
    """The vocabulary id of each VQ code: `IMGIMG<letters>Z`, letters A..J spelling the code's
    decimal digits (transformers' ChameleonImageVocabularyMapping)."""
    vocab_map = hf["vocabulary_map"]
    letters = {str(d): chr(ord("A") + d) for d in range(10)}
    num = hf.get("vq_config", {}).get("num_embeddings", 8192)
    try:
        return tuple(
            int(vocab_map["IMGIMG" + "".join(letters[c] for c in str(code)) + "Z"])
            for code in range(num)
        )
    except KeyError as exc:
        raise UserError(f"vocabulary_map lacks the image token {exc} of {num} VQ codes") from exc


def _first_id(hf: dict, name: str, folder) -> int | None:
    """config.json's `<name>_token_id`: Llama 3 lists several eos ids (end of text, end of
    turn); the first is the one documents end with (the tokenizer's own, where it names one,
    replaces it)."""
    value = hf.get(f"{name}_token_id")
    if isinstance(value, list):
        if not value or not all(isinstance(v, int) for v in value):
            raise UserError(
                f"{Path(folder) / CONFIG}: {name}_token_id={value} must be an id or a non-empty "
                "list of ids"
            )
        log.info("%s: %s_token_id lists %s; using the first", folder, name, value)
        value = value[0]
    if value is not None and not isinstance(value, int):
        raise UserError(f"{Path(folder) / CONFIG}: {name}_token_id={value!r} must be an id")
    return value


def source_layout(folder: str | Path, hf: dict, codebook_size: int):
    """Where text, special and image ids live for this model: its own vocabulary kept as it
    is, its own special tokens (from its tokenizer, else config.json), the missing ones and the
    image codes appended (Chameleon: its own begin/end-of-image and image-token ids)."""
    from mm_moe.tokenization.config import SPECIALS, appended_vocab
    from mm_moe.tokenization.hf_text import HFTextTokenizer, has_tokenizer

    ids = {name: _first_id(hf, name, folder) for name in ("bos", "eos", "pad")}
    if has_tokenizer(folder):
        tok = HFTextTokenizer(folder)
        if tok.vocab_size > hf["vocab_size"]:  # its last ids have no row: they would become
            raise UserError(  # the appended begin/end-of-image and image-code ids
                f"source={folder}: its tokenizer has {tok.vocab_size} ids (added tokens "
                f"included), config.json's vocab_size is {hf['vocab_size']}: ids "
                f"{hf['vocab_size']}..{tok.vocab_size - 1} have no embedding row. Use the "
                "tokenizer the model was trained with, or resize the model's embeddings first"
            )
        ids.update(
            {k: getattr(tok, k) for k in ("bos", "eos", "pad") if getattr(tok, k) is not None}
        )
    image_ids: tuple[int, ...] = ()
    if hf.get("model_type") == "chameleon":
        vocab_map = hf["vocabulary_map"]
        ids["boi"], ids["eoi"] = vocab_map.get(CHAMELEON_BOI), vocab_map.get(CHAMELEON_EOI)
        image_ids = chameleon_image_ids(hf)
        codebook_size = len(image_ids)
    specials = {name: ids.get(name) for name in SPECIALS}
    return appended_vocab(hf["vocab_size"], specials, codebook_size, image_ids)


GENERATION_CONFIG = "generation_config.json"


def write_generation_config(folder: Path, out: Path) -> None:
    """The source's generation_config.json into `out`, for the export to write back: Llama 3
    stops generating at any of several eos ids (end of text, end of turn), which the
    vocabulary's one eos cannot hold. Without the file, the ids config.json lists (what
    transformers would derive), where it lists more than one eos."""
    import shutil

    if (folder / GENERATION_CONFIG).is_file():
        read_json_object(folder / GENERATION_CONFIG, "generation settings")  # named now
        shutil.copy(folder / GENERATION_CONFIG, out / GENERATION_CONFIG)
        return
    hf = read_config(folder)
    if isinstance(hf.get("eos_token_id"), list):
        ids = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf}
        (out / GENERATION_CONFIG).write_text(json.dumps(ids, indent=1))


def copy_tokenizer(folder: str | Path, out: Path) -> bool:
    """The source's tokenizer files (and Chameleon's VQGAN) into `out`; False when it has
    no tokenizer file."""
    import shutil

    from mm_moe.tokenization.hf_text import TOKENIZER_FILES, has_tokenizer

    folder = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    write_generation_config(folder, out)
    if read_config(folder).get("model_type") == "chameleon":
        from mm_moe.tokenization.chameleon_vq import extract

        extract(folder, out)
    if not has_tokenizer(folder):
        return False
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy(folder / name, out / name)
    return True
