"""Surface distances against a brute-force reference (all pairs of surface points)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from crnet_jax.surface import surface_distances, surface_pixels


def _surface_reference(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (outside the image counts), by loops."""
    h, w = mask.shape
    out = np.zeros_like(mask, bool)
    for r in range(h):
        for c in range(w):
            if not mask[r, c]:
                continue
            for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                rr, cc = r + dr, c + dc
                if not (0 <= rr < h and 0 <= cc < w) or not mask[rr, cc]:
                    out[r, c] = True
    return out


def _brute_force(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float]) -> dict[str, float]:
    pa = np.argwhere(_surface_reference(a)) * np.asarray(spacing)
    pb = np.argwhere(_surface_reference(b)) * np.asarray(spacing)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))  # all pairs
    d_ab, d_ba = d.min(axis=1), d.min(axis=0)
    return {"hausdorff": max(d_ab.max(), d_ba.max()),
            "hd95": max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)),
            "assd": (d_ab.sum() + d_ba.sum()) / (d_ab.size + d_ba.size)}


def _random_mask(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Blobby random mask: a few random rectangles and discs, plus salt."""
    h, w = shape
    m = rng.random(shape) < 0.05
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(rng.integers(1, 4)):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, max(h, w) / 3)
        m |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    r0, c0 = rng.integers(0, h), rng.integers(0, w)
    m[r0:r0 + rng.integers(1, h), c0:c0 + rng.integers(1, w)] = True
    return m


def test_surface_definition_by_hand():
    m = np.zeros((5, 6), bool)
    m[1:4, 1:5] = True              # 3 x 4 block: its ring of 10 pixels is the surface
    s = surface_pixels(m)
    expected = m.copy()
    expected[2, 2:4] = False
    np.testing.assert_array_equal(s, expected)
    full = np.ones((3, 3), bool)    # touching the image border counts as outside
    np.testing.assert_array_equal(surface_pixels(full), np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], bool))
    diagonal = np.eye(4, dtype=bool)  # thin: every pixel is surface
    np.testing.assert_array_equal(surface_pixels(diagonal), diagonal)


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(4, 26)), int(rng.integers(4, 26)))
    a, b = _random_mask(rng, shape), _random_mask(rng, shape)
    spacing = (1.0, 1.0) if seed % 3 == 0 else (float(rng.uniform(0.1, 2)), float(rng.uniform(0.1, 2)))
    np.testing.assert_array_equal(surface_pixels(a), _surface_reference(a))
    got = surface_distances(a, b, spacing)
    want = _brute_force(a, b, spacing)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-9), k


def test_hand_computed_shift_with_anisotropic_spacing():
    a = np.zeros((10, 10), bool)
    a[2:5, 2:5] = True
    b = np.roll(a, 3, axis=1)       # same square, 3 columns to the right
    d = surface_distances(a, b, spacing=(0.5, 2.0))
    # Left column of a is 3 columns (6 mm) from b's nearest surface pixel; rows are not involved.
    assert d["hausdorff"] == pytest.approx(6.0)
    assert surface_distances(a, a, spacing=(0.5, 2.0)) == {"hausdorff": 0.0, "hd95": 0.0, "assd": 0.0}
    assert surface_distances(a, b)["hausdorff"] == pytest.approx(3.0)  # pixels


def test_empty_masks_follow_the_policy():
    z = np.zeros((6, 6), bool)
    m = z.copy()
    m[2:4, 2:4] = True
    assert surface_distances(z, z, empty="match") == {"hausdorff": 0.0, "hd95": 0.0, "assd": 0.0}
    for policy in ("zero", "nan"):
        assert all(math.isnan(v) for v in surface_distances(z, z, empty=policy).values())
    for policy in ("match", "zero", "nan"):
        assert all(math.isnan(v) for v in surface_distances(z, m, empty=policy).values())
        assert all(math.isnan(v) for v in surface_distances(m, z, empty=policy).values())


def test_errors_are_clear():
    with pytest.raises(ValueError, match="differ in shape"):
        surface_distances(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="spacing"):
        surface_distances(np.ones((3, 3)), np.ones((3, 3)), spacing=(0, 1))
    with pytest.raises(ValueError, match="empty"):
        surface_distances(np.ones((3, 3)), np.ones((3, 3)), empty="skip")
