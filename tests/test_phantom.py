"""Tests for the procedural CXR phantom."""
from __future__ import annotations

import time

import numpy as np
import pytest

from crnet_jax import phantom


def test_deterministic_per_seed_and_varied():
    a_img, a_mask = phantom.make_phantom(3, 128, 128)
    b_img, b_mask = phantom.make_phantom(3, 128, 128)
    c_img, c_mask = phantom.make_phantom(4, 128, 128)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert not np.array_equal(a_mask, c_mask)
    assert np.abs(a_img - c_img).mean() > 0.01


@pytest.mark.parametrize("shape", [(256, 256), (300, 340), (64, 48)])
def test_shapes_dtypes_ranges(shape):
    img, mask = phantom.make_phantom(0, *shape)
    assert img.shape == shape and mask.shape == shape
    assert img.dtype == np.float32 and mask.dtype == np.uint8
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert set(np.unique(mask)) <= {0, 1}


def test_looks_like_a_cxr():
    """Dark lungs, bright mediastinum, two separate lung fields of plausible size."""
    for seed in range(8):
        img, mask = phantom.make_phantom(seed, 256, 256)
        lung = mask.astype(bool)
        assert 0.12 < lung.mean() < 0.40, seed
        # the mediastinum (central columns at mid height) is brighter than the lungs
        centre = img[100:150, 120:136].mean()
        assert centre > img[lung].mean() + 0.2, seed
        # one lung field in each half, none across the midline at hilum height
        assert lung[:, :128].sum() > 0.3 * lung.sum() and lung[:, 128:].sum() > 0.3 * lung.sum()
        assert not lung[110, 126:130].any()
        # background outside the body (top corners) is dark
        assert img[:8, :8].mean() < 0.15


def test_mask_is_the_dark_field():
    """Mask edges coincide with the image: inside is darker than just outside."""
    img, mask = phantom.make_phantom(11, 256, 256)
    m = mask.astype(bool)
    grown = m | np.roll(m, 3, 0) | np.roll(m, -3, 0) | np.roll(m, 3, 1) | np.roll(m, -3, 1)
    ring = grown & ~m
    assert img[m].mean() < img[ring].mean() - 0.1


def test_fast_enough():
    phantom.make_phantom(0)  # warm-up
    t = time.perf_counter()
    for s in range(10):
        phantom.make_phantom(s, 256, 256)
    per = (time.perf_counter() - t) / 10
    assert per < 0.06, f"{per * 1e3:.1f} ms per 256x256 phantom"


def test_records_are_labelled_synthetic():
    rec = phantom.phantom_record(5, 64, 64)
    assert rec["id"].startswith("synthetic_") and rec["source"] == "synthetic-phantom"
    assert rec["image"].shape == (64, 64, 1) and rec["image"].dtype == np.uint16
    assert rec["mask"].shape == (64, 64, 1) and set(np.unique(rec["mask"])) <= {0, 255}
    src = phantom.PhantomSource(3, 64, 48, seed_offset=10)
    assert len(src) == 3
    assert src[1]["id"] == phantom.phantom_id(11)
    with pytest.raises(IndexError):
        src[3]


def test_in_memory_dataset():
    ds = phantom.make_phantom_dataset(4, 40, 50, seed=2)
    assert ds["image"].shape == (4, 40, 50) and ds["mask"].shape == (4, 40, 50)
    assert all(i.startswith("synthetic_") for i in ds["id"])
    np.testing.assert_array_equal(ds["image"][1], phantom.make_phantom(3, 40, 50)[0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least 16"):
        phantom.make_phantom(0, 8, 8)
    with pytest.raises(ValueError, match="seed"):
        phantom.make_phantom(-1)
    with pytest.raises(ValueError, match="num_examples"):
        phantom.PhantomSource(0)


def test_fill_polygon_exact():
    # Axis-aligned square with corners between pixel centres: exactly 4 x 4 pixels.
    sq = np.array([[1.5, 1.5], [5.5, 1.5], [5.5, 5.5], [1.5, 5.5]])
    m = phantom.fill_polygon(sq, 8, 8)
    expect = np.zeros((8, 8), bool)
    expect[2:6, 2:6] = True
    np.testing.assert_array_equal(m, expect)


def test_grid_png(tmp_path):
    p = tmp_path / "grid.png"
    phantom.save_phantom_grid(str(p), seeds=(0, 1, 2), height=64, width=64)
    assert p.stat().st_size > 0
