"""Tokenizer configuration (the `tokenizer` config group): which text and image tokenizers
build the unified vocabulary that data, model and sampling share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mm_moe.errors import UserError
from mm_moe.tokenization.interface import Tokenizers
from mm_moe.tokenization.vocab import Vocab

VOCAB_FILE = "vocab.yaml"


@dataclass
class TokenizerConfig:
    # utf8_bytes: the 256-id byte-level stand-in (no artifact needed);
    # sentencepiece: <path>/text.model, trained by `python -m mm_moe.tokenization.train_text`.
    text: Literal["utf8_bytes", "sentencepiece"] = "utf8_bytes"
    # grid_quantizer: the colour-grid stand-in (no artifact needed);
    # vq: the VQ-VAE in <path>/vq.pt, trained by `python -m mm_moe.tokenization.train_image`.
    image: Literal["grid_quantizer", "vq"] = "grid_quantizer"
    # Folder of the trained artifacts (tokenizers/<name>/), for sentencepiece and vq.
    path: str = ""
    # Side of the square every image is resized and centre-cropped to (image_preprocess.py);
    # the vq tokenizer takes its own from its artifact.
    image_size: int = 32
    # grid_quantizer: codes per image side (tokens per image = grid^2).
    grid: int = 4
    # grid_quantizer: colour levels per channel (codebook size = levels^3).
    levels: int = 4

    def __post_init__(self) -> None:
        for name in ("image_size", "grid", "levels"):
            if getattr(self, name) < 1:
                raise UserError(f"tokenizer.{name}={getattr(self, name)} must be positive")
        if self.image_size % self.grid:
            raise UserError(
                f"tokenizer.image_size={self.image_size} must be a multiple of "
                f"tokenizer.grid={self.grid}"
            )
        if (self.text == "sentencepiece" or self.image == "vq") and not self.path:
            raise UserError(
                "tokenizer.path must name the folder of the trained tokenizers "
                "(tokenizers/<name>/) when tokenizer.text=sentencepiece or tokenizer.image=vq"
            )

    def build(self) -> Tokenizers:
        from mm_moe.tokenization.stand_ins import (
            GridQuantizerImageTokenizer,
            Utf8ByteTextTokenizer,
        )

        if self.text == "sentencepiece":
            from mm_moe.tokenization.sentencepiece_text import SentencePieceTextTokenizer

            text = SentencePieceTextTokenizer(Path(self.path) / "text.model")
        else:
            text = Utf8ByteTextTokenizer()
        if self.image == "vq":
            from mm_moe.tokenization.vq.tokenizer import VQImageTokenizer

            image = VQImageTokenizer(self.path)
        else:
            image = GridQuantizerImageTokenizer(self.image_size, self.grid, self.levels)
        if self.text == "sentencepiece":
            vocab = unified_vocab(text, image.codebook_size)
        else:
            vocab = Vocab.from_sizes(text.vocab_size, image.codebook_size)
        return Tokenizers(text, image, vocab)


def unified_vocab(text, codebook_size: int) -> Vocab:
    """Sentencepiece's own ids (its specials included), then the image codebook."""
    return Vocab(
        text_size=text.vocab_size,
        image_offset=text.vocab_size,
        image_size=codebook_size,
        bos=text.bos,
        eos=text.eos,
        pad=text.pad,
        boi=text.boi,
        eoi=text.eoi,
        size=text.vocab_size + codebook_size,
    )
