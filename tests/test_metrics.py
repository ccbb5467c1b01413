"""crnet_jax.metrics against a float64 NumPy reference and hand-made cases."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crnet_jax import metrics

NAMES = ("dice", "iou", "precision", "recall", "f1", "accuracy")


# --- float64 NumPy reference -------------------------------------------------------------------

def ref_metrics(p: np.ndarray, y: np.ndarray, lung: int = 0) -> dict[str, np.ndarray]:
    """Per-image metrics with explicit loops; images where a ratio is 0/0 get NaN."""
    out = {k: [] for k in NAMES}
    for n in range(p.shape[0]):
        pred = np.argmax(p[n], axis=-1) == lung
        true = np.argmax(y[n], axis=-1) == lung
        tp = float(np.sum(pred & true))
        fp = float(np.sum(pred & ~true))
        fn = float(np.sum(~pred & true))
        tn = float(np.sum(~pred & ~true))
        div = lambda a, b: a / b if b else np.nan  # noqa: E731
        out["dice"].append(div(2 * tp, 2 * tp + fp + fn))
        out["iou"].append(div(tp, tp + fp + fn))
        out["precision"].append(div(tp, tp + fp))
        out["recall"].append(div(tp, tp + fn))
        out["f1"].append(div(2 * tp, 2 * tp + fp + fn))
        out["accuracy"].append((tp + tn) / pred.size)
    return {k: np.asarray(v) for k, v in out.items()}


def ref_pooled(p: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """The authors' other_metrics: per-channel p > threshold, pooled over everything."""
    pred = (p > threshold).astype(np.float64)
    tp = float(np.sum(y * pred))
    fp = float(np.sum(pred)) - tp
    fn = float(np.sum(y)) - tp
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return {"dice": 2 * tp / (2 * tp + fp + fn), "iou": tp / (tp + fp + fn), "precision": precision,
            "recall": recall, "f1": 2 * precision * recall / (precision + recall)}


def random_case(rng: np.random.Generator, shape, flip: float = 0.2):
    """Random one-hot targets and softmax predictions that agree on ~(1 - flip) of pixels."""
    b, h, w, k = shape
    labels = rng.integers(0, k, size=(b, h, w))
    y = np.eye(k, dtype=np.float32)[labels]
    logits = 3.0 * y + rng.standard_normal(y.shape) * (1.0 + 4.0 * flip)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return p.astype(np.float32), y


def masks_to_onehot(lung: np.ndarray) -> np.ndarray:
    """(B, H, W) bool lung masks -> (B, H, W, 2) float32, channel 0 = lungs."""
    lung = np.asarray(lung, np.float32)
    return np.stack([lung, 1.0 - lung], axis=-1)


# --- per-image metrics -------------------------------------------------------------------------

@pytest.mark.parametrize("shape,lung",
                         [((4, 17, 23, 2), 0), ((3, 32, 32, 2), 1), ((2, 15, 9, 3), 2)])
def test_metrics_match_reference(shape, lung):
    rng = np.random.default_rng(sum(shape))
    p, y = random_case(rng, shape)
    got = metrics.segmentation_metrics(p, y, lung_channel=lung)
    want = ref_metrics(p, y, lung)
    assert set(got) == set(NAMES)
    for k in NAMES:
        chex.assert_shape(got[k], (shape[0],))
        chex.assert_type(got[k], jnp.float32)
        assert np.all(np.isfinite(want[k]))
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-6, err_msg=k)


def test_counts_add_up():
    rng = np.random.default_rng(3)
    p, y = random_case(rng, (3, 11, 13, 2))
    c = metrics.confusion_counts(p, y)
    total = sum(np.asarray(c[k]) for k in ("tp", "fp", "fn", "tn"))
    np.testing.assert_array_equal(total, 11 * 13)
    chex.assert_type(c["tp"], jnp.int32)


def test_hand_made_case():
    truth = np.zeros((1, 4, 4), bool)
    truth[0, :2, :2] = True                      # 4 lung pixels
    pred = np.zeros((1, 4, 4), bool)
    pred[0, :2, 1:3] = True                      # 2 right, 2 wrong
    m = metrics.segmentation_metrics(masks_to_onehot(pred), masks_to_onehot(truth))
    np.testing.assert_allclose(m["dice"], [0.5])          # 2*2 / (4 + 4)
    np.testing.assert_allclose(m["iou"], [1 / 3])         # 2 / 6
    np.testing.assert_allclose(m["precision"], [0.5])
    np.testing.assert_allclose(m["recall"], [0.5])
    np.testing.assert_allclose(m["f1"], [0.5])
    np.testing.assert_allclose(m["accuracy"], [12 / 16])  # 4 pixels wrong
    # Measuring the non-lung channel instead: truth 12, pred 12, overlap 10.
    m1 = metrics.segmentation_metrics(masks_to_onehot(pred), masks_to_onehot(truth), lung_channel=1)
    np.testing.assert_allclose(m1["dice"], [20 / 24], rtol=1e-6)
    np.testing.assert_allclose(m1["iou"], [10 / 14], rtol=1e-6)


def test_argmax_equals_lung_probability_threshold_for_two_classes():
    p_lung = np.array([0.0, 0.3, 0.4999, 0.5, 0.5001, 0.8, 1.0], np.float32)
    p = np.stack([p_lung, 1.0 - p_lung], -1)[None, None]   # (1, 1, 7, 2)
    np.testing.assert_array_equal(metrics.hard_labels(p)[0, 0] == 0, p_lung >= 0.5)


def test_single_channel_threshold():
    p = np.array([0.2, 0.5, 0.9], np.float32)[None, None, :, None]
    np.testing.assert_array_equal(metrics.hard_labels(p)[0, 0], [1, 0, 0])
    y = np.array([0.0, 1.0, 1.0], np.float32)[None, None, :, None]
    np.testing.assert_allclose(metrics.segmentation_metrics(p, y)["dice"], [1.0])


# --- empty-mask policy -------------------------------------------------------------------------

def _empty_cases():
    """(pred, truth) lung masks for: both empty, truth empty only, prediction empty only."""
    empty = np.zeros((1, 5, 6), bool)
    full = np.zeros((1, 5, 6), bool)
    full[0, 1:3, 2:5] = True
    return {"both": (empty, empty), "truth": (full, empty), "pred": (empty, full)}


EXPECTED = {
    # case -> policy -> (dice, iou, precision, recall)
    "both": {"match": (1, 1, 1, 1), "zero": (0, 0, 0, 0), "nan": (np.nan,) * 4},
    "truth": {"match": (0, 0, 0, 0), "zero": (0, 0, 0, 0), "nan": (0, 0, 0, np.nan)},
    "pred": {"match": (0, 0, 0, 0), "zero": (0, 0, 0, 0), "nan": (0, 0, np.nan, 0)},
}


@pytest.mark.parametrize("case", ["both", "truth", "pred"])
@pytest.mark.parametrize("empty", ["match", "zero", "nan"])
def test_empty_mask_policy(case, empty):
    pred, truth = _empty_cases()[case]
    m = metrics.segmentation_metrics(masks_to_onehot(pred), masks_to_onehot(truth), empty=empty)
    got = [float(m[k][0]) for k in ("dice", "iou", "precision", "recall")]
    np.testing.assert_array_equal(got, EXPECTED[case][empty])
    np.testing.assert_array_equal(m["f1"], m["dice"])
    want_acc = 1.0 if case == "both" else 1.0 - 6 / 30
    np.testing.assert_allclose(m["accuracy"], [want_acc])


def test_default_policy_is_match_and_mixed_batch():
    cases = _empty_cases()
    pred = np.concatenate([cases[c][0] for c in ("both", "truth", "pred")])
    truth = np.concatenate([cases[c][1] for c in ("both", "truth", "pred")])
    m = metrics.segmentation_metrics(masks_to_onehot(pred), masks_to_onehot(truth))
    np.testing.assert_array_equal(m["dice"], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(m["precision"], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(m["recall"], [1.0, 0.0, 0.0])


def test_nan_policy_matches_ieee_reference():
    rng = np.random.default_rng(5)
    p, y = random_case(rng, (6, 4, 4, 2), flip=0.0)
    # Make image 0 empty in both, image 1 empty in truth only.
    y[:2, ..., 0], y[:2, ..., 1] = 0.0, 1.0
    p[0, ..., 0], p[0, ..., 1] = 0.1, 0.9
    p[1, 0, 0] = [0.9, 0.1]
    got = metrics.segmentation_metrics(p, y, empty="nan")
    want = ref_metrics(p, y)
    for k in NAMES:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-6, err_msg=k)


def test_unknown_policy_raises():
    p, y = random_case(np.random.default_rng(0), (1, 3, 3, 2))
    with pytest.raises(ValueError):
        metrics.segmentation_metrics(p, y, empty="one")


def test_jit():
    p, y = random_case(np.random.default_rng(6), (2, 9, 7, 2))
    f = jax.jit(metrics.segmentation_metrics, static_argnames=("lung_channel", "empty"))
    for empty in ("match", "nan"):
        jitted, eager = f(p, y, empty=empty), metrics.segmentation_metrics(p, y, empty=empty)
        chex.assert_trees_all_close(jitted, eager)


def test_pooled_lung_counts_from_per_image_counts():
    rng = np.random.default_rng(7)
    p, y = random_case(rng, (5, 8, 10, 2))
    total = metrics.sum_counts([metrics.confusion_counts(p[:2], y[:2]),
                                metrics.confusion_counts(p[2:], y[2:])])
    pooled = metrics.metrics_from_counts(total)
    pred, true = np.argmax(p, -1) == 0, np.argmax(y, -1) == 0
    tp, fp, fn = np.sum(pred & true), np.sum(pred & ~true), np.sum(~pred & true)
    np.testing.assert_allclose(pooled["dice"], 2 * tp / (2 * tp + fp + fn))
    np.testing.assert_allclose(pooled["accuracy"], np.mean(pred == true))
    assert isinstance(pooled["dice"], np.ndarray) and pooled["dice"].dtype == np.float64


# --- the authors' pooled both-class score ------------------------------------------------------

def test_pooled_scores_match_authors_formula():
    rng = np.random.default_rng(8)
    p, y = random_case(rng, (6, 12, 14, 2))
    batches = [metrics.pooled_counts(p[i:i + 2], y[i:i + 2]) for i in range(0, 6, 2)]
    got = metrics.pooled_scores(metrics.sum_counts(batches))
    want = ref_pooled(p, y)
    for k in ("dice", "iou", "precision", "recall", "f1"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, err_msg=k)
    # Pooled over both classes with one-hot targets and a 2-class softmax, it is pixel accuracy.
    accuracy = np.mean(np.argmax(p, -1) == np.argmax(y, -1))
    np.testing.assert_allclose(got["dice"], accuracy, rtol=1e-12)
    # Summing batches equals one call on the whole set.
    whole = metrics.pooled_scores(metrics.sum_counts([metrics.pooled_counts(p, y)]))
    chex.assert_trees_all_close(whole, got)


def test_pooled_scores_three_classes_and_threshold():
    rng = np.random.default_rng(9)
    p, y = random_case(rng, (2, 10, 10, 3))
    for thr in (0.3, 0.5):
        counts = metrics.sum_counts([metrics.pooled_counts(p, y, threshold=thr)])
        got = metrics.pooled_scores(counts)
        want = ref_pooled(p, y, thr)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-12, err_msg=k)


def test_pooled_scores_empty():
    zero = {"tp": 0.0, "pred": 0.0, "true": 0.0}
    assert metrics.pooled_scores(zero)["dice"] == 1.0
    assert np.isnan(metrics.pooled_scores(zero, empty="nan")["dice"])
