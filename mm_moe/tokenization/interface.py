"""The one interface data, model and sampling use to turn text and images into token ids.

Implementations live beside this file: the deterministic stand-ins (`stand_ins.py`), the trained
sentencepiece and VQ tokenizers, a published model's text tokenizer (`hf_text.py`) and
Chameleon's VQGAN (`chameleon_vq.py`). Anything that satisfies these protocols plugs in through
`TokenizerConfig.build()` (mm_moe/tokenization/config.py).

Ids from `TextTokenizer.encode` are in [0, vocab_size); codes from `ImageTokenizer.encode` are
in [0, codebook_size). `Vocab` places both in the unified vocabulary (`image_token_ids`), next
to bos/eos/pad/boi/eoi.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from mm_moe.errors import UserError
from mm_moe.tokenization.vocab import Vocab


@runtime_checkable
class TextTokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@runtime_checkable
class ImageTokenizer(Protocol):
    codebook_size: int
    tokens_per_image: int

    def encode(self, image: Image.Image) -> np.ndarray:
        """[tokens_per_image] codes in [0, codebook_size), raster order. The image may have any
        size and mode; implementations apply `image_preprocess.preprocess` themselves."""
        ...

    def decode(self, codes: np.ndarray) -> Image.Image: ...


def encode_images(image_tok: ImageTokenizer, images: list, batch: int = 256) -> list[np.ndarray]:
    """`encode` of each image; in batches where the tokenizer has `encode_batch` (a forward per
    image costs many times its share of a batched one)."""
    if not hasattr(image_tok, "encode_batch"):
        return [image_tok.encode(im) for im in images]
    return [
        c
        for i in range(0, len(images), batch)
        for c in image_tok.encode_batch(images[i : i + batch])
    ]


def decode_images(image_tok: ImageTokenizer, codes: list, batch: int = 256) -> list:
    """`decode` of each code sequence; batched like `encode_images`."""
    if not hasattr(image_tok, "decode_batch"):
        return [image_tok.decode(c) for c in codes]
    return [
        im
        for i in range(0, len(codes), batch)
        for im in image_tok.decode_batch(codes[i : i + batch])
    ]


@dataclass(frozen=True)
class Tokenizers:
    """Both tokenizers and the unified vocabulary they define, built together so they agree."""

    text: TextTokenizer
    image: ImageTokenizer
    vocab: Vocab

    def __post_init__(self) -> None:
        assert self.vocab.size >= self.text.vocab_size
        assert self.vocab.image_size == self.image.codebook_size

    def text_ids(self, text: str) -> list[int]:
        """Vocabulary ids of a text (no special tokens)."""
        return list(self.text.encode(text))

    def image_token_ids(self, image: Image.Image | str | Path | np.ndarray) -> np.ndarray:
        """Vocabulary ids of an image's codes, raster order, without begin/end-of-image. The
        image: a PIL image, a file Pillow reads, or an H x W (x C) uint8 array."""
        return self.vocab.image_token_ids(self.image.encode(as_image(image)))


def as_image(image) -> Image.Image:
    """A PIL image from what a user may hold, or a UserError saying what is taken."""
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as opened:
                opened.load()
                image = opened.copy()
        except (OSError, ValueError) as exc:
            raise UserError(
                f"image {image} cannot be read: {exc.__class__.__name__}: {exc}"
            ) from None
    elif isinstance(image, np.ndarray):
        try:
            image = Image.fromarray(image)
        except (TypeError, ValueError) as exc:
            raise UserError(
                f"an image array must be H x W (x 3 or 4) uint8; got shape {image.shape}, "
                f"dtype {image.dtype} ({exc})"
            ) from None
    elif not isinstance(image, Image.Image):
        raise UserError(
            f"an image is a PIL image, a path to one or an H x W (x C) uint8 array, not a "
            f"{type(image).__name__}"
        )
    if min(image.size) == 0:
        raise UserError(f"the image is {image.size[0]}x{image.size[1]}: it has no pixels")
    return image
