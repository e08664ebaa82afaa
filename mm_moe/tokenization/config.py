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
    # sentencepiece: <path>/text.model, trained by `python -m mm_moe.tokenization.train_text`;
    # hf: a published model's tokenizer.json or tokenizer.model in <path> (hf_text.py).
    text: Literal["utf8_bytes", "sentencepiece", "hf"] = "utf8_bytes"
    # grid_quantizer: the colour-grid stand-in (no artifact needed);
    # vq: the VQ-VAE in <path>/vq.pt, trained by `python -m mm_moe.tokenization.train_image`;
    # chameleon: Chameleon's VQGAN encoder from <path> (chameleon_vq.py).
    image: Literal["grid_quantizer", "vq", "chameleon"] = "grid_quantizer"
    # Folder of the tokenizers' artifacts (tokenizers/<name>/, or an upcycled model's
    # tokenizer/), for sentencepiece, hf, vq and chameleon.
    path: str = ""
    # A vocab.yaml fixing where text, special and image ids live (the upcycling import writes
    # one for a published model's vocabulary); empty: laid out from the tokenizers.
    vocab: str = ""
    # Side of the square every image is resized and centre-cropped to (image_preprocess.py);
    # the vq and chameleon tokenizers take their own from their artifacts.
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
        needs_path = self.text in ("sentencepiece", "hf") or self.image in ("vq", "chameleon")
        if needs_path and not self.path:
            raise UserError(
                "tokenizer.path must name the folder of the tokenizers' artifacts "
                f"(tokenizer.text={self.text}, tokenizer.image={self.image})"
            )

    def _text(self):
        if self.text == "sentencepiece":
            from mm_moe.tokenization.sentencepiece_text import SentencePieceTextTokenizer

            return SentencePieceTextTokenizer(Path(self.path) / "text.model")
        if self.text == "hf":
            from mm_moe.tokenization.hf_text import HFTextTokenizer

            return HFTextTokenizer(self.path)
        from mm_moe.tokenization.stand_ins import Utf8ByteTextTokenizer

        return Utf8ByteTextTokenizer()

    def _image(self):
        if self.image == "vq":
            from mm_moe.tokenization.vq.tokenizer import VQImageTokenizer

            return VQImageTokenizer(self.path)
        if self.image == "chameleon":
            from mm_moe.tokenization.chameleon_vq import ChameleonVQTokenizer

            return ChameleonVQTokenizer(self.path)
        from mm_moe.tokenization.stand_ins import GridQuantizerImageTokenizer

        return GridQuantizerImageTokenizer(self.image_size, self.grid, self.levels)

    def build(self) -> Tokenizers:
        text, image = self._text(), self._image()
        if self.vocab:
            vocab = Vocab.load(self.vocab)
            check_layout(vocab, text, image, f"tokenizer.vocab={self.vocab}")
        elif self.text == "sentencepiece":
            vocab = unified_vocab(text, image.codebook_size)
        elif self.text == "hf":
            vocab = appended_vocab(text.vocab_size, specials_of(text), image.codebook_size)
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


SPECIALS = ("bos", "eos", "pad", "boi", "eoi")


def specials_of(text) -> dict[str, int | None]:
    """The special ids a text tokenizer has of its own (None for those it lacks)."""
    return {name: getattr(text, name, None) for name in SPECIALS}


def appended_vocab(
    text_size: int,
    specials: dict[str, int | None],
    codebook_size: int,
    image_ids: tuple[int, ...] = (),
) -> Vocab:
    """A published vocabulary kept as it is: its own special ids where it has them, the
    missing ones appended after its `text_size` ids, then the image codes (or, where the
    model placed them itself, `image_ids`)."""
    ids = dict(specials)
    end = text_size
    for name in SPECIALS:
        if ids.get(name) is None:
            ids[name], end = end, end + 1
    offset = end if not image_ids else 0
    size = end + codebook_size if not image_ids else max(end, max(image_ids) + 1)
    return Vocab(
        text_size=text_size,
        image_offset=offset,
        image_size=codebook_size,
        size=size,
        image_ids=tuple(image_ids),
        **{name: int(ids[name]) for name in SPECIALS},
    )


def check_layout(vocab: Vocab, text, image, where: str) -> None:
    if image.codebook_size != vocab.image_size:
        raise UserError(
            f"{where}: {vocab.image_size} image codes, but the image tokenizer has "
            f"{image.codebook_size}"
        )
    if text.vocab_size > vocab.size:
        raise UserError(
            f"{where}: {vocab.size} ids, fewer than the text tokenizer's {text.vocab_size}"
        )
