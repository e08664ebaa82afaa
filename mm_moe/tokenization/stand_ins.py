"""Deterministic stand-in tokenizers, used until the trained ones (sentencepiece, VQ) exist.

They need no artifacts and no training, so every test and the data pipeline can run anywhere:
- `Utf8ByteTextTokenizer`: one id per UTF-8 byte (256 ids); exact round trip.
- `NoTextTokenizer`: no text tokenizer at all (`tokenizer.text=none`): ids only.
- `GridQuantizerImageTokenizer`: preprocess to a `image_size` square, average-pool to a
  `grid` x `grid` raster, quantize each cell's colour to `levels` levels per channel; the code
  is r * levels^2 + g * levels + b. Decoding paints each cell with its quantized colour.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from mm_moe.errors import UserError
from mm_moe.tokenization.image_preprocess import preprocess


class Utf8ByteTextTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class NoTextTokenizer:
    """`tokenizer.text=none`: the model's text ids come from a vocabulary whose tokenizer is
    not here (a published model upcycled without its tokenizer files). Its text arrives as
    ids (`format: tokens` shards); text it is handed cannot be tokenized, and generated text
    ids are shown as `<id>`."""

    vocab_size = 0

    def encode(self, text: str) -> list[int]:
        raise UserError(
            "tokenizer.text=none: this model has no text tokenizer (its upcycle source had no "
            "tokenizer files), so text cannot be turned into its ids. Give "
            "tokenizer.text=hf tokenizer.path=FOLDER with the source model's tokenizer.json "
            "or tokenizer.model"
        )

    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{i}>" for i in ids)


class GridQuantizerImageTokenizer:
    def __init__(self, image_size: int, grid: int, levels: int):
        if image_size % grid:
            raise UserError(
                f"tokenizer.image_size={image_size} must be a multiple of tokenizer.grid={grid}"
            )
        self.image_size, self.grid, self.levels = image_size, grid, levels
        self.codebook_size = levels**3
        self.tokens_per_image = grid * grid

    def encode(self, image: Image.Image) -> np.ndarray:
        cell = self.image_size // self.grid
        pixels_HWC = np.asarray(preprocess(image, self.image_size), dtype=np.float32)
        cells_GcGcC = pixels_HWC.reshape(self.grid, cell, self.grid, cell, 3)
        mean_GGC = cells_GcGcC.mean(axis=(1, 3))
        q_GGC = np.minimum((mean_GGC * (self.levels / 256.0)).astype(np.int64), self.levels - 1)
        codes_GG = (q_GGC[..., 0] * self.levels + q_GGC[..., 1]) * self.levels + q_GGC[..., 2]
        return codes_GG.reshape(-1)

    def decode(self, codes: np.ndarray) -> Image.Image:
        codes = np.asarray(codes, dtype=np.int64).reshape(self.grid, self.grid)
        q_GGC = np.stack(
            [codes // self.levels**2, (codes // self.levels) % self.levels, codes % self.levels],
            axis=-1,
        )
        colour_GGC = ((q_GGC + 0.5) * (256.0 / self.levels)).astype(np.uint8)
        cell = self.image_size // self.grid
        pixels_HWC = colour_GGC.repeat(cell, axis=0).repeat(cell, axis=1)
        return Image.fromarray(pixels_HWC)  # uint8 [H, W, 3]: mode RGB
