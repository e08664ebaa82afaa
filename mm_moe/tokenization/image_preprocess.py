"""The image preprocessing policy, in one place: every image tokenizer calls `preprocess`.

1. Orientation: the EXIF orientation tag is applied (phone photos are stored rotated).
2. Colour: the result is always 8-bit RGB.
   - RGBA, LA and palette images with transparency are composited over a white background;
   - CMYK, YCbCr, LAB, HSV, greyscale and bilevel images go through Pillow's conversion;
   - 16-bit and 32-bit greyscale (I;16*, I, F) are scaled to 8 bits by their full range
     (65535 for 16-bit, the image's own maximum beyond that), never clipped.
3. Geometry: the shorter side is resized to `size` (bicubic, with Pillow's antialiasing), then
   the centre `size` x `size` square is cropped. Nothing is padded or stretched.

Decoding and the rejection of unusable images (corrupt, tiny, extreme aspect ratio) belong to
the data pipeline (mm_moe/data/decode.py), which calls `to_rgb` before tokenizing.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

_WHITE = (255, 255, 255)


def _wide_grey_to_l(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 65535.0)
    if image.mode == "F":
        top = max(float(values.max()), 1.0)
    scaled = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)  # uint8 [H, W]: mode L


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB by the policy above (EXIF orientation, white background under alpha)."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        image = _wide_grey_to_l(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, then the centre square."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def preprocess(image: Image.Image, size: int) -> Image.Image:
    """The full policy: RGB conversion, then resize the shorter side and centre-crop."""
    return resize_center_crop(to_rgb(image), size)
