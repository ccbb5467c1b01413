"""Overlay a lung mask on its film for a quick visual check: a translucent fill and a solid
outline, the patient's right lung in cyan, the left in orange, with "R" / "L" at their centres.

The outline is the mask's surface (crnet_jax.surface.surface_pixels: lung pixels with a
4-neighbour outside the lung), thickened to about 1/250 of the film's short side.
"""
from __future__ import annotations

import os
import pathlib

import numpy as np
from scipy import ndimage

from crnet_jax.postprocess import split_lungs
from crnet_jax.surface import surface_pixels

RIGHT_COLOUR = (0, 200, 255)   # patient's right lung (image left)
LEFT_COLOUR = (255, 150, 0)    # patient's left lung (image right)
TRUTH_COLOUR = (255, 60, 200)  # a reference mask's outline, when one is drawn


def film_to_rgb(film: np.ndarray) -> np.ndarray:
    """float (H, W) film in [0, 1] -> uint8 (H, W, 3) grey."""
    grey = np.rint(np.clip(np.asarray(film, np.float64), 0.0, 1.0) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Surface pixels of ``mask`` grown inwards and outwards to ``width`` pixels -> bool (H, W)."""
    edge = surface_pixels(mask)
    if width > 1 and edge.any():
        edge = ndimage.binary_dilation(edge, iterations=width - 1)
    return edge


def overlay(film: np.ndarray, mask: np.ndarray, *, alpha: float = 0.3, width: int | None = None,
            truth: np.ndarray | None = None, labels: bool = True) -> np.ndarray:
    """Film with the lung mask drawn on it.

    Args:
      film: float (H, W) in [0, 1] (as read by crnet_jax.readers).
      mask: bool (H, W) lung mask of the same shape.
      alpha: opacity of the fill (0: outline only).
      width: outline width in pixels (default: max(1, round(min(H, W) / 250))).
      truth: optional reference mask whose outline is drawn in magenta.
      labels: write "R" and "L" (patient's sides) at the centre of each lung.

    Returns:
      uint8 (H, W, 3) RGB image.
    """
    film = np.asarray(film)
    mask = np.asarray(mask, bool)
    if film.shape != mask.shape:
        raise ValueError(f"overlay: film {film.shape} and mask {mask.shape} differ in shape")
    h, w = mask.shape
    width = max(1, round(min(h, w) / 250)) if width is None else int(width)
    rgb = film_to_rgb(film).astype(np.float32)
    sides = split_lungs(mask)
    for side, colour in (("right", RIGHT_COLOUR), ("left", LEFT_COLOUR)):
        m = sides[side]
        rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(colour, np.float32)
        rgb[outline(m, width)] = colour
    if truth is not None:
        rgb[outline(np.asarray(truth, bool), width)] = TRUTH_COLOUR
    out = np.rint(rgb).astype(np.uint8)
    if labels:
        out = _label_sides(out, sides)
    return out


def _label_sides(rgb: np.ndarray, sides: dict[str, np.ndarray]) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    h, w = rgb.shape[:2]
    size = max(10, min(h, w) // 20)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    im = Image.fromarray(rgb)
    draw = ImageDraw.Draw(im)
    for side, letter in (("right", "R"), ("left", "L")):
        if sides[side].any():
            r, c = ndimage.center_of_mass(sides[side])
            draw.text((c, r), letter, fill=(255, 255, 255), font=font, anchor="mm",
                      stroke_width=max(1, size // 10), stroke_fill=(0, 0, 0))
    return np.asarray(im)


def save_overlay(path: str | os.PathLike, film: np.ndarray, mask: np.ndarray, **kwargs) -> pathlib.Path:
    """Write :func:`overlay` as an RGB PNG (folders created); returns the path."""
    from PIL import Image

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(film, mask, **kwargs)).save(path)
    return path
