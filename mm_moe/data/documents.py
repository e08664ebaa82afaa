"""Raw samples of each shard format to documents of unified-vocabulary tokens.

A document is `bos, ..., eos`; an image inside it is `boi, codes..., eoi` (boi/eoi carry the
text modality, the codes the image modality). Formats (docs/data.md has the full schema):
- pairs: `KEY.jpg|jpeg|png|webp` + `KEY.txt` (+ `KEY.json`, ignored): caption then image, or
  image then caption (data.pair_order);
- interleaved: `KEY.json` listing text and image entries in order; each image entry names a
  member of the same sample (`KEY.0.jpg` is member "0.jpg");
- text: `KEY.txt`;
- tokens: `KEY.tokens.npy` (int, unified-vocabulary ids) + `KEY.modality.npy` (uint8), a
  whole document as written by data_pipelines/pretokenize.py.
Every defect raises SampleError; the caller decides between skipping and raising.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from mm_moe.data.decode import READ_IMAGE_EXTENSIONS, decode_image, decode_text
from mm_moe.data.defects import SampleError
from mm_moe.data.tar_reader import RawSample
from mm_moe.modality import IMAGE, TEXT
from mm_moe.tokenization.interface import Tokenizers

FORMATS = ("pairs", "interleaved", "text", "tokens")
log = logging.getLogger(__name__)


def images_left_unread(fmt: str, raw: RawSample) -> list[str]:
    """The image members of a sample that format `fmt` does not read: format text on pairs (or
    interleaved) shards would keep the captions and drop every image without a skip count."""
    if fmt != "text":
        return []
    return _image_members(raw)


def _image_members(raw: RawSample, but: tuple[str, ...] = ()) -> list[str]:
    return sorted(
        m for m in raw.members if m.rsplit(".", 1)[-1] in READ_IMAGE_EXTENSIONS and m not in but
    )


# Why a format leaves some of a sample's images unread.
UNREAD_WHY = {
    "pairs": "a pairs sample reads one image (the first of "
    + ", ".join(READ_IMAGE_EXTENSIONS)
    + "): give each image its own sample, or use format interleaved",
    "interleaved": "an interleaved sample reads the images its .json names",
    "text": "format text reads only KEY.txt; format pairs or interleaved reads images",
}


# The usual cause of ids that do not fit the run's vocabulary.
OTHER_TOKENIZER = " (were these shards pretokenized with another tokenizer?)"


@dataclass
class Document:
    tokens: np.ndarray  # [L] int32 unified-vocabulary ids
    modality: np.ndarray  # [L] uint8 modality ids


@dataclass(frozen=True)
class DecodeOptions:
    min_image_side: int
    max_aspect_ratio: float
    pair_order: str  # random | caption_first | image_first
    caption_first_prob: float
    image_cache_size: int = 0  # images whose tokens a worker keeps (LRU); 0: none


def parse_interleaved(data: bytes, what: str) -> list[tuple[str, str]]:
    """[(kind, value)] with kind "text" (value: the text) or "image" (value: member name)."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SampleError("bad_json", f"{what}: {exc}") from exc
    entries: list[tuple[str, str]] = []
    if isinstance(doc, dict) and isinstance(doc.get("content"), list):
        for i, entry in enumerate(doc["content"]):
            kind = entry.get("type") if isinstance(entry, dict) else None
            value = entry.get(kind) if kind == "text" else None
            if kind == "image":
                value = entry.get("member")
            if not isinstance(value, str):
                raise SampleError(
                    "bad_json",
                    f"{what}: content[{i}] must be {{'type': 'text', 'text': str}} or "
                    "{'type': 'image', 'member': str}",
                )
            entries.append((kind, value))
    elif isinstance(doc, dict) and isinstance(doc.get("texts"), list):
        texts, images = doc["texts"], doc.get("images")
        if not isinstance(images, list) or len(images) != len(texts):
            raise SampleError(
                "bad_json", f"{what}: 'texts' and 'images' must be equal-length lists"
            )
        for i, (text, image) in enumerate(zip(texts, images)):
            if (text is None) == (image is None):
                raise SampleError(
                    "bad_json", f"{what}: position {i} needs exactly one of text/image"
                )
            entries.append(("text", text) if text is not None else ("image", image))
        if not all(isinstance(v, str) for _, v in entries):
            raise SampleError("bad_json", f"{what}: texts and image members must be strings")
    else:
        raise SampleError("bad_json", f"{what}: expected an object with 'content' (or 'texts')")
    if not entries:
        raise SampleError("empty_text", f"{what}: the document has no entries")
    for i, (kind, value) in enumerate(entries):
        try:  # JSON may escape half of a surrogate pair ("\ud800"): no UTF-8 text holds one
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise SampleError("bad_utf8", f"{what}: entry {i} ({kind}): {exc.reason}") from None
    return entries


class DocumentBuilder:
    def __init__(self, tokenizers: Tokenizers, options: DecodeOptions):
        self.tok, self.opt, self.vocab = tokenizers, options, tokenizers.vocab
        # Encoded images by the digest of their bytes: a corpus read for several epochs is
        # encoded once per worker (encoding is deterministic, so resume stays exact).
        self._images: OrderedDict[bytes, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._warned_unread = False

    def build(self, fmt: str, raw: RawSample, rng: np.random.Generator) -> Document:
        assert fmt in FORMATS, fmt
        return getattr(self, f"_from_{fmt}")(raw, rng)

    # ---- pieces ----
    def _encode_text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(self.tok.text.encode(text), dtype=np.int32)
        return ids, np.full(len(ids), TEXT, dtype=np.uint8)

    def _encode_image(self, data: bytes, what: str) -> tuple[np.ndarray, np.ndarray]:
        if self.opt.image_cache_size <= 0:
            return self._encode_image_uncached(data, what)
        key = hashlib.blake2b(data, digest_size=16).digest()
        if key in self._images:
            self._images.move_to_end(key)
            return self._images[key]
        encoded = self._encode_image_uncached(data, what)
        for array in encoded:
            array.flags.writeable = False  # shared by every document that holds the image
        self._images[key] = encoded
        if len(self._images) > self.opt.image_cache_size:
            self._images.popitem(last=False)
        return encoded

    def _encode_image_uncached(self, data: bytes, what: str) -> tuple[np.ndarray, np.ndarray]:
        image = decode_image(data, what, self.opt.min_image_side, self.opt.max_aspect_ratio)
        codes = self.vocab.image_token_ids(self.tok.image.encode(image))
        ids = np.concatenate([[self.vocab.boi], codes, [self.vocab.eoi]]).astype(np.int32)
        modality = np.full(len(ids), IMAGE, dtype=np.uint8)
        modality[[0, -1]] = TEXT
        return ids, modality

    def _document(self, parts: list[tuple[np.ndarray, np.ndarray]]) -> Document:
        bos = (np.array([self.vocab.bos], np.int32), np.array([TEXT], np.uint8))
        eos = (np.array([self.vocab.eos], np.int32), np.array([TEXT], np.uint8))
        parts = [bos, *parts, eos]
        return Document(
            np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        )

    def _member_text(self, raw: RawSample, ext: str) -> str:
        if ext not in raw.members:
            raise SampleError("missing_text", f"no .{ext} member (members: {sorted(raw.members)})")
        return decode_text(raw.members[ext], f"{raw.key}.{ext}")

    # ---- formats ----
    def _from_pairs(self, raw: RawSample, rng: np.random.Generator) -> Document:
        ext = next((e for e in READ_IMAGE_EXTENSIONS if e in raw.members), None)
        if ext is None:
            raise SampleError(
                "missing_image",
                f"no image member (members: {sorted(raw.members)}; a pairs sample's image is "
                f"KEY.{'|'.join(READ_IMAGE_EXTENSIONS)}, and a key ends at its first dot)",
            )
        self._warn_unread(raw, "pairs", (ext,))
        caption = self._encode_text(self._member_text(raw, "txt"))
        image = self._encode_image(raw.members[ext], f"{raw.key}.{ext}")
        if self.opt.pair_order == "random":
            caption_first = bool(rng.random() < self.opt.caption_first_prob)
        else:
            caption_first = self.opt.pair_order == "caption_first"
        return self._document([caption, image] if caption_first else [image, caption])

    def _warn_unread(self, raw: RawSample, fmt: str, read: tuple[str, ...]) -> None:
        """Once per builder (a data worker): a sample with image members its format does not
        read (not a defect: the sample is used)."""
        if not self._warned_unread and (unread := _image_members(raw, read)):
            self._warned_unread = True
            log.warning(
                "format %s: sample %s holds images it does not read (%s): %s",
                fmt,
                raw.key,
                ", ".join(f"{raw.key}.{m}" for m in unread),
                UNREAD_WHY[fmt],
            )

    def _from_text(self, raw: RawSample, rng: np.random.Generator) -> Document:
        self._warn_unread(raw, "text", ())
        return self._document([self._encode_text(self._member_text(raw, "txt"))])

    def _from_interleaved(self, raw: RawSample, rng: np.random.Generator) -> Document:
        if "json" not in raw.members:
            raise SampleError("missing_text", f"no .json member (members: {sorted(raw.members)})")
        parts, named = [], []
        for kind, value in parse_interleaved(raw.members["json"], f"{raw.key}.json"):
            if kind == "text":
                if value.strip():  # an empty paragraph is layout, not a defect
                    parts.append(self._encode_text(value))
                continue
            member = value.lower()
            if member not in raw.members:
                raise SampleError("missing_image", f"image member {raw.key}.{value} is absent")
            named.append(member)
            parts.append(self._encode_image(raw.members[member], f"{raw.key}.{value}"))
        self._warn_unread(raw, "interleaved", tuple(named))
        if not parts:
            raise SampleError("empty_text", f"{raw.key}.json has no text and no image")
        return self._document(parts)

    def _from_tokens(self, raw: RawSample, rng: np.random.Generator) -> Document:
        arrays = []
        for name in ("tokens.npy", "modality.npy"):
            if name not in raw.members:
                raise SampleError(
                    "bad_tokens", f"no {name} member (members: {sorted(raw.members)})"
                )
            try:
                arrays.append(np.load(io.BytesIO(raw.members[name]), allow_pickle=False))
            except (ValueError, OSError, EOFError) as exc:
                raise SampleError("bad_tokens", f"{raw.key}.{name}: {exc}") from exc
        tokens, modality = arrays
        if tokens.ndim != 1 or tokens.shape != modality.shape or tokens.size == 0:
            raise SampleError(
                "bad_tokens", f"shapes {tokens.shape} and {modality.shape} must be equal, 1-D"
            )
        if tokens.dtype.kind not in "iu" or modality.dtype.kind not in "iu":
            raise SampleError("bad_tokens", f"dtypes {tokens.dtype}, {modality.dtype} not integer")
        if tokens.min() < 0 or tokens.max() >= self.vocab.size:
            raise SampleError(
                "bad_tokens", f"ids outside the vocabulary [0, {self.vocab.size}){OTHER_TOKENIZER}"
            )
        is_code = self.vocab.is_image(tokens)
        if (
            not np.array_equal(modality == IMAGE, is_code)
            or not np.isin(modality, (TEXT, IMAGE)).all()
        ):
            raise SampleError(
                "bad_tokens", f"modality ids disagree with the image-code range{OTHER_TOKENIZER}"
            )
        return Document(tokens.astype(np.int32), modality.astype(np.uint8))
