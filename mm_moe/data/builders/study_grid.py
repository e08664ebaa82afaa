"""grid.png of the study corpus: what its deformations look like.

One row per example source digit: the digit as its source has it, then its deformations in the
corpus (in stream order); a last row of held-out digits, each undeformed then deformed.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

ZOOM = 3  # pixels per source pixel
GAP = 4  # pixels between cells (and a wider gap after the first column)


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


def write_grid(
    path: Path, rows: list[list[np.ndarray]], heldout: list[dict], heldout_deformed: list[dict]
) -> None:
    """rows: [source digit, its deformations...] each; heldout(_deformed): samples with the
    same keys, shown in pairs on the last row."""
    last = []
    for plain, moved in zip(heldout, heldout_deformed):
        last += [_png(plain["png"]), _png(moved["png"])]
    rows = [*rows, last] if last else list(rows)
    side = 28 * ZOOM
    num_cols = max(len(r) for r in rows)
    canvas = np.full(
        (len(rows) * (side + GAP) + GAP, num_cols * (side + GAP) + 2 * GAP), 96, np.uint8
    )
    for r, row in enumerate(rows):
        for c, image_HW in enumerate(row):
            big = np.kron(image_HW, np.ones((ZOOM, ZOOM), np.uint8))
            top = GAP + r * (side + GAP)
            left = GAP + c * (side + GAP) + (GAP if c > 0 and r < len(rows) - 1 else 0)
            canvas[top : top + side, left : left + side] = big
    Image.fromarray(canvas).save(path)
