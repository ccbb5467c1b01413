"""The Keras 3 peer (benchmarks/peers/keras_lung.py): exact rebuild, loss, one training step.

Needs TensorFlow/Keras 3, which the project's own venv does not have, so this module normally
skips; it runs under the peers venv (see benchmarks/peers/README.md):

    /work/venv-peers/bin/python -m pytest tests/test_keras_peer.py
"""
from __future__ import annotations

import os
import sys
import pathlib

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
pytest.importorskip("tensorflow", reason="TensorFlow (the 'peers' extra) is not installed")
keras = pytest.importorskip("keras", minversion="3.0", reason="Keras 3 is not installed")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.peers import keras_lung as kl  # noqa: E402

# TF 2.21's tensors vs numpy 2.x: Keras' own convert_to_numpy triggers this, harmlessly.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def _np_weighted_tanimoto_loss(y, p, smooth=1.0):
    """Straight numpy transcription of the authors' contour-weighted Tanimoto loss."""
    n, h, w, c = y.shape
    r = kl.contour_kernel_size(min(h, w)) // 2
    avg = np.zeros_like(y, dtype=np.float64)
    for i in range(h):
        for j in range(w):  # window clipped at the edges = padding excluded from the mean
            avg[:, i, j] = y[:, max(0, i - r):i + r + 1, max(0, j - r):j + r + 1].mean(axis=(1, 2))
    border = ((avg > 0.005) & (avg < 0.995)).astype(np.float64)
    wt = 1.0 + 2.0 * border
    wt = (wt / wt.mean()) ** 2

    def tani(pp, yy):
        return ((wt * pp * yy).sum() + smooth) / ((wt * (pp * pp + yy * yy - pp * yy)).sum() + smooth)

    return 1.0 - 0.5 * (tani(p, y) + tani(1 - p, 1 - y))


def test_kernel_size_rule():
    assert [kl.contour_kernel_size(s) for s in (150, 151, 300, 301, 600, 601)] == [
        11, 21, 21, 31, 31, 41]


def test_tiny_model_params_and_one_train_step():
    model = kl.build_lung_model(32, 32, 1)
    assert kl.count_params(model) == (kl.TRAINABLE_PARAMS, kl.TOTAL_PARAMS)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=kl.weighted_tanimoto_loss,
                  jit_compile=False)
    x, y = kl.make_batch(np.random.default_rng(0), 2, 32, 32)
    assert 0.0 < y[..., 0].mean() < 1.0
    before = [keras.ops.convert_to_numpy(v) for v in model.trainable_weights]
    loss = float(model.train_on_batch(x, y))
    assert np.isfinite(loss) and 0.0 <= loss <= 1.0
    after = [keras.ops.convert_to_numpy(v) for v in model.trainable_weights]
    changed = sum(not np.array_equal(b, a) for b, a in zip(before, after))
    assert changed == len(before)
    out = np.asarray(model.predict_on_batch(x))
    assert out.shape == (2, 32, 32, 2)
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)


def test_loss_matches_numpy_transcription():
    rng = np.random.default_rng(1)
    _, y = kl.make_batch(rng, 2, 24, 30)
    p = rng.random(y.shape)
    p = (p / p.sum(-1, keepdims=True)).astype(np.float32)
    got = float(kl.weighted_tanimoto_loss(y, p))
    assert got == pytest.approx(_np_weighted_tanimoto_loss(y.astype(np.float64), p), abs=1e-6)
    # a perfect prediction has zero loss
    assert float(kl.weighted_tanimoto_loss(y, y)) == pytest.approx(0.0, abs=1e-6)


def test_parity_with_authors_reference(authors_dir):
    key = "JMS__val_local_952__CHNCXR_0019_0"
    res = kl.check_parity(authors_dir, "JMS", keys=[key])
    assert res["load"] == {"weighted_layers": 72, "tensors": 238, "values": kl.TOTAL_PARAMS,
                           "layers_matched": 115}
    assert res["max_abs_diff"][key] <= 1e-4
