"""Pictures of attribution maps: a map over its image (a semi-transparent colormap over the RGB image) and
grids of such tiles. Plain numpy on the host (matplotlib's colormaps, no pyplot), deterministic: the
localisation report's figures (:mod:`apjax.evaluation`) and the training's TensorBoard images
(:mod:`apjax.trainer.map_grid`) draw with them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from apjax.data.augment import MEAN, STD


def denormalize(x: np.ndarray) -> np.ndarray:
    """uint8 RGB of a network input normalised by :func:`apjax.data.augment.normalize` (last axis RGB)."""
    rgb = np.asarray(x, np.float32) * np.asarray(STD, np.float32) + np.asarray(MEAN, np.float32)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def minmax(m: np.ndarray) -> np.ndarray:
    """``m`` scaled to [0, 1] (float32); a constant map gives zeros."""
    m = np.asarray(m, np.float32)
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def overlay(image: np.ndarray, m: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """uint8 (H, W, 3): ``cmap`` of the min-max scaled map ``m`` (H, W) blended over ``image`` (H, W, 3
    uint8) with opacity ``alpha``."""
    from matplotlib import colormaps

    image = np.asarray(image)
    m = np.asarray(m)
    if m.shape != image.shape[:2]:
        raise ValueError(f"the map's shape {m.shape} is not the image's {image.shape[:2]}.")
    colour = colormaps[cmap](minmax(m))[..., :3]  # floats in [0, 1]
    blended = (1 - alpha) * image.astype(np.float32) / 255.0 + alpha * colour
    return np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)


def grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2, fill: int = 255) -> np.ndarray:
    """uint8 (H, W, 3): equal-sized (h, w, 3) tiles laid out row by row, ``pad`` pixels of ``fill`` between
    them and around them."""
    h, w = rows[0][0].shape[:2]
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    out = np.full((pad + n_rows * (h + pad), pad + n_cols * (w + pad), 3), fill, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            out[top : top + h, left : left + w] = tile
    return out
