"""Tests for on-device augmentation."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crnet_jax import augment as A
from crnet_jax import phantom
from crnet_jax import preprocess as pp

_warp = jax.jit(A.warp, static_argnums=(3, 4))


@pytest.fixture(scope="module")
def batch():
    imgs, masks = [], []
    for s in range(4):
        img, m = phantom.make_phantom(s, 48, 56)
        imgs.append(img[..., None])
        masks.append(pp.mask_to_channels(m.astype(np.float32)))
    return jnp.asarray(np.stack(imgs)), jnp.asarray(np.stack(masks))


def test_identity_changes_nothing(batch):
    x, y = batch
    ox, oy = A.augment_batch(x, y, 0, 0, A.AugmentConfig.none())
    np.testing.assert_array_equal(np.asarray(ox), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(oy), np.asarray(y))
    # identity matrix through warp directly, every fill mode
    for mode in ("reflect", "nearest", "constant"):
        wx, wy = _warp(x[0], y[0], jnp.eye(3), mode)
        np.testing.assert_array_equal(np.asarray(wx), np.asarray(x[0]))
        np.testing.assert_array_equal(np.asarray(wy), np.asarray(y[0]))


def test_shapes_types_and_binary_masks(batch):
    x, y = batch
    ox, oy = A.augment_batch(x, y, 1, 2, A.AugmentConfig.authors())
    chex.assert_shape([ox, oy], [x.shape, y.shape])
    chex.assert_type([ox, oy], [jnp.float32, jnp.float32])
    assert set(np.unique(np.asarray(oy))) <= {0.0, 1.0}
    np.testing.assert_array_equal(np.asarray(oy).sum(-1), 1.0)


def test_same_seed_same_batch_and_different_steps_differ(batch):
    x, y = batch
    cfg = A.AugmentConfig()
    a = A.augment_batch(x, y, 7, 3, cfg)
    b = A.augment_batch(x, y, 7, 3, cfg)
    c = A.augment_batch(x, y, 7, 4, cfg)
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    # examples in a batch get different transforms
    p0 = A.sample_params(A.example_keys(7, 3, 2)[0], cfg)
    p1 = A.sample_params(A.example_keys(7, 3, 2)[1], cfg)
    assert float(p0["theta"]) != float(p1["theta"])


def test_per_example_determinism_with_offset(batch):
    """Example i at offset k equals example k + i of a batch at offset 0 (multi-host safe)."""
    x, y = batch
    cfg = A.AugmentConfig.authors()
    full = A.augment_batch(x, y, 5, 9, cfg)
    part = A.augment_batch(x[2:], y[2:], 5, 9, cfg, example_offset=2)
    np.testing.assert_array_equal(np.asarray(full[0][2:]), np.asarray(part[0]))


@pytest.mark.parametrize("cfg", [A.AugmentConfig.authors(), A.AugmentConfig(fill_mode="constant", shear_deg=10.0),
                                 A.AugmentConfig(fill_mode="nearest", hflip_prob=1.0)])
def test_image_and_mask_stay_aligned(cfg):
    """If the image IS the mask, the warped image thresholded equals the warped mask."""
    m = np.stack([phantom.make_phantom(s, 40, 44)[1] for s in range(3)]).astype(np.float32)
    y = jnp.asarray(np.stack([pp.mask_to_channels(mm) for mm in m]))
    x = y[..., :1]
    cfg = A.AugmentConfig(**{**cfg.__dict__, "gamma": 0.0, "contrast": 0.0, "noise_std": 0.0, "brightness": 0.0})
    ox, oy = A.augment_batch(x, y, 3, 1, cfg)
    np.testing.assert_array_equal(np.asarray(ox[..., 0] > 0.5), np.asarray(oy[..., 0] > 0.5))


def test_known_transforms():
    img = jnp.arange(20.0).reshape(4, 5, 1)
    mask = jnp.stack([jnp.zeros((4, 5)), jnp.ones((4, 5))], -1)
    p = A.sample_params(jax.random.PRNGKey(0), A.AugmentConfig.none())
    # horizontal flip
    m = A.affine_matrix({**p, "hflip": jnp.array(True)}, 4, 5)
    out, _ = _warp(img, mask, m)
    np.testing.assert_allclose(np.asarray(out[..., 0]), np.asarray(img[:, ::-1, 0]))
    # vertical flip
    m = A.affine_matrix({**p, "vflip": jnp.array(True)}, 4, 5)
    out, _ = _warp(img, mask, m)
    np.testing.assert_allclose(np.asarray(out[..., 0]), np.asarray(img[::-1, :, 0]))
    # shift by one column (tx = 1 / W): output column c samples input column c + 1, reflect at the edge
    m = A.affine_matrix({**p, "tx": jnp.array(1 / 5)}, 4, 5)
    out, _ = _warp(img, mask, m, "reflect")
    np.testing.assert_allclose(np.asarray(out[:, :4, 0]), np.asarray(img[:, 1:, 0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out[:, 4, 0]), np.asarray(img[:, 4, 0]), atol=1e-5)  # dcba|abcd
    # 180 degree rotation == both flips
    m = A.affine_matrix({**p, "theta": jnp.array(np.pi)}, 4, 5)
    out, _ = _warp(img, mask, m)
    np.testing.assert_allclose(np.asarray(out[..., 0]), np.asarray(img[::-1, ::-1, 0]), atol=1e-4)


def test_intensity_options_change_image_only(batch):
    x, y = batch
    geo_free = A.AugmentConfig(rotation_deg=0, shift=0, zoom=0, gamma=0.3, contrast=0.3, brightness=0.1, noise_std=0.05)
    ox, oy = A.augment_batch(x, y, 0, 0, geo_free)
    np.testing.assert_array_equal(np.asarray(oy), np.asarray(y))
    assert float(jnp.abs(ox - x).mean()) > 0.01
    assert 0.0 <= float(ox.min()) and float(ox.max()) <= 1.0


def test_config_validation():
    with pytest.raises(ValueError, match="fill_mode"):
        A.AugmentConfig(fill_mode="wrap")
    with pytest.raises(ValueError, match="hflip_prob"):
        A.AugmentConfig(hflip_prob=2.0)
    assert A.AugmentConfig.authors().rotation_deg == 90.0 and A.AugmentConfig.authors().vflip_prob == 0.5
    assert A.AugmentConfig().vflip_prob == 0.0


def test_vmap_and_jit_compose(batch):
    x, y = batch
    cfg = A.AugmentConfig()
    keys = A.example_keys(0, 0, x.shape[0])
    f = jax.jit(jax.vmap(lambda k, a, b: A.augment_example(k, a, b, cfg)))
    ox, oy = f(keys, x, y)
    rx, ry = A.augment_batch(x, y, 0, 0, cfg)
    np.testing.assert_allclose(np.asarray(ox), np.asarray(rx), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(oy), np.asarray(ry))
    with pytest.raises(ValueError, match="mask"):
        A.augment_batch(x, y[..., :1], 0, 0, cfg)
