"""Tests for preprocessing: resize/geometry, OpenCV-equal equalisation, CLAHE, masks."""
from __future__ import annotations

import chex
import numpy as np
import pytest

from crnet_jax import preprocess as pp


def _equalize_reference(img: np.ndarray) -> np.ndarray:
    """OpenCV equalizeHist written as plainly as its C++ source (float32 arithmetic, cvRound)."""
    hist = [0] * 256
    for v in img.ravel():
        hist[int(v)] += 1
    i = 0
    while hist[i] == 0:
        i += 1
    total = img.size
    if hist[i] == total:
        return np.full_like(img, i)
    scale = np.float32(255.0) / np.float32(total - hist[i])
    lut = [0] * 256
    lut[i] = 0
    s = 0
    for j in range(i + 1, 256):
        s += hist[j]
        lut[j] = int(min(255, max(0, np.rint(np.float32(s) * scale))))
    return np.array([lut[int(v)] for v in img.ravel()], np.uint8).reshape(img.shape)


def test_equalize_hand_computed():
    # Levels 10 (x4), 20 (x2), 30 (x1), 200 (x1): N = 8, first level 10 holds 4 pixels.
    # scale = 255 / (8 - 4) = 63.75 ; lut[10] = 0, lut[20] = round(2 * 63.75) = 128 (127.5 -> even),
    # lut[30] = round(3 * 63.75) = round(191.25) = 191, lut[200] = 255.
    img = np.array([[10, 10, 10, 10], [20, 20, 30, 200]], np.uint8)
    out = pp.equalize_hist_u8(img)
    np.testing.assert_array_equal(out, [[0, 0, 0, 0], [128, 128, 191, 255]])


def test_equalize_matches_reference_on_random_images():
    rng = np.random.default_rng(0)
    for k in range(5):
        img = np.clip(rng.normal(100 + 20 * k, 30, (37, 41)), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(pp.equalize_hist_u8(img), _equalize_reference(img))


def test_equalize_constant_and_float_wrapper():
    const = np.full((5, 6), 77, np.uint8)
    np.testing.assert_array_equal(pp.equalize_hist_u8(const), const)
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, (20, 30)).astype(np.uint8)
    f = pp.equalize_hist(u8.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(np.rint(f * 255).astype(np.uint8), _equalize_reference(u8))
    assert f.dtype == np.float32


def test_clahe_basic_properties():
    rng = np.random.default_rng(2)
    x = np.clip(rng.normal(0.4, 0.05, (64, 80)), 0, 1).astype(np.float32)
    y = pp.clahe(x, clip_limit=2.0, tiles=(4, 4))
    assert y.shape == x.shape and y.dtype == np.float32
    assert 0 <= y.min() and y.max() <= 1
    assert y.std() > x.std()  # contrast is increased
    # monotone within a tile-free (constant LUT) image: a constant image stays near-constant
    c = pp.clahe(np.full((32, 32), 0.5, np.float32), tiles=(2, 2))
    assert np.ptp(c) == 0.0
    # odd sizes are padded internally
    assert pp.clahe(x[:61, :77], tiles=(8, 8)).shape == (61, 77)


def test_clahe_without_clipping_equals_tile_equalisation():
    # One tile and no clipping: OpenCV's CLAHE lut is round(cdf * 255 / N).
    rng = np.random.default_rng(3)
    u8 = rng.integers(0, 256, (16, 16)).astype(np.uint8)
    y = pp.clahe(u8 / 255.0, clip_limit=0.0, tiles=(1, 1))
    cdf = np.cumsum(np.bincount(u8.ravel(), minlength=256))
    expect = np.rint(cdf.astype(np.float32) * np.float32(255 / 256))[u8]
    np.testing.assert_allclose(y * 255, expect, atol=1e-3)


def test_stretch_resize_shapes_and_mask_channels():
    cfg = pp.PreprocessConfig(height=30, width=34)
    img = np.random.default_rng(0).random((64, 50)).astype(np.float32)
    mask = np.zeros((64, 50), np.float32)
    mask[10:40, 5:20] = 1.0
    x, y, g = pp.preprocess_example(img, mask, cfg)
    chex.assert_shape(x, (30, 34, 1))
    chex.assert_shape(y, (30, 34, 2))
    chex.assert_type([x, y], [np.float32, np.float32])
    np.testing.assert_array_equal(y.sum(-1), 1.0)
    assert set(np.unique(y)) <= {0.0, 1.0}
    assert g.box == (0, 0, 30, 34)


def test_mask_binarised_at_half():
    soft = np.array([[0.0, 0.49, 0.5, 0.51, 1.0]], np.float32)
    ch = pp.mask_to_channels(soft)
    np.testing.assert_array_equal(ch[..., 0], [[0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(ch[..., 1], [[1, 1, 1, 0, 0]])


def test_pad_mode_geometry_and_inverse():
    cfg = pp.PreprocessConfig(height=40, width=40, resize_mode="pad", contrast="none")
    img = np.zeros((80, 40), np.float32)
    img[:, :20] = 1.0
    x, g = pp.preprocess_image(img, cfg)
    assert g.box == (0, 10, 40, 20)
    assert x[:, :10].max() == 0 and x[:, 30:].max() == 0  # padding
    assert x[:, 10:19].min() > 0.99
    # the inverse maps a prediction back onto the original film
    back = pp.restore_prediction(x, g)
    assert back.shape == (80, 40, 1)
    np.testing.assert_allclose(back[:, :16, 0], 1.0, atol=1e-5)
    np.testing.assert_allclose(back[:, 24:, 0], 0.0, atol=1e-5)


def test_stretch_inverse_round_trip():
    cfg = pp.PreprocessConfig(height=50, width=60, contrast="none")
    rng = np.random.default_rng(4)
    img = np.kron(rng.random((6, 5)), np.ones((20, 20))).astype(np.float32)  # 120 x 100, blocky
    x, g = pp.preprocess_image(img, cfg)
    back = pp.restore_prediction(x, g)[..., 0]
    assert back.shape == img.shape
    assert np.median(np.abs(back - img)) < 0.02


def test_zscore_and_config_validation():
    cfg = pp.PreprocessConfig(height=16, width=16, scaling="zscore")
    x, _ = pp.preprocess_image(np.random.default_rng(0).random((20, 20)).astype(np.float32), cfg)
    assert abs(x.mean()) < 1e-4 and abs(x.std() - 1) < 1e-3
    with pytest.raises(ValueError, match="resize_mode"):
        pp.PreprocessConfig(resize_mode="crop")
    with pytest.raises(ValueError, match="contrast"):
        pp.PreprocessConfig(contrast="hist")


def test_mask_shape_mismatch_is_clear():
    cfg = pp.PreprocessConfig(height=16, width=16)
    with pytest.raises(ValueError, match="mask shape"):
        pp.preprocess_example(np.zeros((20, 20), np.float32), np.zeros((10, 20), np.float32), cfg)


def test_16bit_precision_kept_through_resize():
    ramp = np.linspace(0, 1, 4096, dtype=np.float32).reshape(64, 64)
    out = pp.resize_plane(ramp, (64, 64))
    np.testing.assert_array_equal(out, ramp)
    out2 = pp.resize_plane(ramp, (32, 32))
    assert len(np.unique(out2)) > 256


def test_real_cxr_equalisation_reference(mcsz512_dir):
    from PIL import Image
    u8 = np.asarray(Image.open(mcsz512_dir / "images" / "MCUCXR_0001_0.png"))
    ref = _equalize_reference(u8[::4, ::4])
    np.testing.assert_array_equal(pp.equalize_hist_u8(u8[::4, ::4]), ref)
    x, y, _ = pp.preprocess_example(u8 / 255.0, np.asarray(Image.open(mcsz512_dir / "masks" / "MCUCXR_0001_0.png")) / 255.0)
    assert x.shape == (300, 340, 1) and 0.15 < y[..., 0].mean() < 0.5
