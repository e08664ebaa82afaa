"""Tokenizer configuration (the `tokenizer` config group): which text and image tokenizers
build the unified vocabulary that data, model and sampling share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mm_moe.tokenization.interface import Tokenizers
from mm_moe.tokenization.vocab import Vocab


@dataclass
class TokenizerConfig:
    # utf8_bytes: the 256-id byte-level stand-in (no artifact needed).
    text: Literal["utf8_bytes"] = "utf8_bytes"
    # grid_quantizer: the colour-grid stand-in (no artifact needed).
    image: Literal["grid_quantizer"] = "grid_quantizer"
    # Side of the square every image is resized and centre-cropped to (image_preprocess.py).
    image_size: int = 32
    # grid_quantizer: codes per image side (tokens per image = grid^2).
    grid: int = 4
    # grid_quantizer: colour levels per channel (codebook size = levels^3).
    levels: int = 4

    def __post_init__(self) -> None:
        for name in ("image_size", "grid", "levels"):
            if getattr(self, name) < 1:
                raise ValueError(f"tokenizer.{name}={getattr(self, name)} must be positive")
        if self.image_size % self.grid:
            raise ValueError(
                f"tokenizer.image_size={self.image_size} must be a multiple of "
                f"tokenizer.grid={self.grid}"
            )

    def build(self) -> Tokenizers:
        from mm_moe.tokenization.stand_ins import (
            GridQuantizerImageTokenizer,
            Utf8ByteTextTokenizer,
        )

        text = Utf8ByteTextTokenizer()
        image = GridQuantizerImageTokenizer(self.image_size, self.grid, self.levels)
        return Tokenizers(text, image, Vocab.from_sizes(text.vocab_size, image.codebook_size))
