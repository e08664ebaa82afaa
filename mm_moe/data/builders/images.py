"""Image bytes for a shard member, shared by the pairs and interleaved builders.

Formats the loader reads (jpg, jpeg, png, webp) keep their original bytes. Other formats Pillow
reads (bmp, gif, tif, tiff) are converted by the loader's one RGB policy
(mm_moe/tokenization/image_preprocess.py `to_rgb`, applied by `decode_image`) and stored as PNG:
Pillow cannot write every mode as PNG (32-bit `I`, CMYK), and RGB is what the loader makes of
them anyway.
"""

from __future__ import annotations

import io

from mm_moe.data.decode import IMAGE_EXTENSIONS, READ_IMAGE_EXTENSIONS, decode_image, pillow_error
from mm_moe.data.defects import SampleError

READABLE = READ_IMAGE_EXTENSIONS  # the extensions the builders take (the others become PNG)


def image_member(data: bytes, ext: str, what: str) -> tuple[str, bytes]:
    """(member extension, bytes) for image bytes with lower-case extension `ext` (one of
    READABLE); SampleError corrupt_image when Pillow cannot decode the image or write it."""
    image = decode_image(data, what, min_side=1, max_aspect_ratio=float("inf"))
    if ext in IMAGE_EXTENSIONS:
        return ext, data
    out = io.BytesIO()
    try:
        image.save(out, format="PNG")
    except Exception as exc:  # noqa: BLE001 - any encoder failure means "cannot be stored"
        raise SampleError("corrupt_image", f"{what}: {pillow_error(exc)}") from exc
    return "png", out.getvalue()
