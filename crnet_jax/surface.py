"""Surface (contour) distances between two binary masks: Hausdorff, HD95 and ASSD.

Definitions (2-D masks, shape (H, W), any bool-convertible dtype):

* Surface pixels of a mask: the mask pixels with at least one 4-neighbour (up, down, left,
  right) outside the mask. Pixels beyond the image border count as outside, so a mask pixel
  on the border of the image is a surface pixel. A one-pixel-thin mask is all surface.
* Distance between two pixels: the Euclidean distance between their centres, with rows
  scaled by ``spacing[0]`` and columns by ``spacing[1]``:
  ``sqrt((dr * spacing[0])**2 + (dc * spacing[1])**2)``. With ``spacing = (1, 1)`` the unit is
  pixels; with a DICOM PixelSpacing (row, col) in mm it is mm.
* Directed distances A -> B: for every surface pixel of A, the distance to the nearest surface
  pixel of B (exact, via the Euclidean distance transform).
* ``hausdorff`` = max(max d(A->B), max d(B->A)).
* ``hd95`` = max(P95 d(A->B), P95 d(B->A)), percentiles with linear interpolation
  (numpy's default; the convention of MedPy and MONAI).
* ``assd`` (average symmetric surface distance) = (sum d(A->B) + sum d(B->A)) / (|S_A| + |S_B|),
  the mean over the surface pixels of both masks (Heimann et al. 2009).

Empty masks (no surface): when BOTH masks are empty the masks agree and every distance is 0.0
with ``empty="match"`` and NaN otherwise; when exactly ONE is empty there is nothing to measure
to and every distance is NaN whatever the policy (summaries skip NaNs and count them).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

DISTANCE_NAMES = ("hausdorff", "hd95", "assd")

_CROSS = ndimage.generate_binary_structure(2, 1)  # 4-connectivity


def _as_mask(mask: np.ndarray, what: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (H, W) mask, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def _as_spacing(spacing: float | Sequence[float] | None) -> tuple[float, float]:
    if spacing is None:
        return (1.0, 1.0)
    if np.isscalar(spacing):
        spacing = (float(spacing), float(spacing))  # type: ignore[arg-type]
    sr, sc = (float(s) for s in spacing)  # type: ignore[union-attr]
    if not (sr > 0 and sc > 0 and math.isfinite(sr) and math.isfinite(sc)):
        raise ValueError(f"spacing must be two positive finite numbers (row, col), got {spacing}")
    return (sr, sc)


def surface_pixels(mask: np.ndarray) -> np.ndarray:
    """Surface of a mask: bool (H, W), True on mask pixels with a 4-neighbour outside the mask
    (pixels beyond the image border count as outside)."""
    mask = _as_mask(mask, "mask")
    inner = ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)
    return mask & ~inner


def directed_distances(a_surface: np.ndarray, b_surface: np.ndarray,
                       spacing: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """For each True pixel of ``a_surface`` (in row-major order), the distance to the nearest True
    pixel of ``b_surface`` -> float64 (n_a,). ``b_surface`` must have at least one True pixel."""
    if not b_surface.any():
        raise ValueError("directed_distances: the target surface is empty")
    if not a_surface.any():
        return np.zeros((0,), np.float64)
    # Distance transform of the complement: for every pixel, the distance to the nearest b pixel.
    dist = ndimage.distance_transform_edt(~b_surface, sampling=spacing)
    return np.asarray(dist[a_surface], np.float64)


def surface_distances(pred: np.ndarray, truth: np.ndarray,
                      spacing: float | Sequence[float] | None = None,
                      empty: str = "match") -> dict[str, float]:
    """Hausdorff distance, HD95 and ASSD between two masks (module docstring for definitions).

    Args:
      pred, truth: (H, W) masks of the same shape (bool, or anything != 0 is in the mask).
      spacing: (row, col) size of a pixel (e.g. mm), a single number for square pixels, or None
        for pixels.
      empty: ``"match"`` (both empty -> 0.0), ``"zero"`` or ``"nan"`` (both empty -> NaN); one
        empty -> NaN always.

    Returns:
      dict ``hausdorff``, ``hd95``, ``assd`` (float, in the unit of ``spacing``).
    """
    if empty not in ("match", "zero", "nan"):
        raise ValueError(f"empty must be 'match', 'zero' or 'nan', got {empty!r}")
    pred = _as_mask(pred, "pred")
    truth = _as_mask(truth, "truth")
    if pred.shape != truth.shape:
        raise ValueError(f"pred {pred.shape} and truth {truth.shape} masks differ in shape")
    sp = _as_spacing(spacing)
    sa, sb = surface_pixels(pred), surface_pixels(truth)
    has_a, has_b = bool(sa.any()), bool(sb.any())
    if not has_a and not has_b:
        value = 0.0 if empty == "match" else math.nan
        return {k: value for k in DISTANCE_NAMES}
    if not (has_a and has_b):
        return {k: math.nan for k in DISTANCE_NAMES}
    d_ab = directed_distances(sa, sb, sp)
    d_ba = directed_distances(sb, sa, sp)
    return {
        "hausdorff": float(max(d_ab.max(), d_ba.max())),
        "hd95": float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))),
        "assd": float((d_ab.sum() + d_ba.sum()) / (d_ab.size + d_ba.size)),
    }
