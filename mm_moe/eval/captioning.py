"""Image->text by generation: caption held-out images and count the captions that name the
right class (and no other).

Captions are sampled for all images at once (one prefix length: [bos, boi, codes, eoi]), text
tokens only, up to `max_new_tokens` or eos. A caption names a class when one of the class's
names (e.g. "7" or "seven") appears in it as a whole word, case-insensitively.

Shape legend: R rows (images), S positions, V vocabulary.
"""

from __future__ import annotations

import re

import torch
from PIL import Image

from mm_moe.eval.zero_shot import image_prefixes
from mm_moe.sampling import Decoding, allowed_masks, modality_of


@torch.no_grad()
def sample_captions(
    model,
    tok,
    images: list[Image.Image],
    max_new_tokens: int,
    temperature: float,
    seed: int,
    cache: bool = True,
) -> list[str]:
    """One caption per image (temperature 0: greedy)."""
    vocab = tok.vocab
    device = next(model.parameters()).device
    text_ok_V, _ = allowed_masks(vocab, device, model.cfg.vocab_size)
    text_ok_V = text_ok_V.clone()
    text_ok_V[vocab.boi] = False  # a caption, not an image
    prompts = image_prefixes(tok, images)
    ids_RS = torch.tensor(prompts, device=device)
    mod_RS = torch.tensor([modality_of(p, vocab) for p in prompts], device=device)
    decoding = Decoding(model, ids_RS, mod_RS, cache)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(max_new_tokens):
        logits_RV = decoding.logits()
        logits_RV = logits_RV.masked_fill(~text_ok_V, float("-inf"))
        if temperature > 0:
            probs_RV = torch.softmax(logits_RV / temperature, -1).cpu()
            next_R1 = torch.multinomial(probs_RV, 1, generator=gen).to(device)
        else:
            next_R1 = logits_RV.argmax(-1, keepdim=True)
        decoding.append(next_R1, torch.zeros_like(next_R1))  # text modality
    captions = []
    for row in decoding.ids_RS[:, len(prompts[0]) :].tolist():
        text = row[: row.index(vocab.eos)] if vocab.eos in row else row
        captions.append(tok.text.decode(text))
    return captions


def named_classes(caption: str, names: list[list[str]]) -> set[int]:
    """The classes whose names appear in `caption` as whole words."""
    words = set(re.findall(r"[a-z0-9]+", caption.lower()))
    return {c for c, class_names in enumerate(names) if words & {n.lower() for n in class_names}}


def caption_accuracy(
    model,
    tok,
    images: list[tuple[Image.Image, int]],
    names: list[list[str]],
    max_new_tokens: int = 12,
    temperature: float = 0.0,
    seed: int = 0,
) -> dict:
    """The share of captions naming exactly the image's class, and the captions."""
    captions = sample_captions(
        model, tok, [im for im, _ in images], max_new_tokens, temperature, seed
    )
    right = [named_classes(c, names) == {label} for c, (_, label) in zip(captions, images)]
    return {
        "accuracy": sum(right) / max(1, len(images)),
        "num_images": len(images),
        "captions": captions,
        "correct": right,
    }
