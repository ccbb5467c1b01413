"""Clean up predicted lung masks and split them into the right and the left lung.

All functions take and return 2-D bool masks (H, W) and are pure (inputs are not modified).

* Connected components are 8-connected (pixels touching at a corner belong together); holes are
  background regions not 4-connected to the image border (the dual connectivity), so a hole is
  filled only when the lung closes around it.
* Sides follow the radiological display convention of a PA/AP film: the PATIENT's right lung is
  on the IMAGE's left. `split_lungs` returns {"right": ..., "left": ...} in patient terms.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

_EIGHT = ndimage.generate_binary_structure(2, 2)


def _as_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D (H, W) mask, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components -> (labels int32 (H, W), 0 = background; sizes (n,) in pixels of
    components 1..n)."""
    labels, n = ndimage.label(_as_mask(mask), structure=_EIGHT)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return labels.astype(np.int32), sizes


def touches_border(labels: np.ndarray, n: int) -> np.ndarray:
    """bool (n,): whether component 1..n of ``labels`` has a pixel on the image border."""
    edge = np.zeros(n + 1, bool)
    for side in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        edge[np.unique(side)] = True
    return edge[1:]


def keep_largest_components(mask: np.ndarray, n: int = 2, border_last: bool = False) -> np.ndarray:
    """Keep the ``n`` largest 8-connected components -> bool (H, W).

    Ties: the component found first in row-major order wins. With ``border_last`` the components
    touching the image border (typically air outside the body mistaken for lung) rank after all
    those that do not, whatever their size; a lung cut by a tight crop may then lose its place
    to a speck, so this is an option, not the default.
    """
    if n < 1:
        raise ValueError(f"keep_largest_components: n must be >= 1, got {n}")
    labels, sizes = label_components(mask)
    if sizes.size <= n:
        return labels > 0
    edge = touches_border(labels, sizes.size) if border_last else np.zeros(sizes.size, bool)
    order = np.lexsort((np.arange(sizes.size), -sizes, edge))[:n] + 1
    return np.isin(labels, order)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions enclosed by the mask (not 4-connected to the border) -> bool (H, W)."""
    return ndimage.binary_fill_holes(_as_mask(mask))


def postprocess_mask(mask: np.ndarray, keep: int | None = 2, fill: bool = True, border_last: bool = False) -> np.ndarray:
    """The default clean-up of a predicted lung mask: keep the ``keep`` largest components
    (None: all; ``border_last``: see :func:`keep_largest_components`), then fill holes -> bool (H, W)."""
    out = _as_mask(mask)
    if keep is not None:
        out = keep_largest_components(out, keep, border_last)
    if fill:
        out = fill_holes(out)
    return out


def split_column(mask: np.ndarray) -> float:
    """Column (pixel units, may be fractional) separating the two lungs.

    Two or more components: midway between the centroid columns of the two largest. One
    component (lungs fused): the column with the fewest mask pixels in the middle third of its
    bounding box. Empty mask: the image's middle column.
    """
    mask = _as_mask(mask)
    labels, sizes = label_components(mask)
    if sizes.size == 0:
        return (mask.shape[1] - 1) / 2.0
    if sizes.size >= 2:
        two = np.argsort(-sizes, kind="stable")[:2] + 1
        cols = ndimage.center_of_mass(np.ones_like(labels), labels, two)
        return float((cols[0][1] + cols[1][1]) / 2.0)
    profile = mask.sum(axis=0)
    occupied = np.flatnonzero(profile)
    lo, hi = int(occupied[0]), int(occupied[-1])
    a, b = lo + (hi - lo + 1) // 3, lo + 2 * (hi - lo + 1) // 3
    if b <= a:
        return float((lo + hi) / 2.0)
    return float(a + int(np.argmin(profile[a:b + 1])))


def split_lungs(mask: np.ndarray) -> dict[str, np.ndarray]:
    """Split a lung mask into the patient's right and left lung (PA/AP display: right = image left).

    Components are assigned whole to the side of :func:`split_column` on which their centroid
    lies; a single fused component is cut at that column. Assumes a frontal film in the usual
    display orientation with both lungs in view.

    Returns:
      {"right": bool (H, W), "left": bool (H, W)}; right | left == mask, right & left empty.
    """
    mask = _as_mask(mask)
    s = split_column(mask)
    labels, sizes = label_components(mask)
    cols = np.arange(mask.shape[1])[None, :]
    if sizes.size >= 2:
        centroids = ndimage.center_of_mass(np.ones_like(labels), labels, np.arange(1, sizes.size + 1))
        image_left = np.array([False] + [c[1] <= s for c in centroids])
        right = image_left[labels] & mask
    else:
        right = mask & (cols <= s)
    return {"right": right, "left": mask & ~right}
