"""Build the demo corpus into webdataset shards: the sources of data_pipelines/demo_corpus.py.

    python data_pipelines/build_demo_corpus.py output=data/demo [heldout=500] [overwrite=true]

Writes OUTPUT/pairs (digit, photo and face captions, in both orders at training time),
OUTPUT/interleaved, OUTPUT/text and OUTPUT/heldout (held-out MNIST pairs with their labels in
`KEY.cls`, never trained on), and OUTPUT/corpus.json with the sample counts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np

try:  # run as a script (data_pipelines/ on the path) or imported as data_pipelines.*
    import demo_corpus as demo
except ImportError:
    from data_pipelines import demo_corpus as demo
from mm_moe.cli import run_job
from mm_moe.data.builders.writer import prepare_output, write_shards

log = logging.getLogger("mm_moe")


@dataclass
class DemoCorpusConfig:
    output: str = "data/demo"
    heldout: int = 500  # MNIST digits kept out of training (a seeded random subset)
    crops_per_photo: int = 40
    interleaved_docs: int = 1500
    image_size: int = 28
    shard_size: int = 2000
    seed: int = 0
    overwrite: bool = False


def _pairs(cfg: DemoCorpusConfig, train_x, train_y, rng) -> list[tuple[bytes, str]]:
    """(png, caption) pairs: MNIST and sklearn digits, photo crops, faces (in that order: the
    rng draws, hence the corpus, depend on it)."""
    small_x, small_y = demo.sklearn_digits()
    pairs: list[tuple[bytes, str]] = []
    pairs += [
        (demo.to_png(im), demo.digit_caption(int(lb), rng)) for im, lb in zip(train_x, train_y)
    ]
    pairs += [
        (demo.to_png(im), demo.digit_caption(int(lb), rng, demo.SMALL_DIGIT_TEMPLATES))
        for im, lb in zip(small_x, small_y)
    ]
    pairs += [
        (demo.to_png(im), cap)
        for im, cap in demo.photo_crops(cfg.crops_per_photo, cfg.image_size, rng)
    ]
    pairs += [(demo.to_png(im), demo.FACE_TEMPLATES[rng.integers(3)]) for im in demo.faces()]
    return pairs


def _interleaved(cfg: DemoCorpusConfig, train_x, train_y, rng):
    for i in range(cfg.interleaved_docs):
        content, members = demo.interleaved_doc(train_x, train_y, rng)
        sample = {"__key__": f"{i:07d}", "json": json.dumps({"content": content})}
        sample.update(members)
        yield sample


def _heldout(held_x, held_y, rng):
    for i, (im, lb) in enumerate(zip(held_x, held_y)):
        caption = demo.digit_caption(int(lb), rng)
        yield {"__key__": f"{i:07d}", "png": demo.to_png(im), "txt": caption, "cls": str(int(lb))}


def build(cfg: DemoCorpusConfig) -> dict:
    from pathlib import Path

    rng = np.random.default_rng(cfg.seed)
    root = Path(cfg.output)
    outs = {
        name: prepare_output(str(root / name), cfg.overwrite)
        for name in ("pairs", "interleaved", "text", "heldout")
    }
    # The first draw of the seed's rng: the study corpus (build_study_corpus.py) repeats it.
    (train_x, train_y), (held_x, held_y) = demo.split_heldout(*demo.mnist(), cfg.heldout, rng)
    pairs = _pairs(cfg, train_x, train_y, rng)
    order = rng.permutation(len(pairs))
    shuffled = (
        {"__key__": f"{i:07d}", "png": pairs[j][0], "txt": pairs[j][1]} for i, j in enumerate(order)
    )
    counts = {"pairs": write_shards(shuffled, outs["pairs"], "pairs", cfg.shard_size, len(pairs))}
    counts["interleaved"] = write_shards(
        _interleaved(cfg, train_x, train_y, rng),
        outs["interleaved"],
        "interleaved",
        cfg.shard_size,
        cfg.interleaved_docs,
    )
    texts = demo.stdlib_texts()
    counts["text"] = write_shards(
        ({"__key__": f"{i:07d}", "txt": t} for i, t in enumerate(texts)),
        outs["text"],
        "text",
        cfg.shard_size,
        len(texts),
    )
    counts["heldout"] = write_shards(
        _heldout(held_x, held_y, rng), outs["heldout"], "heldout", cfg.shard_size, len(held_x)
    )
    # What the texts say, not only how many: runs keyed by corpus.json (scripts/study_moma.py)
    # see a change of caption templates as new data.
    captions = "\n".join([caption for _, caption in pairs] + texts)
    counts["texts_sha1"] = hashlib.sha1(captions.encode()).hexdigest()
    (root / "corpus.json").write_text(json.dumps(counts, indent=1))
    log.info("demo corpus in %s: %s", root, counts)
    return counts


if __name__ == "__main__":
    run_job("build_demo_corpus.py", DemoCorpusConfig, build)
