"""Image-text pairs from a folder: every image with a caption file of the same stem.

`photos/cat.jpg` + `photos/cat.txt` (or `.TXT`) becomes sample `000000012` with members `.jpg`
(the original bytes), `.txt` (the caption) and `.json` (`{"path": "photos/cat.jpg"}`), as
img2dataset writes them. Images in other formats Pillow reads (bmp, gif, tif, tiff) are
converted to RGB (the loader's policy) and stored as PNG. Images without a caption, images
Pillow cannot decode or write, and captions that are not UTF-8 or hold only whitespace are
reported and left out (the loader would skip them on every epoch). A UTF-8 byte order mark
before a caption is dropped. Images the loader's default size filters would skip are stored
and said (`LoaderDefaults`).
"""

from __future__ import annotations

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
class BuildPairsConfig:
    input: str  # a folder searched recursively for images with same-stem .txt captions
    output: str  # the shard folder (must be empty unless overwrite=true)
    prefix: str = "pairs"
    shard_size: int = 1000  # samples per shard
    shuffle: bool = True  # shuffle once here: the reader streams shards in order
    seed: int = 0
    overwrite: bool = False


def find_pairs(folder: Path) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """(image, caption) paths in sorted order, and the images that have no caption. Extensions
    in any case, as cameras and Windows tools write them (`IMG_1.JPG` + `IMG_1.TXT`)."""
    pairs, orphans = [], []
    suffixes = {f".{e}" for e in READABLE}
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    captions: dict[Path, Path] = {}
    for path in files:
        if path.suffix.lower() == ".txt":  # .txt first where both cases exist (sorted: .TXT)
            stem = path.with_suffix("")
            if stem not in captions or path.suffix == ".txt":
                captions[stem] = path
    for image in (p for p in files if p.suffix.lower() in suffixes):
        caption = captions.get(image.with_suffix(""))
        if caption is not None:
            pairs.append((image, caption))
        else:
            orphans.append(image)
    return pairs, orphans


def read_caption(caption: Path) -> str:
    """The caption's text without a UTF-8 byte order mark or surrounding whitespace."""
    return caption.read_text(encoding="utf-8-sig").strip()


def _usable_captions(pairs: list[tuple[Path, Path]]) -> list[tuple[Path, Path]]:
    """The pairs whose caption is UTF-8 and not blank; the others are reported and left out (as
    build_text leaves out such files), not stored with replacement characters no later check can
    see, nor as empty captions the loader skips (empty_text) on every epoch."""
    kept, bad, empty = [], [], []
    for image, caption in pairs:
        try:
            text = read_caption(caption)
        except UnicodeDecodeError:
            bad.append(caption)
            continue
        (kept if text else empty).append((image, caption))
    if bad:
        log.warning("%d captions are not UTF-8 and are left out, e.g. %s", len(bad), bad[0])
    if empty:
        log.warning("%d captions are empty and are left out, e.g. %s", len(empty), empty[0][1])
    return kept


def _sample(key: str, image: Path, caption: Path, root: Path, defaults: LoaderDefaults) -> dict:
    """The pair as a webdataset sample; SampleError when Pillow cannot decode or write the
    image."""
    ext = image.suffix.lower().lstrip(".")
    ext, data = image_member(image.read_bytes(), ext, str(image), defaults)
    return {
        "__key__": key,
        ext: data,
        "txt": read_caption(caption),  # checked by _usable_captions
        "json": {"path": str(image.relative_to(root))},
    }


def build(cfg: BuildPairsConfig) -> str:
    root = Path(cfg.input)
    if not root.is_dir():
        raise UserError(f"input={cfg.input} is not a folder")
    pairs, orphans = find_pairs(root)
    if orphans:
        log.warning(
            "%d images have no caption file and are left out, e.g. %s", len(orphans), orphans[0]
        )
    pairs = _usable_captions(pairs)
    if not pairs:
        raise UserError(
            f"input={cfg.input} holds no image with a same-stem, non-empty UTF-8 .txt caption"
        )
    out = prepare_output(cfg.output, cfg.overwrite, cfg.shard_size)
    if cfg.shuffle:
        order = np.random.default_rng(cfg.seed).permutation(len(pairs))
        pairs = [pairs[i] for i in order]
    undecodable = []
    defaults = LoaderDefaults()

    def samples():
        n = 0
        for image, caption in pairs:
            try:
                sample = _sample(f"{n:09d}", image, caption, root, defaults)
            except SampleError as error:
                undecodable.append(error.detail)
                defaults.discard()
                continue
            except OSError as error:  # unreadable file: one left out, not a partly written tar
                undecodable.append(f"{image}: {error}")
                defaults.discard()
                continue
            defaults.commit()
            n += 1
            yield sample

    count = write_shards(samples(), out, cfg.prefix, cfg.shard_size, len(pairs), "pairs")
    if undecodable:
        n, example = len(undecodable), undecodable[0]
        log.warning("%d images cannot be decoded and are left out, e.g. %s", n, example)
    defaults.warn()
    if not count:
        remove_empty_shards(out, cfg.prefix)
        raise UserError(f"input={cfg.input}: no image that Pillow can decode")
    return shard_pattern(out, cfg.prefix, count, cfg.shard_size)
