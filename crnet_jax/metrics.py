"""Segmentation metrics on thresholded masks: per-image lung scores and the authors' pooled score.

Conventions: ``p`` are predicted class probabilities and ``y`` one-hot (or soft) targets, both
float arrays of shape (B, H, W, K), channels last; for the lung models K = 2 with channel 0 =
lungs and channel 1 = non-lungs.

Thresholding (per-image metrics). Both ``p`` and ``y`` are turned into hard labels by argmax over
the classes (ties go to the lowest class index). For K = 2 this is the same as
``p[..., 0] >= 0.5`` for the lung channel 0. For K = 1 (a single sigmoid channel) the label is
``x >= 0.5``: foreground is class 0, background class 1.

Empty masks. A ratio whose numerator and denominator are both 0 (e.g. Dice when neither truth
nor prediction has a lung pixel, precision when nothing is predicted) is resolved by ``empty``:

* ``"match"`` (default): 1.0 when truth and prediction are BOTH empty (perfect agreement),
  otherwise 0.0. So with an empty truth and a non-empty prediction (or the reverse) Dice, IoU,
  precision, recall are all 0.0; with both empty all are 1.0.
* ``"zero"``: every 0/0 is 0.0.
* ``"nan"``: every 0/0 is NaN (IEEE); averages must then skip NaNs.

Pixel accuracy (both classes) is never 0/0.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

EMPTY_POLICIES = ("match", "zero", "nan")

#: Keys of the per-image metric dict returned by :func:`segmentation_metrics`.
METRIC_NAMES = ("dice", "iou", "precision", "recall", "f1", "accuracy")


def hard_labels(x: jax.Array) -> jax.Array:
    """(B, H, W, K) probabilities or targets -> (B, H, W) int32 class labels.

    argmax over the last axis (ties to the lowest index); for K = 1, 0 where x >= 0.5 else 1.
    """
    x = jnp.asarray(x)
    if x.shape[-1] == 1:
        return jnp.where(x[..., 0] >= 0.5, 0, 1).astype(jnp.int32)
    return jnp.argmax(x, axis=-1).astype(jnp.int32)


def confusion_counts(p: jax.Array, y: jax.Array, lung_channel: int = 0) -> dict[str, jax.Array]:
    """Per-image confusion counts of the ``lung_channel`` class after argmax thresholding.

    Args:
      p: (B, H, W, K) predicted probabilities.
      y: (B, H, W, K) targets (thresholded by argmax too).
      lung_channel: index of the foreground class.

    Returns:
      dict of (B,) int32 pixel counts: ``tp``, ``fp``, ``fn``, ``tn`` (foreground vs the rest).
      ``tp + tn`` is the number of pixels whose class is right, ``tp + fp + fn + tn = H * W``.
      Counts of several batches or images can be summed (concatenate, or sum over axis 0 to
      pool) and passed to :func:`metrics_from_counts`.
    """
    pred = hard_labels(p) == lung_channel
    true = hard_labels(y) == lung_channel

    def count(m: jax.Array) -> jax.Array:
        return jnp.sum(m, axis=(1, 2), dtype=jnp.int32)

    return {"tp": count(pred & true), "fp": count(pred & ~true),
            "fn": count(~pred & true), "tn": count(~pred & ~true)}


def _ratio(num, den, both_empty, empty: str):
    """num / den with the 0/0 cases resolved by ``empty`` (works on jax or numpy arrays)."""
    xp = jnp if isinstance(num, jax.Array) or isinstance(den, jax.Array) else np
    num = xp.asarray(num, xp.float32 if xp is jnp else np.float64)
    den = xp.asarray(den, num.dtype)
    undefined = den == 0
    value = num / xp.where(undefined, 1, den)
    if empty == "match":
        fill = xp.where(both_empty, 1.0, 0.0).astype(num.dtype)
    elif empty == "zero":
        fill = xp.zeros_like(num)
    elif empty == "nan":
        fill = xp.full_like(num, xp.nan)
    else:
        raise ValueError(f"empty must be one of {EMPTY_POLICIES}, got {empty!r}")
    return xp.where(undefined, fill, value)


def metrics_from_counts(counts: Mapping[str, jax.Array],
                        empty: str = "match") -> dict[str, jax.Array]:
    """Dice, IoU, precision, recall, F1 (= Dice) of the foreground and pixel accuracy from counts.

    Args:
      counts: dict with ``tp``, ``fp``, ``fn``, ``tn`` arrays of any common shape (e.g. (B,) per
        image from :func:`confusion_counts`, or scalars after pooling). JAX arrays give float32
        JAX results; NumPy arrays or Python ints give float64 NumPy results.
      empty: 0/0 policy, ``"match"`` (default), ``"zero"`` or ``"nan"`` (module docstring).

    Returns:
      dict with keys :data:`METRIC_NAMES`, each of the counts' shape.
        dice = 2 tp / (2 tp + fp + fn), iou = tp / (tp + fp + fn), precision = tp / (tp + fp),
        recall = tp / (tp + fn), f1 = dice, accuracy = (tp + tn) / (tp + fp + fn + tn).
    """
    if empty not in EMPTY_POLICIES:
        raise ValueError(f"empty must be one of {EMPTY_POLICIES}, got {empty!r}")
    tp, fp, fn, tn = (counts[k] for k in ("tp", "fp", "fn", "tn"))
    xp = jnp if any(isinstance(c, jax.Array) for c in (tp, fp, fn, tn)) else np
    both_empty = (xp.asarray(tp) + fp + fn) == 0
    dice = _ratio(2 * tp, 2 * tp + fp + fn, both_empty, empty)
    return {
        "dice": dice,
        "iou": _ratio(tp, tp + fp + fn, both_empty, empty),
        "precision": _ratio(tp, tp + fp, both_empty, empty),
        "recall": _ratio(tp, tp + fn, both_empty, empty),
        "f1": dice,
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn, both_empty, "zero"),
    }


def segmentation_metrics(p: jax.Array, y: jax.Array, lung_channel: int = 0,
                         empty: str = "match") -> dict[str, jax.Array]:
    """Per-image lung metrics after argmax thresholding of ``p`` and ``y``.

    Args:
      p: (B, H, W, K) predicted probabilities.
      y: (B, H, W, K) targets.
      lung_channel: index of the lung (foreground) class, 0 for the lung models.
      empty: 0/0 policy, ``"match"`` (default), ``"zero"`` or ``"nan"`` (module docstring).

    Returns:
      dict of (B,) float32 arrays: ``dice``, ``iou``, ``precision``, ``recall``, ``f1`` (= dice)
      of the lung class, and ``accuracy`` (fraction of pixels of either class labelled right).
    """
    return metrics_from_counts(confusion_counts(p, y, lung_channel), empty)


# --- The authors' pooled both-class score ------------------------------------------------------

def pooled_counts(p: jax.Array, y: jax.Array, threshold: float = 0.5) -> dict[str, jax.Array]:
    """Counts for the authors' pooled "Dice" (``other_metrics`` in their Losses.py).

    Every channel of ``p`` is thresholded on its own (``p > threshold``, strict) and compared
    with ``y`` as given, summed over batch, space AND classes. For one-hot ``y`` and a
    K = 2 softmax this pooled both-class Dice equals pixel accuracy.

    Args:
      p: (B, H, W, K) predicted probabilities.
      y: (B, H, W, K) one-hot targets (used unthresholded, as the authors do).
      threshold: per-channel probability threshold (authors: 0.5).

    Returns:
      dict of float32 scalars ``tp`` = sum(y * pred), ``pred`` = sum(pred), ``true`` = sum(y).
      Dicts from several batches add up with :func:`sum_counts`.
    """
    pred = (jnp.asarray(p) > threshold).astype(jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    return {"tp": jnp.sum(y * pred), "pred": jnp.sum(pred), "true": jnp.sum(y)}


def sum_counts(counts: Iterable[Mapping[str, jax.Array]]) -> dict[str, np.ndarray]:
    """Key-wise sum of count dicts (any of this module's), accumulated in float64 NumPy.

    Works for :func:`pooled_counts` and :func:`confusion_counts` dicts (the latter are summed
    over images too, giving pooled counts).
    """
    total: dict[str, np.ndarray] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, np.float64(0.0)) + np.sum(np.asarray(v, np.float64))
    return total


def pooled_scores(counts: Mapping[str, np.ndarray], empty: str = "match") -> dict[str, np.ndarray]:
    """Finalise :func:`pooled_counts` (summed over batches) into the authors' pooled scores.

    With tp, fp = pred - tp, fn = true - tp: dice = 2 tp / (2 tp + fp + fn), iou (their
    "jaccard") = tp / (tp + fp + fn), precision = tp / (tp + fp), recall = tp / (tp + fn),
    f1 = dice. 0/0 follows ``empty`` as in :func:`metrics_from_counts`.

    Returns:
      dict of float64 NumPy scalars ``dice``, ``iou``, ``precision``, ``recall``, ``f1``.
    """
    tp = np.asarray(counts["tp"], np.float64)
    fp = np.asarray(counts["pred"], np.float64) - tp
    fn = np.asarray(counts["true"], np.float64) - tp
    out = metrics_from_counts({"tp": tp, "fp": fp, "fn": fn, "tn": np.zeros_like(tp)}, empty)
    del out["accuracy"]
    return out
