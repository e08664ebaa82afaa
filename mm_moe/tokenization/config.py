"""Tokenizer configuration (the `tokenizer` config group): which text and image tokenizers
build the unified vocabulary that data, model and sampling share."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mm_moe.errors import UserError
from mm_moe.tokenization.interface import Tokenizers
from mm_moe.tokenization.vocab import Vocab

VOCAB_FILE = "vocab.yaml"
log = logging.getLogger(__name__)


@dataclass
class TokenizerConfig:
    # utf8_bytes: the 256-id byte-level stand-in (no artifact needed);
    # sentencepiece: <path>/text.model, trained by `python -m mm_moe.tokenization.train_text`;
    # hf: a published model's tokenizer.json or tokenizer.model in <path> (hf_text.py);
    # none: no text tokenizer (an upcycled published model without its tokenizer files): text
    # comes as ids (`format: tokens` shards) laid out by tokenizer.vocab.
    text: Literal["utf8_bytes", "sentencepiece", "hf", "none"] = "utf8_bytes"
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
    # Checkpoints and token shards record a digest of the tokenizers' files (digest.py);
    # resume, generate and load_pretrained refuse a tokenizer whose files changed since
    # (moved but identical is fine). true: go on with a warning.
    allow_changed: bool = False

    def __post_init__(self) -> None:
        for name in ("image_size", "grid", "levels"):
            if getattr(self, name) < 1:
                raise UserError(f"tokenizer.{name}={getattr(self, name)} must be positive")
        if self.image_size % self.grid:
            raise UserError(
                f"tokenizer.image_size={self.image_size} must be a multiple of "
                f"tokenizer.grid={self.grid}"
            )
        if self.text == "none" and not self.vocab:
            raise UserError(
                "tokenizer.text=none needs tokenizer.vocab: the vocab.yaml that lays out the "
                "model's ids (an upcycle writes one beside its checkpoint)"
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
        if self.text == "none":
            from mm_moe.tokenization.stand_ins import NoTextTokenizer

            return NoTextTokenizer()
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

    def refuse_raw_text(self, sources: list[tuple[str, str]]) -> None:
        """Without a text tokenizer only pre-tokenized shards can be read: refuse the
        `(format key, format)` sources that hold raw text."""
        raw = [f"{key}={fmt}" for key, fmt in sources if fmt != "tokens"]
        if self.text == "none" and raw:
            raise UserError(
                f"{', '.join(raw)}: tokenizer.text=none (the upcycle source had no tokenizer "
                "files) cannot tokenize raw text or captions. Give shards of the model's ids "
                "(format: tokens), or the source model's tokenizer with tokenizer.text=hf "
                "tokenizer.path=FOLDER (its tokenizer.json or tokenizer.model)"
            )

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
    if ids.get("pad") is not None and ids["pad"] in (ids.get(k) for k in SPECIALS if k != "pad"):
        # Llama-family tokenizers often set pad = eos (or bos): padding would then mask that
        # token out of the loss, so padding takes an id of its own instead (no row of the
        # published model is used for it).
        log.info(
            "the tokenizer's pad id %d is also another special token's: pad gets an id of its own",
            ids["pad"],
        )
        ids["pad"] = None
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


# ---- The tokenizer trainers (`python -m mm_moe.tokenization.train_text` / `train_image`:
# mm_moe/train_text_tokenizer.py, mm_moe/train_image_tokenizer.py). ----
# 262 fixed pieces (256 bytes, 6 specials), then one per character the text needs.
MIN_VOCAB_SIZE = 300


@dataclass
class TrainTextConfig:
    output: str = "tokenizers/demo"
    # Shard patterns, folders or files (see data.sources urls) to read text from.
    sources: list[str] = field(default_factory=list)
    # Plain UTF-8 text files, one or more documents each.
    files: list[str] = field(default_factory=list)
    vocab_size: int = 4096
    model_type: Literal["bpe", "unigram"] = "bpe"
    # Read at most this many characters (0: all).
    max_chars: int = 0
    # Replace a text.model already in `output` (false: refuse, naming the folder).
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.sources and not self.files:
            raise UserError("give text to train on: sources=[SHARDS...] and/or files=[...]")
        if self.vocab_size < MIN_VOCAB_SIZE:
            # 262 fixed pieces, then one per character the text needs: the text sets the real
            # minimum, which training names when vocab_size falls short of it.
            raise UserError(
                f"vocab_size={self.vocab_size} must be at least 300 (256 byte-fallback "
                "pieces and 6 special pieces, then one per character of the text: most "
                "texts need more, and training names how many)"
            )


# The VQ-VAE's GroupNorm groups (vq/model.py): vq.channels must divide into them.
GROUP_NORM_GROUPS = 8


@dataclass
class VQConfig:
    # Images are RGB resolution x resolution; the latent grid is resolution / downsample.
    resolution: int = 28
    downsample: int = 4
    codebook_size: int = 256
    code_dim: int = 32
    channels: int = 64
    # EMA codebook decay, commitment weight (VQ-VAE), dead-code restart threshold (uses/step).
    ema_decay: float = 0.99
    commitment: float = 0.25
    restart_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.downsample < 1 or self.downsample & (self.downsample - 1):
            raise UserError(f"vq.downsample={self.downsample} must be a power of two")
        if self.resolution % self.downsample:
            raise UserError(
                f"vq.resolution={self.resolution} must be a multiple of "
                f"vq.downsample={self.downsample}"
            )
        for key, value, least in (
            ("codebook_size", self.codebook_size, 2),
            ("code_dim", self.code_dim, 1),
            ("channels", self.channels, 1),
        ):
            if value < least:
                raise UserError(f"vq.{key}={value} must be >= {least}")
        if not 0 <= self.ema_decay < 1:
            raise UserError(
                f"vq.ema_decay={self.ema_decay} must be in [0, 1) (the weight of the codebook's "
                "running average; 0.99 keeps 99% of it each step)"
            )
        if not self.commitment >= 0 or not self.restart_threshold >= 0:
            raise UserError(
                f"vq.commitment={self.commitment} and vq.restart_threshold="
                f"{self.restart_threshold} must be >= 0"
            )
        if self.channels % GROUP_NORM_GROUPS:
            raise UserError(
                f"vq.channels={self.channels} must be a multiple of {GROUP_NORM_GROUPS} (the "
                f"VQ-VAE normalises its channels in {GROUP_NORM_GROUPS} groups), e.g. "
                f"{max(GROUP_NORM_GROUPS, self.channels // GROUP_NORM_GROUPS * GROUP_NORM_GROUPS)}"
            )

    @property
    def grid(self) -> int:
        return self.resolution // self.downsample

    @property
    def tokens_per_image(self) -> int:
        return self.grid * self.grid


@dataclass
class TrainImageConfig:
    output: str = "tokenizers/demo"
    sources: list[str] = field(default_factory=list)
    # Held-out shards for PSNR and codebook usage (never trained on).
    heldout: list[str] = field(default_factory=list)
    vq: VQConfig = field(default_factory=VQConfig)
    steps: int = 500
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    # Use at most this many training images (0: all).
    max_images: int = 0
    threads: int = 0
    # Replace a vq.pt, vq.yaml or metrics.json already in `output` (false: refuse).
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.sources:
            raise UserError("sources=[SHARDS...] must name the images to train on")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise UserError("steps and batch_size must be >= 1, lr > 0")
        if self.max_images < 0 or self.threads < 0:
            raise UserError(
                f"max_images={self.max_images} and threads={self.threads} must be >= 0 "
                "(0: every image, torch's default threads)"
            )
