"""Mild random deformations of a greyscale digit, InfiMNIST-style (Loosli, Canu & Bottou 2007):
a small affine move (rotation, scale, shear, translation) plus an elastic distortion (Simard,
Steinkraus & Platt 2003: a per-pixel displacement field drawn uniform in [-1, 1], smoothed by a
Gaussian of width `sigma` and scaled by `alpha`). Both become one map from output pixels to
source coordinates, sampled once (bilinear) with scipy.ndimage.map_coordinates, so the image is
interpolated only once.

Defaults are milder than Simard's (sigma 4): with sigma 6 and alpha 34 the elastic field moves
a pixel by about 0.8 px per axis (root mean square; at most about 3 px), and the digits stay
legible (docs/study_corpus_grid.png).

Shapes: H, W image height and width.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

from mm_moe.errors import UserError


@dataclass
class DeformConfig:
    rotate: float = 10.0  # degrees, uniform in [-rotate, rotate]
    scale: float = 0.1  # zoom uniform in [1 - scale, 1 + scale]
    shear: float = 0.15  # shear factor uniform in [-shear, shear]
    shift: float = 2.0  # translation in pixels, per axis uniform in [-shift, shift]
    alpha: float = 34.0  # elastic: scale of the smoothed displacement field (pixels)
    sigma: float = 6.0  # elastic: Gaussian smoothing of the field (pixels, at 28x28)

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not np.isfinite(value) or value < 0:
                raise UserError(f"deform.{name}={value} must be a finite number >= 0")
        if self.scale >= 1:
            raise UserError(f"deform.scale={self.scale} must be below 1 (zoom 1 +- scale)")
        if self.alpha > 0 and self.sigma <= 0:
            raise UserError(f"deform.sigma={self.sigma} must be positive when alpha > 0")


def source_coords(shape: tuple[int, int], rng: np.random.Generator, cfg: DeformConfig):
    """[2, H, W] float64: for every output pixel (row, col), where to sample the source."""
    h, w = shape
    angle = np.deg2rad(rng.uniform(-cfg.rotate, cfg.rotate))
    zoom = 1 + rng.uniform(-cfg.scale, cfg.scale)
    shear = rng.uniform(-cfg.shear, cfg.shear)
    shift_2 = rng.uniform(-cfg.shift, cfg.shift, size=2)
    rotation_22 = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    # Output -> source: the inverse of "shear, rotate, zoom about the centre, then shift".
    inverse_22 = np.array([[1.0, -shear], [0.0, 1.0]]) @ rotation_22.T / zoom
    centre_2 = np.array([(h - 1) / 2, (w - 1) / 2])
    grid_2HW = np.mgrid[0:h, 0:w].astype(np.float64)
    moved_2HW = grid_2HW - (centre_2 + shift_2)[:, None, None]
    coords_2HW = np.einsum("ij,jhw->ihw", inverse_22, moved_2HW) + centre_2[:, None, None]
    if cfg.alpha > 0:
        field_2HW = rng.uniform(-1, 1, size=(2, h, w))
        for axis in range(2):
            field_2HW[axis] = gaussian_filter(field_2HW[axis], cfg.sigma, mode="constant")
        coords_2HW += cfg.alpha * field_2HW
    return coords_2HW


def deform(image_HW: np.ndarray, rng: np.random.Generator, cfg: DeformConfig) -> np.ndarray:
    """A new [H, W] uint8 image: `image_HW` (uint8, background 0) under one random deformation
    drawn from `rng`; what falls outside the source reads as background."""
    assert image_HW.ndim == 2 and image_HW.dtype == np.uint8, (image_HW.shape, image_HW.dtype)
    coords_2HW = source_coords(image_HW.shape, rng, cfg)
    out_HW = map_coordinates(
        image_HW.astype(np.float32), coords_2HW, order=1, mode="constant", cval=0.0
    )
    return np.clip(np.rint(out_HW), 0, 255).astype(np.uint8)
