"""Labelled images from webdataset shards: samples with an image member and a `cls` member
(the class index as text), e.g. the demo corpus's held-out digits."""

from __future__ import annotations

import io

from PIL import Image

from mm_moe.data.decode import pillow_error
from mm_moe.errors import UserError

IMAGE_MEMBERS = ("png", "jpg", "jpeg", "webp")


# No data.on_error here (like a cut shard, iter_whole_shard): a defective sample is an error
# naming it, since skipping would score the evaluation on another set than the one named.
def _label(raw: bytes, where: str, num_classes: int) -> int:
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        label = int(text)
    except ValueError:
        label = None
    if label is None or not 0 <= label < num_classes:
        raise UserError(
            f"{where}: the `cls` member holds {text[:40]!r}; it must be a class index in "
            f"[0, {num_classes}) for the {num_classes} labels the config names "
            "(eval.zero_shot.labels)"
        )
    return label


def _image(raw: bytes, where: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(
            f"{where} cannot be read as an image ({pillow_error(exc)}); a labelled "
            f"sample holds an image member ({', '.join(IMAGE_MEMBERS)}) Pillow reads"
        ) from exc
    return image


def labelled_images(
    urls: str | list[str], limit: int, key: str, num_classes: int
) -> list[tuple[Image.Image, int]]:
    """The first `limit` (image, class) pairs of the shards, in shard order."""
    from mm_moe.data.shards import expand_urls
    from mm_moe.data.tar_reader import iter_whole_shard

    out: list[tuple[Image.Image, int]] = []
    for shard in expand_urls(urls, key):
        for sample in iter_whole_shard(shard, key):
            member = next((m for m in IMAGE_MEMBERS if m in sample.members), None)
            if member is None or "cls" not in sample.members:
                continue
            where = f"{key}: {shard}, sample {sample.key!r}"
            label = _label(sample.members["cls"], where, num_classes)
            out.append((_image(sample.members[member], f"{where}.{member}"), label))
            if len(out) >= limit:
                return out
    if not out:
        raise UserError(f"{key}: no samples with an image and a `cls` member in {urls}")
    return out
