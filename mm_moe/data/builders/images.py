"""Image bytes for a shard member, shared by the pairs and interleaved builders.

Formats the loader reads (jpg, jpeg, png, webp) keep their original bytes. Other formats Pillow
reads (bmp, gif, tif, tiff) are converted by the loader's one RGB policy
(mm_moe/tokenization/image_preprocess.py `to_rgb`, applied by `decode_image`) and stored as PNG:
Pillow cannot write every mode as PNG (32-bit `I`, CMYK), and RGB is what the loader makes of
them anyway.
"""

from __future__ import annotations

import io
import logging

from mm_moe.data.config import DataConfig
from mm_moe.data.decode import (
    IMAGE_EXTENSIONS,
    READ_IMAGE_EXTENSIONS,
    decode_image,
    pillow_error,
    size_problem,
)
from mm_moe.data.defects import SampleError

log = logging.getLogger(__name__)
READABLE = READ_IMAGE_EXTENSIONS  # the extensions the builders take (the others become PNG)


class LoaderDefaults:
    """The stored images that training with the default `data.min_image_side` and
    `data.max_aspect_ratio` would skip on every epoch: stored all the same (those keys may be
    set lower), and said once at the end, with the keys that would take them. A sample's
    images count once it is stored (`commit`); those of a sample left out do not (`discard`)."""

    def __init__(self):
        self.min_side = DataConfig.min_image_side
        self.max_aspect_ratio = DataConfig.max_aspect_ratio
        self.small: list[str] = []
        self.elongated: list[str] = []
        self.stored = 0
        self._pending: list[tuple[int, int, str]] = []

    def check(self, width: int, height: int, what: str) -> None:
        self._pending.append((width, height, what))

    def discard(self) -> None:
        self._pending.clear()

    def commit(self) -> None:
        found = {"small_image": self.small, "aspect_ratio": self.elongated}
        for width, height, what in self._pending:
            problem = size_problem(width, height, self.min_side, self.max_aspect_ratio)
            if problem is not None:
                found[problem[0]].append(f"{what} ({width}x{height})")
        self.stored += len(self._pending)
        self._pending.clear()

    def warn(self) -> None:
        if self.small:
            log.warning(
                "%d of %d stored images have a shorter side below %d pixels, "
                "data.min_image_side's default: training skips them (data/skipped_small_image) "
                "unless it sets data.min_image_side lower, e.g. %s",
                len(self.small),
                self.stored,
                self.min_side,
                self.small[0],
            )
        if self.elongated:
            log.warning(
                "%d of %d stored images have a longer side over %sx the shorter, "
                "data.max_aspect_ratio's default: training skips them "
                "(data/skipped_aspect_ratio) unless it sets data.max_aspect_ratio higher, e.g. %s",
                len(self.elongated),
                self.stored,
                self.max_aspect_ratio,
                self.elongated[0],
            )


def image_member(
    data: bytes, ext: str, what: str, defaults: LoaderDefaults | None = None
) -> tuple[str, bytes]:
    """(member extension, bytes) for image bytes with lower-case extension `ext` (one of
    READABLE); SampleError corrupt_image when Pillow cannot decode the image or write it.
    `defaults` notes an image the loader's default filters would skip."""
    image = decode_image(data, what, min_side=1, max_aspect_ratio=float("inf"))
    if defaults is not None:
        defaults.check(*image.size, what)
    if ext in IMAGE_EXTENSIONS:
        return ext, data
    out = io.BytesIO()
    try:
        image.save(out, format="PNG")
    except Exception as exc:  # noqa: BLE001 - any encoder failure means "cannot be stored"
        raise SampleError("corrupt_image", f"{what}: {pillow_error(exc)}") from exc
    return "png", out.getvalue()
