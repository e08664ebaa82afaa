"""Zero-shot image->text classification: for each held-out image, the class whose caption the
model finds most likely after the image (mean log-likelihood over the caption templates).

The model runs in eval mode (causal routing), so rows of a batch do not interact. Each image
runs once: its keys and values are cached (model/kv_cache.py) and every class and template's
caption continues from them, instead of a forward over image and caption per caption.

Shape legend: P prefixes (images), N captions (classes x templates), R rows, S positions,
L caption positions, V vocabulary.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mm_moe.model.kv_cache import KVCache, supports_kv_cache
from mm_moe.sampling import modality_of
from mm_moe.tokenization.interface import encode_images


def image_prefix(tok, image: Image.Image) -> list[int]:
    """[bos, boi, codes..., eoi]: an image alone, as the start of a caption pair."""
    return codes_prefix(tok.vocab, tok.image.encode(image))


def image_prefixes(tok, images: list[Image.Image]) -> list[list[int]]:
    """image_prefix of each image (encoded in batches)."""
    return [codes_prefix(tok.vocab, codes) for codes in encode_images(tok.image, images)]


def codes_prefix(vocab, codes) -> list[int]:
    """image_prefix of an image given by its codes (in [0, codebook))."""
    ids = vocab.image_token_ids(torch.as_tensor(codes)).tolist()
    return [vocab.bos, vocab.boi, *ids, vocab.eoi]


def caption_ids(tok, labels: list[str], templates: list[str]) -> list[list[list[int]]]:
    """[class][template] token ids of each caption."""
    return [[tok.text.encode(t.format(label=label)) for t in templates] for label in labels]


@torch.no_grad()
def caption_logprobs(model, vocab, prefixes: list[list[int]], captions: list[list[int]]):
    """Summed log-probability of each caption after its prefix; rows are right-padded."""
    device = next(model.parameters()).device
    rows = [p + c for p, c in zip(prefixes, captions)]
    S = max(len(r) for r in rows)
    ids_RS = torch.full((len(rows), S), vocab.pad, dtype=torch.long)
    mod_RS = torch.zeros((len(rows), S), dtype=torch.long)
    for r, row in enumerate(rows):
        ids_RS[r, : len(row)] = torch.tensor(row)
        mod_RS[r, : len(row)] = torch.tensor(modality_of(row, vocab))
    logp_RSV = torch.log_softmax(model(ids_RS.to(device), mod_RS.to(device)).logits.float(), -1)
    out = []
    for r, (p, c) in enumerate(zip(prefixes, captions)):
        pos = torch.arange(len(p) - 1, len(p) - 1 + len(c), device=device)
        out.append(float(logp_RSV[r, pos, torch.tensor(c, device=device)].sum()))
    return out


def caption_logprobs_batched(
    model, vocab, prefixes: list[list[int]], captions: list[list[int]], rows: int = 100
) -> list[float]:
    """caption_logprobs over `rows` rows per forward."""
    return [
        score
        for i in range(0, len(prefixes), rows)
        for score in caption_logprobs(model, vocab, prefixes[i : i + rows], captions[i : i + rows])
    ]


@torch.no_grad()
def captions_after_prefixes(
    model, vocab, prefixes: list[list[int]], captions: list[list[int]], batch: int = 8
) -> np.ndarray:
    """[P, N] summed log-probability of every caption after every prefix. Prefixes of one
    length run once each, cached (`batch` of them per forward); otherwise (or for a model
    without a KV cache) every (prefix, caption) row runs whole."""
    P, N = len(prefixes), len(captions)
    if P == 0:
        return np.zeros((0, N))
    if not supports_kv_cache(model) or len({len(p) for p in prefixes}) > 1:
        rows_p = [p for p in prefixes for _ in range(N)]
        scores = caption_logprobs_batched(model, vocab, rows_p, captions * P, batch * N)
        return np.array(scores).reshape(P, N)
    return np.concatenate(
        [
            _cached_captions(model, vocab, prefixes[i : i + batch], captions)
            for i in range(0, P, batch)
        ]
    )


def _cached_captions(model, vocab, prefixes: list[list[int]], captions: list[list[int]]):
    device = next(model.parameters()).device
    N, S, L = len(captions), len(prefixes[0]), max(len(c) for c in captions)
    cache = KVCache()
    ids_PS = torch.tensor(prefixes, device=device)
    mod_PS = torch.tensor([modality_of(p, vocab) for p in prefixes], device=device)
    last_PV = model(ids_PS, mod_PS, kv_cache=cache).logits[:, -1]
    cache.repeat_rows(N)  # row p * N + n: caption n after prefix p
    ids_RL = torch.full((len(prefixes) * N, L), vocab.pad, dtype=torch.long)
    mod_RL = torch.zeros_like(ids_RL)
    for r, (p, c) in enumerate((p, c) for p in prefixes for c in captions):
        ids_RL[r, : len(c)] = torch.tensor(c)
        mod_RL[r, : len(c)] = torch.tensor(modality_of(p + c, vocab)[S:])
    rest_RLV = model(ids_RL.to(device), mod_RL.to(device), kv_cache=cache).logits
    # The prefix's last position predicts a caption's first token, its own positions the rest.
    logits_RLV = torch.cat([last_PV.repeat_interleave(N, 0)[:, None], rest_RLV[:, :-1]], 1)
    logp_RL = logits_RLV.float().log_softmax(-1).gather(2, ids_RL.to(device)[..., None])[..., 0]
    valid_RL = torch.arange(L) < torch.tensor([len(c) for c in captions] * len(prefixes))[:, None]
    return (logp_RL.cpu().double() * valid_RL).sum(1).view(len(prefixes), N).numpy()


def zero_shot_classify(
    model,
    tok,
    images: list[tuple[Image.Image, int]],
    labels: list[str],
    templates: list[str],
    batch_images: int = 8,
) -> dict:
    """Accuracy of caption-likelihood classification, and the predictions."""
    model.eval()
    captions = caption_ids(tok, labels, templates)
    C, T = len(labels), len(templates)
    prefixes = image_prefixes(tok, [image for image, _ in images])
    flat = [captions[c][t] for c in range(C) for t in range(T)]
    scores_ICT = captions_after_prefixes(model, tok.vocab, prefixes, flat, batch_images).reshape(
        len(images), C, T
    )
    predictions = scores_ICT.mean(2).argmax(1).tolist()
    truth = [label for _, label in images]
    correct = sum(int(p == t) for p, t in zip(predictions, truth))
    return {
        "accuracy": correct / max(1, len(images)),
        "num_images": len(images),
        "chance": 1 / C,
        "predictions": predictions,
        "labels": truth,
    }
