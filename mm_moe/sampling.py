"""Autoregressive sampling over the unified vocabulary, text and images alike.

The model runs in eval mode, so expert-choice and mixture-of-depths use their causal auxiliary
routers. Text mode samples text ids (and boi to start an image, eos to stop); after boi, image
mode samples exactly `tokens_per_image` image codes, then eoi is forced and text mode resumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mm_moe.errors import UserError
from mm_moe.model.kv_cache import KVCache, supports_kv_cache
from mm_moe.tokenization.vocab import Vocab


@dataclass
class SampleConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0
    # Sample among the k most likely allowed tokens; 0 samples from all of them.
    top_k: int = 0
    seed: int = 0
    # Nucleus sampling: among the most likely tokens whose probabilities sum to top_p (1: all).
    top_p: float = 1.0


def allowed_masks(
    vocab: Vocab, device, size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[V] bool masks of the ids text mode and image mode may sample; V is the model's
    logits width `size` (model.vocab_size, which may exceed the vocabulary's: padded to a
    multiple, or set larger), whose ids beyond the vocabulary are never sampled."""
    size = vocab.size if size is None else size
    assert size >= vocab.size, (size, vocab.size)
    ids = torch.arange(size, device=device)
    image = torch.zeros(size, dtype=torch.bool, device=device)
    image[: vocab.size] = vocab.image_id_mask().to(device)
    real = ids < vocab.size
    text = real & ~image & (ids != vocab.pad) & (ids != vocab.bos) & (ids != vocab.eoi)
    return text, image


def modality_of(ids: list[int], vocab: Vocab) -> list[int]:
    return vocab.modality_of(ids).tolist()


class Decoding:
    """Next-token logits of rows that grow by one token per step (eval mode): with a KV cache
    where the model allows one, each step runs only the new positions; without, the whole
    prefix. Both give the same logits (tests/unit/test_kv_cache.py).

    Shape legend: R rows, S positions, V vocabulary.
    """

    def __init__(self, model, ids_RS: torch.Tensor, mod_RS: torch.Tensor, cache: bool = True):
        model.eval()
        self.model = model
        self.cache = KVCache() if cache and supports_kv_cache(model) else None
        self.ids_RS, self.mod_RS = ids_RS, mod_RS
        self.new = ids_RS.shape[1]  # positions the model has not run yet

    def logits(self) -> torch.Tensor:
        """[R, V] fp32 logits of the token after each row."""
        if self.cache is None:
            out = self.model(self.ids_RS, self.mod_RS)
        else:
            n = self.new
            out = self.model(self.ids_RS[:, -n:], self.mod_RS[:, -n:], kv_cache=self.cache)
        self.new = 0
        return out.logits[:, -1].float()

    def append(self, next_R1: torch.Tensor, modality_R1: torch.Tensor) -> None:
        self.ids_RS = torch.cat([self.ids_RS, next_R1], 1)
        self.mod_RS = torch.cat([self.mod_RS, modality_R1], 1)
        self.new += 1


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits divided by the temperature; 0 (greedy) by a tiny one, so that the softmax puts
    all mass on the largest (a division by 0 would make inf - inf = nan)."""
    return logits / max(temperature, 1e-5)


def truncated(logits_RV: torch.Tensor, top_k: int, top_p: float, allowed: int) -> torch.Tensor:
    """Logits outside each row's `top_k` most likely (0: no limit) and outside the most likely
    tokens whose probabilities first reach `top_p` (nucleus sampling; 1: no limit) set to
    -inf; the most likely token always stays. `allowed`: how many ids may be sampled."""
    if top_k:
        kth_R1 = torch.topk(logits_RV, min(top_k, allowed), -1).values[:, -1:]
        logits_RV = logits_RV.masked_fill(logits_RV < kth_R1, float("-inf"))
    if top_p < 1:
        sorted_RV, order_RV = logits_RV.sort(-1, descending=True)
        probs_RV = sorted_RV.softmax(-1)
        # a token is cut when the tokens more likely than it already reach top_p
        cut_RV = probs_RV.cumsum(-1) - probs_RV >= top_p
        logits_RV = logits_RV.masked_fill(cut_RV.scatter(-1, order_RV, cut_RV), float("-inf"))
    return logits_RV


@torch.no_grad()
def generate(
    model,
    vocab: Vocab,
    prompt: list[int],
    tokens_per_image: int,
    cfg: SampleConfig,
    stop_after_image: bool = False,
    cache: bool = True,
    stop_ids: frozenset[int] = frozenset(),
) -> list[int]:
    """Continue `prompt` (ids in the unified vocabulary); returns only the new ids. Stops at
    eos, and at any of `stop_ids` (a published model's other end ids: Llama 3's end of turn)."""
    stops = {vocab.eos, *stop_ids}
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    text_ok, image_ok = allowed_masks(vocab, device, model.cfg.vocab_size)
    ids = list(prompt)
    decoding = Decoding(
        model,
        torch.tensor([ids], device=device),
        torch.tensor([modality_of(ids, vocab)], device=device),
        cache,
    )
    # Codes still to sample for the current image (None: text mode).
    remaining = tokens_per_image if ids and ids[-1] == vocab.boi else None
    new: list[int] = []
    while len(new) < cfg.max_new_tokens:
        if remaining == 0:
            nxt = vocab.eoi
            remaining = None
        else:
            if len(ids) > model.cfg.max_seq_len:
                what = f"the prompt and {len(new)} sampled tokens" if new else "the prompt"
                raise UserError(
                    f"{what} ({len(ids)} tokens) exceed model.max_seq_len="
                    f"{model.cfg.max_seq_len}; "
                    + ("sample fewer tokens" if new else "shorten the prompt")
                )
            logits = decoding.logits()[0]
            allowed = image_ok if remaining is not None else text_ok
            logits = tempered(logits.masked_fill(~allowed, float("-inf")), cfg.temperature)
            logits = truncated(logits[None], cfg.top_k, cfg.top_p, int(allowed.sum()))[0]
            probs = torch.softmax(logits, -1).cpu()
            nxt = int(torch.multinomial(probs, 1, generator=gen))
            if remaining is not None:
                remaining -= 1
            elif nxt == vocab.boi:
                remaining = tokens_per_image
        ids.append(nxt)
        new.append(nxt)
        decoding.append(
            torch.tensor([[nxt]], device=device),
            torch.tensor([modality_of([nxt], vocab)], device=device),
        )
        if nxt in stops or (stop_after_image and nxt == vocab.eoi):
            break
    return new


def split_output(new: list[int], vocab: Vocab) -> list[tuple[str, list[int]]]:
    """[("text", ids) | ("image", codes)] segments of generated ids (specials dropped)."""
    segments: list[tuple[str, list[int]]] = []
    codes = vocab.image_codes(new).tolist() if new else []
    for i, code in zip(new, codes):
        kind = "image" if code >= 0 else "text"
        if i in (vocab.boi, vocab.eoi, vocab.bos, vocab.eos, vocab.pad):
            if i == vocab.boi:
                segments.append(("image", []))
            continue
        if not segments or segments[-1][0] != kind:
            segments.append((kind, []))
        segments[-1][1].append(code if kind == "image" else i)
    return [(k, v) for k, v in segments if v]
