"""Texts and images read from webdataset shards, for training the tokenizers.

Bad samples (undecodable text or images) are skipped: tokenizer training only needs a clean
sample of the data, and the training pipeline counts defects itself. Once read through, a
warning says how many were left out and names one. A cut or unreadable shard is an error naming
it (the corpus would be quietly smaller).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from PIL import Image

from mm_moe.data.decode import READ_IMAGE_EXTENSIONS, decode_image, decode_text
from mm_moe.data.documents import parse_interleaved
from mm_moe.data.shards import expand_urls
from mm_moe.data.tar_reader import iter_whole_shard

log = logging.getLogger(__name__)


def _left_out(skipped: list[str], what: str) -> None:
    if skipped:
        log.warning(
            "%d %s could not be decoded and were left out, e.g. %s", len(skipped), what, skipped[0]
        )


def _samples(urls: list[str], key: str):
    for shard in expand_urls(urls, key):
        for sample in iter_whole_shard(shard, key):
            if sample.defect is None:
                yield shard, sample


def iter_texts(urls: list[str], key: str = "sources") -> Iterator[str]:
    """Captions, text samples and the text entries of interleaved documents."""
    skipped: list[str] = []
    for shard, sample in _samples(urls, key):
        what = f"{shard}:{sample.key}"
        try:
            if "txt" in sample.members:
                yield decode_text(sample.members["txt"], what)
            elif "json" in sample.members:
                for kind, value in parse_interleaved(sample.members["json"], what):
                    if kind == "text":
                        yield value
        except Exception as exc:  # noqa: BLE001 - skip whatever does not decode
            skipped.append(f"{what} ({exc})")
    _left_out(skipped, "text samples")


def iter_images(urls: list[str], key: str = "sources", min_side: int = 8) -> Iterator[Image.Image]:
    """Every decodable image member of the shards (pairs and interleaved alike)."""
    skipped: list[str] = []
    for shard, sample in _samples(urls, key):
        for ext, data in sample.members.items():
            if ext.rsplit(".", 1)[-1] not in READ_IMAGE_EXTENSIONS:
                continue
            try:
                yield decode_image(data, f"{shard}:{sample.key}.{ext}", min_side, 100.0)
            except Exception as exc:  # noqa: BLE001 - skip undecodable images
                skipped.append(str(exc))
    _left_out(skipped, "images")
