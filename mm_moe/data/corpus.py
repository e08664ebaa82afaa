"""Texts and images read from webdataset shards, for training the tokenizers.

Bad samples (undecodable text or images) are skipped: tokenizer training only needs a clean
sample of the data, and the training pipeline counts defects itself. A cut or unreadable shard
is an error naming it (the corpus would be quietly smaller).
"""

from __future__ import annotations

from collections.abc import Iterator

from PIL import Image

from mm_moe.data.decode import IMAGE_EXTENSIONS, decode_image, decode_text
from mm_moe.data.documents import parse_interleaved
from mm_moe.data.shards import expand_urls
from mm_moe.data.tar_reader import iter_whole_shard


def _samples(urls: list[str], key: str):
    for shard in expand_urls(urls, key):
        for sample in iter_whole_shard(shard, key):
            if sample.defect is None:
                yield shard, sample


def iter_texts(urls: list[str], key: str = "sources") -> Iterator[str]:
    """Captions, text samples and the text entries of interleaved documents."""
    for shard, sample in _samples(urls, key):
        what = f"{shard}:{sample.key}"
        try:
            if "txt" in sample.members:
                yield decode_text(sample.members["txt"], what)
            elif "json" in sample.members:
                for kind, value in parse_interleaved(sample.members["json"], what):
                    if kind == "text":
                        yield value
        except Exception:  # noqa: BLE001 - skip whatever does not decode
            continue


def iter_images(urls: list[str], key: str = "sources", min_side: int = 8) -> Iterator[Image.Image]:
    """Every decodable image member of the shards (pairs and interleaved alike)."""
    for shard, sample in _samples(urls, key):
        for ext, data in sample.members.items():
            if ext.rsplit(".", 1)[-1] not in IMAGE_EXTENSIONS:
                continue
            try:
                yield decode_image(data, f"{shard}:{sample.key}.{ext}", min_side, 100.0)
            except Exception:  # noqa: BLE001 - skip undecodable images
                continue
