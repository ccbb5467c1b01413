"""Overlap losses for segmentation: (weighted) dual Tanimoto and the DEFU-Net Dice.

Conventions: ``p`` are predicted class probabilities and ``y`` one-hot (or soft) targets, both
float arrays of shape (B, H, W, K), channels last; for the lung models K = 2 with channel 0 =
lungs and channel 1 = non-lungs. Any float dtype is accepted (float32, bfloat16, ...); every
computation runs in float32 and every result is float32.

Reductions. By default each sum runs over batch, space and classes together, giving one scalar
for the whole batch, as the Res-CR-Net authors do. With ``per_image=True`` the sums run over
space and classes of each image: the coefficient functions then return the (B,) vector and the
loss functions the mean over images of the per-image losses.

Faithful to the authors' Keras code (Res-CR-Net / CXR-Net ``MODULES/Losses.py``):

* Tanimoto with complement (ResUNet-a, Diakogiannis et al. 2020)::

      T(p, y)  = (sum(w p y) + s) / (sum(w (p^2 + y^2 - p y)) + s)
      T~(p, y) = (T(p, y) + T(1 - p, 1 - y)) / 2,     loss = 1 - T~

  with smoothing ``s = 1`` (the authors' ``LS = 1`` for their 'contour' weight mode) in both
  numerator and denominator, and ``w = 1`` for the plain coefficient.
* The contour weight map ``w`` is computed from ``y`` alone (see :func:`contour_weights`) and
  carries no gradient.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

#: Window sizes of the contour box filter and the short-axis limits that select them.
WINDOW_LIMITS: tuple[tuple[int, int], ...] = ((150, 11), (300, 21), (600, 31))
WINDOW_LARGEST: int = 41

#: Window means strictly inside (BORDER_LOW, BORDER_HIGH) mark a pixel as near a contour.
BORDER_LOW: float = 0.005
BORDER_HIGH: float = 0.995


def window_size(short_axis: int) -> int:
    """Side (pixels) of the square averaging window for an image whose short axis is ``short_axis``.

    min(H, W) <= 150 -> 11, <= 300 -> 21, <= 600 -> 31, else 41 (the authors' rule).
    """
    for limit, size in WINDOW_LIMITS:
        if short_axis <= limit:
            return size
    return WINDOW_LARGEST


def _window_counts(n: int, window: int) -> np.ndarray:
    """(n,) float32: how many of the ``window`` taps centred on each index fall inside [0, n)."""
    r = window // 2
    i = np.arange(n)
    return (np.minimum(i + r, n - 1) - np.maximum(i - r, 0) + 1).astype(np.float32)


def box_mean(x: jax.Array, window: int) -> jax.Array:
    """Mean over a ``window`` x ``window`` square centred on each pixel, padding excluded.

    Equivalent to TF/Keras average pooling with stride 1 and 'same' padding: each output is the
    sum of the in-image pixels of the window divided by their count.

    Args:
      x: (B, H, W, K) array; computed in float32.
      window: odd window side in pixels.

    Returns:
      (B, H, W, K) float32 window means.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd integer, got {window}")
    x = jnp.asarray(x, jnp.float32)
    _, h, w, _ = x.shape
    r = window // 2
    # Separable box sum: one 1-D running window per spatial axis (O(window) adds per pixel).
    s = lax.reduce_window(x, 0.0, lax.add, (1, window, 1, 1), (1, 1, 1, 1),
                          ((0, 0), (r, r), (0, 0), (0, 0)))
    s = lax.reduce_window(s, 0.0, lax.add, (1, 1, window, 1), (1, 1, 1, 1),
                          ((0, 0), (0, 0), (r, r), (0, 0)))
    count = np.outer(_window_counts(h, window), _window_counts(w, window))
    # Divide (not multiply by a reciprocal) so that exact ties with the thresholds stay exact.
    return s / jnp.asarray(count)[None, :, :, None]


def contour_weights(y: jax.Array, window: int | None = None) -> jax.Array:
    """The authors' contour-aware weight map, computed from the targets only.

    border = 1 where the ``window`` box mean of ``y`` (per channel) is strictly inside
    (0.005, 0.995), else 0; w = 1 + 2 * border, rescaled so that its mean over the whole
    (B, H, W, K) tensor is 1, then squared. No gradient flows through it.

    Args:
      y: (B, H, W, K) targets (one-hot or soft), any float dtype.
      window: odd window side; ``None`` picks :func:`window_size` of min(H, W).

    Returns:
      (B, H, W, K) float32 weights (mean of the unsquared map is 1; of the squared map >= 1).
    """
    y = jnp.asarray(y, jnp.float32)
    if window is None:
        window = window_size(min(y.shape[1], y.shape[2]))
    mean = box_mean(lax.stop_gradient(y), window)
    border = ((mean > BORDER_LOW) & (mean < BORDER_HIGH)).astype(jnp.float32)
    w = 1.0 + 2.0 * border
    w = w * (w.size / jnp.sum(w))
    return lax.stop_gradient(w * w)


def _axes(per_image: bool) -> tuple[int, ...]:
    return (1, 2, 3) if per_image else (0, 1, 2, 3)


def _tanimoto_term(p: jax.Array, y: jax.Array, w: jax.Array | None, smooth: float,
                   axes: tuple[int, ...]) -> jax.Array:
    inter = p * y
    union = p * p + y * y - inter
    if w is not None:
        inter = w * inter
        union = w * union
    return (jnp.sum(inter, axis=axes) + smooth) / (jnp.sum(union, axis=axes) + smooth)


def tanimoto(p: jax.Array, y: jax.Array, weights: jax.Array | None = None, smooth: float = 1.0,
             per_image: bool = False) -> jax.Array:
    """Tanimoto coefficient without complement: (sum(w p y) + s) / (sum(w (p^2 + y^2 - p y)) + s).

    Args:
      p: (B, H, W, K) predicted probabilities.
      y: (B, H, W, K) targets.
      weights: optional (B, H, W, K) (or broadcastable) pixel weights, e.g. :func:`contour_weights`.
      smooth: additive smoothing ``s`` of numerator and denominator.
      per_image: sum per image and return (B,) instead of one scalar for the batch.

    Returns:
      float32 scalar, or (B,) when ``per_image``; 1 for a perfect binary prediction.
    """
    p = jnp.asarray(p, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    w = None if weights is None else jnp.asarray(weights, jnp.float32)
    return _tanimoto_term(p, y, w, smooth, _axes(per_image))


def tanimoto_dual(p: jax.Array, y: jax.Array, weights: jax.Array | None = None,
                  smooth: float = 1.0, per_image: bool = False) -> jax.Array:
    """Tanimoto with complement: (T(p, y) + T(1 - p, 1 - y)) / 2, same weights in both terms.

    Shapes and arguments as :func:`tanimoto`. Returns a float32 scalar, or (B,) when ``per_image``.
    This is the authors' ``tani_coeff`` (unweighted) and ``weighted_tani_coeff`` (with
    ``weights=contour_weights(y)``).
    """
    p = jnp.asarray(p, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    w = None if weights is None else jnp.asarray(weights, jnp.float32)
    axes = _axes(per_image)
    direct = _tanimoto_term(p, y, w, smooth, axes)
    complement = _tanimoto_term(1.0 - p, 1.0 - y, w, smooth, axes)
    return 0.5 * (direct + complement)


def tanimoto_loss(p: jax.Array, y: jax.Array, weighted: bool = True, smooth: float = 1.0,
                  per_image: bool = False, window: int | None = None) -> jax.Array:
    """1 - dual Tanimoto, by default with the contour weight map (the authors' training loss).

    Args:
      p: (B, H, W, K) predicted probabilities, any float dtype.
      y: (B, H, W, K) targets.
      weighted: use :func:`contour_weights` of ``y`` (``weighted_tani_loss``); else plain
        (``tani_loss``).
      smooth: additive smoothing of every ratio (authors: 1).
      per_image: mean over images of the per-image losses instead of one batch-wide ratio. The
        weight map is still normalised over the whole batch, as in the batch-wide form.
      window: contour window side; ``None`` picks it from min(H, W).

    Returns:
      float32 scalar in [0, 1]; 0 for a perfect binary prediction.
    """
    w = contour_weights(y, window) if weighted else None
    return jnp.mean(1.0 - tanimoto_dual(p, y, w, smooth, per_image))


def defu_dice(p: jax.Array, y: jax.Array, smooth: float = 1.0,
              per_image: bool = False) -> jax.Array:
    """DEFU-Net Dice coefficient with squared denominator terms.

    (2 sum(p y) + s) / (sum(p^2) + sum(y^2) + s). Shapes as :func:`tanimoto`; returns a float32
    scalar, or (B,) when ``per_image``.
    """
    p = jnp.asarray(p, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    axes = _axes(per_image)
    num = 2.0 * jnp.sum(p * y, axis=axes) + smooth
    den = jnp.sum(p * p, axis=axes) + jnp.sum(y * y, axis=axes) + smooth
    return num / den


def defu_dice_loss(p: jax.Array, y: jax.Array, smooth: float = 1.0,
                   per_image: bool = False) -> jax.Array:
    """1 - :func:`defu_dice`; with ``per_image`` the mean over images. float32 scalar."""
    return jnp.mean(1.0 - defu_dice(p, y, smooth, per_image))
