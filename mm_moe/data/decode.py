"""Decoding of text and image members, with the checks that make a sample unusable.

Each function returns a clean value or raises `SampleError` with the reason. Images are
converted to RGB here (mm_moe/tokenization/image_preprocess.py holds that policy); odd modes
(CMYK, RGBA, palette, 16-bit) are converted and used, never skipped.
"""

from __future__ import annotations

import io
import re
import warnings

from PIL import Image

from mm_moe.data.defects import SampleError
from mm_moe.tokenization.image_preprocess import to_rgb

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# What the loader and the tokenizer trainers read from shards: also the formats the builders
# convert to PNG (a hand-made shard may hold them), after the usual ones.
READ_IMAGE_EXTENSIONS = IMAGE_EXTENSIONS + ("bmp", "gif", "tif", "tiff")


def decode_text(data: bytes, what: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        detail = f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})"
        raise SampleError("bad_utf8", detail) from exc
    text = text.strip()
    if not text:
        raise SampleError("empty_text", f"{what} is empty")
    return text


def pillow_error(exc: Exception) -> str:
    """Pillow's error, without the repr of the in-memory file it read (`cannot identify image
    file <_io.BytesIO object at 0x7f...>`), which says nothing to a user."""
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))
    return f"{exc.__class__.__name__}: {text}"


def size_problem(
    width: int, height: int, min_side: int, max_aspect_ratio: float
) -> tuple[str, str] | None:
    """(skip reason, the key it breaks) for an image of this size, or None when it is used."""
    if min(width, height) < min_side:
        return "small_image", f"below data.min_image_side={min_side}"
    if max(width, height) > max_aspect_ratio * min(width, height):
        return "aspect_ratio", f"beyond data.max_aspect_ratio={max_aspect_ratio}"
    return None


def decode_image(data: bytes, what: str, min_side: int, max_aspect_ratio: float) -> Image.Image:
    """An RGB image, or SampleError: corrupt_image, small_image or aspect_ratio."""
    # Pillow raises many exception types on hostile bytes; each one means "cannot decode".
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. palette transparency notes: handled by to_rgb
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # read from the header: cheap checks before decoding
        except Exception as exc:  # noqa: BLE001
            raise SampleError("corrupt_image", f"{what}: {pillow_error(exc)}") from exc
        problem = size_problem(width, height, min_side, max_aspect_ratio)
        if problem is not None:
            reason, key = problem
            raise SampleError(reason, f"{what} is {width}x{height}, {key}")
        try:
            image.load()
            return to_rgb(image)
        except Exception as exc:  # noqa: BLE001
            raise SampleError("corrupt_image", f"{what}: {pillow_error(exc)}") from exc
