"""Post-processing: largest components, hole filling, right/left split."""
from __future__ import annotations

import numpy as np
import pytest

from crnet_jax.postprocess import (fill_holes, keep_largest_components, label_components, postprocess_mask,
                                   split_column, split_lungs)


def _two_lungs(h: int = 40, w: int = 60) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[5:35, 5:25] = True    # image left = patient's right (larger)
    m[8:33, 35:52] = True   # image right = patient's left
    return m


def test_keeps_the_two_largest_components():
    m = _two_lungs()
    noisy = m.copy()
    noisy[0:2, 28:30] = True   # 4-pixel speck
    noisy[38, 58] = True
    out = keep_largest_components(noisy, 2)
    np.testing.assert_array_equal(out, m)
    assert label_components(noisy)[1].tolist() == [4, 600, 425, 1]
    assert keep_largest_components(m, 5).sum() == m.sum()   # fewer components than n: unchanged
    with pytest.raises(ValueError):
        keep_largest_components(m, 0)


def test_components_are_eight_connected():
    m = np.zeros((5, 5), bool)
    m[1, 1] = m[2, 2] = m[3, 3] = True      # a diagonal line is one component
    assert label_components(m)[1].tolist() == [3]


def test_fills_enclosed_holes_only():
    m = _two_lungs()
    holed = m.copy()
    holed[15:20, 10:15] = False     # enclosed hole
    notch = m.copy()
    notch[5:10, 5:8] = False        # open to the outside: stays
    np.testing.assert_array_equal(fill_holes(holed), m)
    np.testing.assert_array_equal(fill_holes(notch), notch)


def test_postprocess_is_pure_and_composes():
    m = _two_lungs()
    raw = m.copy()
    raw[15:20, 10:15] = False
    raw[0, 0] = True
    before = raw.copy()
    np.testing.assert_array_equal(postprocess_mask(raw), m)
    np.testing.assert_array_equal(raw, before)
    np.testing.assert_array_equal(postprocess_mask(raw, keep=None, fill=False), raw)


def test_split_two_lungs_patient_sides():
    m = _two_lungs()
    sides = split_lungs(m)
    assert sides["right"][:, :30].sum() == sides["right"].sum() == 600   # patient's right = image left
    assert sides["left"].sum() == 425
    assert not (sides["right"] & sides["left"]).any()
    np.testing.assert_array_equal(sides["right"] | sides["left"], m)


def test_split_fused_lungs_at_the_narrowest_column():
    m = _two_lungs()
    m[20:22, 25:35] = True      # a bridge: one component, narrowest in the middle
    s = split_column(m)
    assert 25 <= s <= 34
    sides = split_lungs(m)
    assert sides["right"].sum() + sides["left"].sum() == m.sum()
    assert sides["right"][:, :25].sum() == 600 and sides["left"][:, 35:].sum() == 425


def test_split_empty_mask():
    sides = split_lungs(np.zeros((4, 6), bool))
    assert not sides["right"].any() and not sides["left"].any()


def test_border_last_prefers_components_inside_the_film():
    lungs = np.zeros((30, 50), bool)
    lungs[10:20, 5:15] = True       # 100 px
    lungs[10:20, 25:35] = True      # 100 px
    air = lungs.copy()
    air[0:30, 45:50] = True         # 150 px of "air" on the image edge: larger than a lung
    air[25, 20:22] = True           # 2-pixel speck inside
    default = keep_largest_components(air, 2)
    assert default[:, 45:].all() and default.sum() == 250  # plain ranking by size keeps the air
    np.testing.assert_array_equal(keep_largest_components(air, 2, border_last=True), lungs)
    assert keep_largest_components(air, 3, border_last=True)[25, 20:22].all()
    np.testing.assert_array_equal(postprocess_mask(air, border_last=True), lungs)
