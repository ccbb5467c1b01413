"""crnet_jax.losses against an independent float64 NumPy reference."""
from __future__ import annotations

import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crnet_jax import losses

# (shape, expected window): odd and even sizes, one per window regime.
SHAPES = [
    ((2, 63, 81, 2), 11),
    ((2, 64, 80, 2), 11),
    ((2, 201, 171, 2), 21),
    ((1, 321, 401, 2), 31),
]


# --- float64 NumPy reference -------------------------------------------------------------------

def ref_window(short_axis: int) -> int:
    if short_axis <= 150:
        return 11
    if short_axis <= 300:
        return 21
    if short_axis <= 600:
        return 31
    return 41


def ref_box_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Window mean by explicit shifts over every window offset, padding excluded."""
    x = np.asarray(x, np.float64)
    b, h, w, k = x.shape
    r = window // 2
    xp = np.zeros((b, h + 2 * r, w + 2 * r, k))
    xp[:, r:r + h, r:r + w] = x
    inside = np.zeros((h + 2 * r, w + 2 * r))
    inside[r:r + h, r:r + w] = 1.0
    total = np.zeros_like(x)
    count = np.zeros((h, w))
    for dy in range(window):
        for dx in range(window):
            total += xp[:, dy:dy + h, dx:dx + w]
            count += inside[dy:dy + h, dx:dx + w]
    return total / count[None, :, :, None]


def ref_weights(y: np.ndarray, window: int | None = None) -> np.ndarray:
    y = np.asarray(y, np.float64)
    if window is None:
        window = ref_window(min(y.shape[1:3]))
    m = ref_box_mean(y, window)
    w = np.where((m > 0.005) & (m < 0.995), 3.0, 1.0)
    w = w / w.mean()
    return w ** 2


def ref_tanimoto(p, y, w=None, smooth=1.0, per_image=False):
    p = np.asarray(p, np.float64)
    y = np.asarray(y, np.float64)
    w = np.ones_like(p) if w is None else np.asarray(w, np.float64)
    axes = (1, 2, 3) if per_image else None
    num = (w * p * y).sum(axis=axes) + smooth
    return num / ((w * (p * p + y * y - p * y)).sum(axis=axes) + smooth)


def ref_tanimoto_loss(p, y, weighted=True, smooth=1.0, per_image=False, w=None):
    """1 - dual Tanimoto; ``w`` (a precomputed :func:`ref_weights`) saves time when given."""
    if weighted and w is None:
        w = ref_weights(y)
    if not weighted:
        w = None
    p = np.asarray(p, np.float64)
    y = np.asarray(y, np.float64)
    t = 0.5 * (ref_tanimoto(p, y, w, smooth, per_image) + ref_tanimoto(1 - p, 1 - y, w, smooth, per_image))
    return np.mean(1.0 - t)


def ref_defu_dice_loss(p, y, smooth=1.0, per_image=False):
    p = np.asarray(p, np.float64)
    y = np.asarray(y, np.float64)
    axes = (1, 2, 3) if per_image else None
    num = 2 * (p * y).sum(axis=axes) + smooth
    d = num / ((p * p).sum(axis=axes) + (y * y).sum(axis=axes) + smooth)
    return np.mean(1.0 - d)


# --- random inputs -----------------------------------------------------------------------------

def blob_targets(rng: np.random.Generator, shape) -> np.ndarray:
    """One-hot (B, H, W, 2) targets with a few elliptical 'lungs' (channel 0) per image."""
    b, h, w, _ = shape
    ii, jj = np.mgrid[0:h, 0:w]
    lung = np.zeros((b, h, w), bool)
    for n in range(b):
        for _ in range(2):
            ci, cj = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
            ri, rj = rng.uniform(0.1, 0.3) * h, rng.uniform(0.1, 0.25) * w
            lung[n] |= ((ii - ci) / ri) ** 2 + ((jj - cj) / rj) ** 2 <= 1.0
    lung = lung.astype(np.float32)
    return np.stack([lung, 1.0 - lung], axis=-1)


def softmax_predictions(rng: np.random.Generator, y: np.ndarray, noise: float = 1.5) -> np.ndarray:
    logits = 2.0 * (y - 0.5) + noise * rng.standard_normal(y.shape)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def cases():
    rng = np.random.default_rng(0)
    out = []
    for shape, window in SHAPES:
        y = blob_targets(rng, shape)
        out.append((y, softmax_predictions(rng, y), window, ref_weights(y)))
    return out


# --- tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("short,expected", [(10, 11), (150, 11), (151, 21), (300, 21), (301, 31),
                                            (600, 31), (601, 41), (2048, 41)])
def test_window_size_regimes(short, expected):
    assert losses.window_size(short) == expected == ref_window(short)


def test_box_mean_matches_loops(cases):
    rng = np.random.default_rng(1)
    for y, _, window, _ in cases:
        assert losses.window_size(min(y.shape[1:3])) == window
        chex.assert_trees_all_close(np.asarray(losses.box_mean(y, window)), ref_box_mean(y, window),
                                    atol=2e-6)
    # Soft values, window larger than the image (41 on 23 x 30), and the 1-pixel window.
    x = rng.uniform(size=(2, 23, 30, 3)).astype(np.float32)
    for window in (1, 3, 41):
        chex.assert_trees_all_close(np.asarray(losses.box_mean(x, window)), ref_box_mean(x, window),
                                    atol=2e-6)


def test_box_mean_rejects_even_window():
    with pytest.raises(ValueError):
        losses.box_mean(jnp.zeros((1, 8, 8, 1)), 4)


def test_contour_weights_match_reference(cases):
    for y, _, _, wref in cases:
        w = np.asarray(losses.contour_weights(y))
        assert w.dtype == np.float32 and w.shape == y.shape
        chex.assert_trees_all_close(w, wref, rtol=1e-6)
        # The unsquared map has mean 1 over the whole batch tensor; borders exist.
        np.testing.assert_allclose(np.sqrt(w).mean(), 1.0, rtol=1e-5)
        assert len(np.unique(w)) == 2


def test_contour_weights_flat_target_is_uniform():
    y = jnp.concatenate([jnp.ones((2, 40, 50, 1)), jnp.zeros((2, 40, 50, 1))], axis=-1)
    chex.assert_trees_all_close(losses.contour_weights(y), jnp.ones_like(y))


def test_contour_weights_carry_no_gradient(cases):
    y = jnp.asarray(cases[0][0])
    g = jax.grad(lambda t: jnp.sum(losses.contour_weights(t) * t))(y)
    # d/dt sum(w * t) with w constant is w itself.
    chex.assert_trees_all_close(g, losses.contour_weights(y))


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("per_image", [False, True])
def test_tanimoto_loss_matches_reference(cases, weighted, per_image):
    for y, p, _, wref in cases:
        got = losses.tanimoto_loss(p, y, weighted=weighted, per_image=per_image)
        chex.assert_shape(got, ())
        chex.assert_type(got, jnp.float32)
        want = ref_tanimoto_loss(p, y, weighted=weighted, per_image=per_image, w=wref)
        np.testing.assert_allclose(float(got), want, rtol=2e-5, atol=1e-6)
        assert 0.05 < want < 0.95  # non-trivial inputs


def test_tanimoto_coefficients_match_reference(cases):
    y, p, _, wr = cases[2]
    w = losses.contour_weights(y)
    for smooth in (1.0, 0.0, 1e-5):
        np.testing.assert_allclose(losses.tanimoto(p, y, smooth=smooth),
                                   ref_tanimoto(p, y, smooth=smooth), rtol=2e-5)
        vec = losses.tanimoto(p, y, w, smooth=smooth, per_image=True)
        chex.assert_shape(vec, (y.shape[0],))
        np.testing.assert_allclose(vec, ref_tanimoto(p, y, wr, smooth, per_image=True), rtol=2e-5)
        dual = losses.tanimoto_dual(p, y, w, smooth=smooth, per_image=True)
        want = 0.5 * (ref_tanimoto(p, y, wr, smooth, True)
                      + ref_tanimoto(1 - p, 1 - y, wr, smooth, True))
        np.testing.assert_allclose(dual, want, rtol=2e-5)
        np.testing.assert_allclose(float(losses.tanimoto_loss(p, y, per_image=True, smooth=smooth)),
                                   np.mean(1 - want), rtol=2e-5)


@pytest.mark.parametrize("per_image", [False, True])
def test_defu_dice_loss_matches_reference(cases, per_image):
    for y, p, _, _ in cases:
        got = losses.defu_dice_loss(p, y, per_image=per_image)
        np.testing.assert_allclose(float(got), ref_defu_dice_loss(p, y, per_image=per_image),
                                   rtol=2e-5, atol=1e-6)
    y, p, _, _ = cases[0]
    chex.assert_shape(losses.defu_dice(p, y, per_image=True), (y.shape[0],))


def test_perfect_prediction_gives_zero_loss(cases):
    for y, _, _, _ in cases:
        for per_image in (False, True):
            for weighted in (True, False):
                loss = losses.tanimoto_loss(y, y, weighted=weighted, per_image=per_image)
                assert float(loss) == 0.0
            np.testing.assert_allclose(float(losses.defu_dice_loss(y, y, per_image=per_image)), 0.0,
                                       atol=1e-7)
    # Also with no smoothing, and for an image with no lung at all.
    y = cases[0][0].copy()
    y[0, ..., 0], y[0, ..., 1] = 0.0, 1.0
    assert float(losses.tanimoto_loss(y, y, smooth=0.0)) == 0.0
    assert float(losses.tanimoto_loss(y, y, per_image=True)) == 0.0


def test_wrong_prediction_gives_large_loss(cases):
    y = cases[1][0]
    assert float(losses.tanimoto_loss(1.0 - y, y)) > 0.99
    assert float(losses.defu_dice_loss(1.0 - y, y)) > 0.99


def test_gradients_finite_with_exact_zeros_and_ones(cases):
    y, p_soft, _, _ = cases[0]
    flipped = y.copy()
    flipped[:, :10] = 1.0 - flipped[:, :10]          # hard, partly wrong
    p_mixed = np.where(np.arange(y.shape[2])[None, None, :, None] % 2 == 0, y, p_soft)
    fns = [
        lambda q: losses.tanimoto_loss(q, y),
        lambda q: losses.tanimoto_loss(q, y, weighted=False, per_image=True),
        lambda q: losses.tanimoto_loss(q, y, smooth=0.0),
        lambda q: losses.defu_dice_loss(q, y),
        lambda q: losses.defu_dice_loss(q, y, per_image=True),
    ]
    for p in (y, flipped, p_mixed, np.zeros_like(y), np.ones_like(y)):
        for fn in fns:
            g = jax.grad(fn)(jnp.asarray(p))
            chex.assert_tree_all_finite(g)
            chex.assert_shape(g, y.shape)


def test_gradient_matches_finite_difference():
    rng = np.random.default_rng(2)
    y = blob_targets(rng, (1, 20, 24, 2))
    p = softmax_predictions(rng, y).astype(np.float64)
    g = np.asarray(jax.grad(lambda q: losses.tanimoto_loss(q, y))(jnp.asarray(p, jnp.float32)))
    for idx in [(0, 3, 4, 0), (0, 10, 12, 1), (0, 19, 0, 0)]:
        e = np.zeros_like(p)
        e[idx] = 1e-3
        fd = (ref_tanimoto_loss(p + e, y) - ref_tanimoto_loss(p - e, y)) / 2e-3
        np.testing.assert_allclose(g[idx], fd, rtol=2e-3, atol=1e-7)


def test_bfloat16_inputs_close(cases):
    for y, p, _, wref in cases[:3]:
        pb, yb = jnp.asarray(p, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16)
        for weighted in (True, False):
            got = losses.tanimoto_loss(pb, yb, weighted=weighted)
            chex.assert_type(got, jnp.float32)
            want = ref_tanimoto_loss(p, y, weighted=weighted, w=wref)
            np.testing.assert_allclose(float(got), want, atol=5e-3)
        got = losses.defu_dice_loss(pb, yb, per_image=True)
        chex.assert_type(got, jnp.float32)
        np.testing.assert_allclose(float(got), ref_defu_dice_loss(p, y, per_image=True), atol=5e-3)
        # One-hot targets are exact in bfloat16, so the weight map is identical.
        chex.assert_trees_all_equal(losses.contour_weights(yb), losses.contour_weights(y))


def test_jit_matches_eager(cases):
    y, p, _, _ = cases[1]
    f = jax.jit(losses.tanimoto_loss, static_argnames=("weighted", "per_image", "window"))
    for per_image in (False, True):
        np.testing.assert_allclose(float(f(p, y, per_image=per_image)),
                                   float(losses.tanimoto_loss(p, y, per_image=per_image)), rtol=1e-6)
    np.testing.assert_allclose(float(jax.jit(losses.defu_dice_loss)(p, y)),
                               float(losses.defu_dice_loss(p, y)), rtol=1e-6)


def test_matches_authors_keras_on_shared_samples(authors_dir: pathlib.Path):
    """The authors' JMS model outputs on the four shipped samples, scored with the authors' loss.

    Expected values were computed once with TensorFlow 2.21 (tf.nn.avg_pool2d 'SAME', float32),
    transcribing the authors' ``weights``/``weighted_tani_loss``/``tani_coeff`` with LS = 1.
    """
    from PIL import Image

    ref = np.load(authors_dir / "keras_reference_outputs.npz")
    ps, ys = [], []
    for key in sorted(k for k in ref.files if k.startswith("JMS__")):
        _, split, ident = key.split("__")
        folder = authors_dir / "samples" / split
        chans = [np.asarray(Image.open(folder / c / f"{ident}.png").convert("L"), np.float32) / 255.0
                 for c in ("lungs", "non_lungs")]
        ys.append(np.stack(chans, -1))
        ps.append(ref[key])
    p, y = np.stack(ps), np.stack(ys)
    chex.assert_shape(p, (4, 300, 340, 2))
    np.testing.assert_allclose(float(losses.tanimoto_loss(p, y)), 0.18355423, rtol=1e-5)
    np.testing.assert_allclose(float(losses.tanimoto_dual(p, y)), 0.84638375, rtol=1e-5)
    np.testing.assert_allclose(float(losses.tanimoto_loss(p, y)), ref_tanimoto_loss(p, y),
                               rtol=1e-5)
