"""Tiny random Hugging Face models with their tokenizers, built here (nothing is downloaded), to
try the import, upcycling and export commands on (and for the tests):

    .venv/bin/python scripts/tiny_hf_model.py llama OUT
    .venv/bin/python scripts/tiny_hf_model.py chameleon OUT [--swin-norm]

llama: a LlamaForCausalLM (GQA) with a byte-level BPE tokenizer trained on Python's own
docstrings; chameleon: a ChameleonForConditionalGeneration whose image tokens sit at shuffled
ids inside its vocabulary, with its VQGAN (16x16 images into 4x4 codes of 64 entries).
Weights are random (norms too, so that they matter).
"""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import numpy as np
import torch

WORDS_SOURCE = (json, inspect, textwrap, Path)  # docstrings: English text that ships with Python
SPECIALS = ["<s>", "<pad>", "</s>"]
BOI, EOI = "<racm3:break>", "<eoss>"
CODES = 64


def _texts() -> list[str]:
    out = []
    for module in WORDS_SOURCE:
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc:
                out.append(doc)
    return out


def image_token_name(code: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def make_tokenizer(path: Path, vocab_size: int, image_tokens: bool, seed: int = 0):
    """A byte-level BPE tokenizer trained on Python docstrings, saved as tokenizer.json with
    tokenizer_config.json; with `image_tokens`, Chameleon's boi/eoi and image-token names are
    added, in a shuffled code order (so code -> id is not monotone)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(), trainer)
    if image_tokens:
        codes = np.random.default_rng(seed).permutation(CODES).tolist()
        tok.add_special_tokens([BOI, EOI, *(image_token_name(c) for c in codes)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


def _randomize_norms(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vqmodel" in name:
                continue
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("norm.bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def make_hf_chameleon(path: Path, seed: int = 0, swin_norm: bool = False):
    """A tiny ChameleonForConditionalGeneration (GQA: 4 heads, 2 kv heads; VQGAN 16x16 images
    into 4x4 codes of a 64-entry codebook), its tokenizer, saved."""
    import transformers

    tok = make_tokenizer(path, 320, image_tokens=True, seed=seed)
    vocab_map = tok.get_vocab(with_added_tokens=True)
    vq = {
        "embed_dim": 32,
        "num_embeddings": CODES,
        "latent_channels": 32,
        "base_channels": 32,
        "channel_multiplier": [1, 1, 2],
        "num_res_blocks": 1,
        "resolution": 16,
        "attn_resolutions": [],
    }
    cfg = transformers.ChameleonConfig(
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        swin_norm=swin_norm,
        vq_config=vq,
        vocabulary_map=vocab_map,
        bos_token_id=vocab_map["<s>"],
        pad_token_id=vocab_map["<pad>"],
        eos_token_id=vocab_map["</s>"],
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = transformers.ChameleonForConditionalGeneration(cfg).eval()
    _randomize_norms(model, seed)
    model.save_pretrained(path)
    return model


def make_hf_llama(
    path: Path,
    vocab_size: int = 300,
    seed: int = 0,
    tokenizer: bool = True,
    tie: bool = False,
    shard: str | None = None,
    family: str = "Llama",
    **kw,
):
    """A tiny LlamaForCausalLM (GQA) with random norms, saved (in shards of at most `shard`,
    e.g. "40KB"); with `tokenizer`, a trained tokenizer beside it whose specials the config
    names, else Llama's own special ids (bos 1, eos 2, no pad). `family="Mistral"`: the same
    as a MistralForCausalLM."""
    import transformers

    specials = {}
    if tokenizer:
        tok = make_tokenizer(path, vocab_size, image_tokens=False)
        vocab_size = tok.get_vocab_size(with_added_tokens=True)
        specials = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
    cfg = getattr(transformers, f"{family}Config")(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        initializer_range=0.1,  # logits of order 10: differences are not hidden by small scale
        **specials,
        **kw,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
    _randomize_norms(model, seed)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return model


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("llama", "chameleon"))
    parser.add_argument("out")
    parser.add_argument("--swin-norm", action="store_true", help="chameleon: post-norm blocks")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    if args.kind == "llama":
        make_hf_llama(out, seed=args.seed)
    else:
        make_hf_chameleon(out, seed=args.seed, swin_norm=args.swin_norm)
    print(f"wrote a tiny {args.kind} to {out}")


if __name__ == "__main__":
    main()
