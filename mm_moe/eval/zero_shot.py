"""Zero-shot image->text classification: for each held-out image, the class whose caption the
model finds most likely after the image (mean log-likelihood over the caption templates).

The model runs in eval mode (causal routing), so rows of a batch do not interact and one
forward scores every class and template of several images at once.

Shape legend: R rows (images x classes x templates), S positions.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mm_moe.sampling import modality_of


def image_prefix(tok, image: Image.Image) -> list[int]:
    """[bos, boi, codes..., eoi]: an image alone, as the start of a caption pair."""
    return codes_prefix(tok.vocab, tok.image.encode(image))


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
    predictions = []
    for start in range(0, len(images), batch_images):
        chunk = images[start : start + batch_images]
        prefixes = [image_prefix(tok, image) for image, _ in chunk]
        rows_p, rows_c = [], []
        for p in prefixes:
            for c in range(C):
                for t in range(T):
                    rows_p.append(p)
                    rows_c.append(captions[c][t])
        scores = np.array(caption_logprobs(model, tok.vocab, rows_p, rows_c))
        scores_ICT = scores.reshape(len(chunk), C, T)
        predictions.extend(scores_ICT.mean(2).argmax(1).tolist())
    truth = [label for _, label in images]
    correct = sum(int(p == t) for p, t in zip(predictions, truth))
    return {
        "accuracy": correct / max(1, len(images)),
        "num_images": len(images),
        "chance": 1 / C,
        "predictions": predictions,
        "labels": truth,
    }
