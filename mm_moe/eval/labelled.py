"""Labelled images from webdataset shards: samples with an image member and a `cls` member
(the class index as text), e.g. the demo corpus's held-out digits."""

from __future__ import annotations

import io

from PIL import Image

from mm_moe.errors import UserError

IMAGE_MEMBERS = ("png", "jpg", "jpeg", "webp")


def labelled_images(
    urls: str | list[str], limit: int, key: str, num_classes: int
) -> list[tuple[Image.Image, int]]:
    """The first `limit` (image, class) pairs of the shards, in shard order."""
    from mm_moe.data.shards import expand_urls
    from mm_moe.data.tar_reader import iter_raw_samples

    out: list[tuple[Image.Image, int]] = []
    for shard in expand_urls(urls, key):
        for sample in iter_raw_samples(shard):
            member = next((m for m in IMAGE_MEMBERS if m in sample.members), None)
            if member is None or "cls" not in sample.members:
                continue
            label = int(sample.members["cls"].decode().strip())
            if not 0 <= label < num_classes:
                raise UserError(
                    f"{key}: {shard} holds class {label}, but the config names {num_classes} "
                    "labels (eval.zero_shot.labels)"
                )
            image = Image.open(io.BytesIO(sample.members[member]))
            image.load()
            out.append((image, label))
            if len(out) >= limit:
                return out
    if not out:
        raise UserError(f"{key}: no samples with an image and a `cls` member in {urls}")
    return out
