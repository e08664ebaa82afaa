"""Text->image evaluation: generate images from class captions, decode them with the image
tokenizer, and let a classifier trained on real images (judge.py) say which class they show.

Generation is batched: every prompt of one length samples its image codes together (the model
runs in eval mode with causal routing, so rows do not interact), one new position per forward
with a KV cache (mm_moe/sampling.py's Decoding).

Classifier-free guidance (`guidance` g > 1; as Chameleon, LlamaGen and Lumina-mGPT sample): each
code is drawn from log p(x | caption) + (g - 1) (log p(x | caption) - log p(x)), the
unconditional p(x) being the same model on [bos, boi] + the codes so far (an image with no
caption before it, what every image-first pair trains). g = 1 is plain sampling.

Reranking (`rerank` N > 1): N images per caption, of which the one after which the model finds
the caption most likely ([bos, boi, codes, eoi, caption], the image -> text direction) is kept,
as DALL-E reranked its samples with CLIP; here the model reranks its own, and the judge only
scores the kept ones.

Shape legend: R rows (prompts), S positions, V vocabulary, K candidates per prompt, P prompts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from mm_moe.eval.zero_shot import caption_logprobs_batched, codes_prefix
from mm_moe.sampling import Decoding, allowed_masks, modality_of, tempered, truncated
from mm_moe.tokenization.interface import decode_images


@torch.no_grad()
def sample_image_codes(
    model,
    tok,
    prompts: list[list[int]],
    temperature: float,
    top_k: int,
    seed: int,
    guidance: float = 1.0,
    cache: bool = True,
    top_p: float = 1.0,
) -> list[list[int]]:
    """Image codes (in [0, codebook)) that follow each prompt (which ends with boi)."""
    vocab, tpi = tok.vocab, tok.image.tokens_per_image
    device = next(model.parameters()).device
    _, image_ok_V = allowed_masks(vocab, device, model.cfg.vocab_size)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: list[list[int] | None] = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        assert p and p[-1] == vocab.boi, "text->image prompts end with boi"
        by_len.setdefault(len(p), []).append(i)
    for length in sorted(by_len):
        rows = by_len[length]
        ids_RS = torch.tensor([prompts[i] for i in rows], device=device)
        mod_RS = torch.tensor([modality_of(prompts[i], vocab) for i in rows], device=device)
        cond = Decoding(model, ids_RS, mod_RS, cache)
        uncond_RS = torch.tensor([[vocab.bos, vocab.boi]] * len(rows), device=device)
        uncond_mod_RS = torch.ones_like(uncond_RS)
        uncond_mod_RS[:, 0] = 0  # bos is text
        free = Decoding(model, uncond_RS, uncond_mod_RS, cache) if guidance != 1.0 else None
        for _ in range(tpi):
            logits_RV = _image_logprobs(cond, image_ok_V)
            if free is not None:
                free_RV = _image_logprobs(free, image_ok_V)
                logits_RV = free_RV + guidance * (logits_RV - free_RV)
                logits_RV = logits_RV.masked_fill(~image_ok_V, float("-inf"))
            logits_RV = tempered(logits_RV, temperature)
            logits_RV = truncated(logits_RV, top_k, top_p, int(image_ok_V.sum()))
            probs_RV = torch.softmax(logits_RV, -1).cpu()
            nxt_R1 = torch.multinomial(probs_RV, 1, generator=gen).to(device)
            for decoding in (cond, free) if free is not None else (cond,):
                decoding.append(nxt_R1, torch.ones_like(nxt_R1))  # image modality
        for r, i in enumerate(rows):
            out[i] = vocab.image_codes(cond.ids_RS[r, length:].tolist()).tolist()
    return out  # type: ignore[return-value]


def _image_logprobs(decoding: Decoding, image_ok_V) -> torch.Tensor:
    """Log-probabilities of the next token over the image codes (-inf elsewhere), fp32."""
    logits_RV = decoding.logits()
    return torch.log_softmax(logits_RV.masked_fill(~image_ok_V, float("-inf")), -1)


def caption_prompt(tok, caption: str) -> list[int]:
    vocab = tok.vocab
    return [vocab.bos, *tok.text.encode(caption), vocab.boi]


def save_grid(
    columns: list[list[Image.Image]], path: Path, scale: int = 4, labels: list[str] | None = None
) -> None:
    """One column per class, one row per sample, upscaled for viewing; with `labels`, a
    header row names each column."""
    from PIL import ImageDraw

    rows = max(len(c) for c in columns)
    w, h = columns[0][0].size
    grid = Image.new("RGB", (w * len(columns), h * rows), "white")
    for j, column in enumerate(columns):
        for i, image in enumerate(column):
            grid.paste(image.convert("RGB"), (j * w, i * h))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    if labels is not None:
        header = 16
        framed = Image.new("RGB", (grid.width, grid.height + header), "white")
        framed.paste(grid, (0, header))
        draw = ImageDraw.Draw(framed)
        for j, label in enumerate(labels):
            x = j * w * scale + w * scale // 2 - 3 * len(label)
            draw.text((x, 2), label, fill="black")
        grid = framed
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def _rerank(model, vocab, candidates: list[list[int]], captions: list[list[int]], K: int):
    """Of candidates k * P + i (k < K), the one after which the model finds caption i most
    likely, for each of the P captions."""
    P = len(captions)
    scores_KP = torch.tensor(
        caption_logprobs_batched(
            model, vocab, [codes_prefix(vocab, c) for c in candidates], captions * K
        )
    ).view(K, P)
    return [candidates[k * P + i] for i, k in enumerate(scores_KP.argmax(0).tolist())]


def text_to_image_eval(
    model,
    tok,
    judge,
    labels: list[str],
    template: str,
    samples_per_label: int,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    grid_path: Path | None = None,
    grid_samples: int = 3,
    guidance: float = 1.0,
    rerank: int = 1,
) -> dict:
    """Generate `samples_per_label` images per class (each the best of `rerank` by the model's
    own caption likelihood) and score them with the judge. `accuracy_single` scores the first
    candidate of each caption alone: plain sampling."""
    prompts, intended, captions = [], [], []
    for c, label in enumerate(labels):
        caption = tok.text.encode(template.format(label=label))
        for _ in range(samples_per_label):
            prompts.append([tok.vocab.bos, *caption, tok.vocab.boi])
            captions.append(caption)
            intended.append(c)
    # Candidate k of prompt i is row k * P + i: one batch, one generator.
    candidates = sample_image_codes(
        model, tok, prompts * rerank, temperature, top_k, seed, guidance
    )
    P = len(prompts)
    codes = _rerank(model, tok.vocab, candidates, captions, rerank) if rerank > 1 else candidates
    images = decode_images(tok.image, codes)
    predicted = judge.predict(images)
    correct = sum(int(p == t) for p, t in zip(predicted, intended))
    result = {
        "accuracy": correct / len(images),
        "num_images": len(images),
        "chance": 1 / len(labels),
        "guidance": guidance,
        "rerank": rerank,
        "predicted": predicted,
        "intended": intended,
        "codes": codes,
    }
    if rerank > 1:
        single = judge.predict(decode_images(tok.image, candidates[:P]))
        result["accuracy_single"] = sum(int(p == t) for p, t in zip(single, intended)) / P
    else:
        result["accuracy_single"] = result["accuracy"]
    if grid_path is not None and grid_samples:
        columns = [
            [im for im, t in zip(images, intended) if t == c][:grid_samples]
            for c in range(len(labels))
        ]
        save_grid(columns, Path(grid_path), labels=labels)
        result["grid"] = str(grid_path)
    return result
