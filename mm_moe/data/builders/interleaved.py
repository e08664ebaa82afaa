"""Interleaved documents from a JSONL file, one document per line.

Input line (image paths relative to `image_root`, by default the JSONL's folder):
  {"content": [{"type": "text", "text": "..."}, {"type": "image", "path": "img/a.jpg"}, ...]}
or OBELICS-style parallel lists: {"texts": ["...", null], "images": [null, "img/a.jpg"]}.
Output sample `KEY`: `KEY.json` = {"content": [..., {"type": "image", "member": "0.jpg"}]} and
the images as members `KEY.0.jpg`, `KEY.1.png`, ... (original bytes; bmp, gif, tif and tiff are
converted to RGB and stored as PNG, as build_pairs does). Documents with a missing image file, an
image Pillow cannot decode or write, a malformed line (a parallel-list position that is not
exactly one string) or no content (only blank texts) are reported by line and left out.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mm_moe.data.builders.images import READABLE, LoaderDefaults, image_member
from mm_moe.data.builders.writer import (
    prepare_output,
    remove_empty_shards,
    shard_pattern,
    write_shards,
)
from mm_moe.data.defects import SampleError
from mm_moe.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class BuildInterleavedConfig:
    input: str  # the JSONL file
    output: str
    image_root: str = ""  # where relative image paths start; default: the JSONL's folder
    prefix: str = "interleaved"
    shard_size: int = 1000
    shuffle: bool = True  # needs the lines in memory; shuffle=false streams the file
    seed: int = 0
    overwrite: bool = False


def _entries(doc: dict) -> list[tuple[str, str]]:
    if isinstance(doc.get("content"), list):
        out = []
        for entry in doc["content"]:
            kind = entry.get("type")
            value = entry.get("text") if kind == "text" else entry.get("path")
            if kind not in ("text", "image") or not isinstance(value, str):
                raise UserError(f"bad entry {entry!r}")
            out.append((kind, value))
        return out
    return _list_entries(doc.get("texts"), doc.get("images"))


def _list_entries(texts, images) -> list[tuple[str, str]]:
    """The OBELICS parallel lists as entries: each position holds exactly one string (the
    loader skips any other document as bad_json on every epoch)."""
    if not (isinstance(texts, list) and isinstance(images, list) and len(texts) == len(images)):
        raise UserError("expected 'content' or equal-length 'texts' and 'images'")
    out = []
    for i, (text, image) in enumerate(zip(texts, images)):
        kind, value = ("text", text) if text is not None else ("image", image)
        if (text is None) == (image is None) or not isinstance(value, str):
            raise UserError(
                f"position {i} must hold exactly one string, in texts or in images "
                f"(got {text!r} and {image!r})"
            )
        out.append((kind, value))
    return out


def to_sample(
    key: str, line: str, image_root: Path, defaults: LoaderDefaults | None = None
) -> dict:
    """One JSONL line as a webdataset sample; ValueError/OSError (SampleError for an image
    Pillow cannot decode) when it cannot be used."""
    doc = json.loads(line)
    sample: dict = {"__key__": key}
    content = []
    for kind, value in _entries(doc):
        if kind == "text":
            try:  # JSON may escape half of a surrogate pair ("\ud800"): no UTF-8 holds one
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise UserError(f"text {len(content)}: {exc.reason} (not UTF-8 text)") from None
            content.append({"type": "text", "text": value})
            continue
        path = Path(value) if Path(value).is_absolute() else image_root / value
        ext = path.suffix.lower().lstrip(".")
        if ext not in READABLE:
            raise UserError(f"image {value}: extension must be one of {READABLE}")
        ext, data = image_member(path.read_bytes(), ext, f"image {value}", defaults)
        member = f"{len(content)}.{ext}"
        sample[member] = data
        content.append({"type": "image", "member": member})
    if not any(e["type"] == "image" or e["text"].strip() for e in content):
        raise UserError("no content: no image and no text that is not blank")
    meta = {k: v for k, v in doc.items() if k not in ("content", "texts", "images")}
    sample["json"] = {"content": content, **({"meta": meta} if meta else {})}
    return sample


def _numbered_lines(src: Path):
    """(line number from 1, raw bytes) of the file's non-blank lines: each decoded on its own,
    so a line that is not UTF-8 is left out by its number, not the whole file."""
    with open(src, "rb") as f:
        for number, raw in enumerate(f, 1):
            if raw.strip():
                yield number, raw


def build(cfg: BuildInterleavedConfig) -> str:
    src = Path(cfg.input)
    if not src.is_file():
        raise UserError(f"input={cfg.input} is not a file")
    image_root = Path(cfg.image_root) if cfg.image_root else src.parent
    lines = list(_numbered_lines(src)) if cfg.shuffle else None
    if lines is not None:
        order = np.random.default_rng(cfg.seed).permutation(len(lines))
        lines = [lines[i] for i in order]
    out = prepare_output(cfg.output, cfg.overwrite, cfg.shard_size)
    left_out = []
    defaults = LoaderDefaults()

    def samples():
        n = 0
        for number, raw in lines if lines is not None else _numbered_lines(src):
            try:
                # utf-8-sig: a byte order mark before the first line is not JSON
                sample = to_sample(f"{n:09d}", raw.decode("utf-8-sig"), image_root, defaults)
            except UnicodeDecodeError:
                left_out.append(f"{src} line {number}: not UTF-8")
            except SampleError as exc:
                left_out.append(f"{src} line {number}: {exc.detail}")
            except (ValueError, OSError, AttributeError) as exc:
                left_out.append(f"{src} line {number}: {exc}")
            else:
                defaults.commit()
                n += 1
                yield sample
                continue
            defaults.discard()

    count = write_shards(samples(), out, cfg.prefix, cfg.shard_size, lines and len(lines), "docs")
    if left_out:
        examples = "; ".join(left_out[:5])
        log.warning("%d documents left out, e.g. %s", len(left_out), examples)
    defaults.warn()
    if not count:
        remove_empty_shards(out, cfg.prefix)
        raise UserError(f"input={cfg.input}: no usable document")
    return shard_pattern(out, cfg.prefix, count, cfg.shard_size)
