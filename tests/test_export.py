"""export: the serialised jax.export artifact reproduces the inference outputs, with a symbolic
batch, and runs in a process that never imports crnet_jax."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import fixtures_data as fx
from crnet_jax import export as X
from crnet_jax import predict as P
from crnet_jax.checkpoint import save_model
from crnet_jax.config import ModelConfig
from crnet_jax.model import ResCRNet
from crnet_jax.preprocess import PreprocessConfig, equalize_hist

SMALL = PreprocessConfig(height=24, width=32)


@pytest.fixture(scope="module")
def model() -> ResCRNet:
    m = ResCRNet(ModelConfig(filters=2, num_conv_res=1), rngs=nnx.Rngs(0))
    m.eval()
    return m


@pytest.fixture(scope="module")
def films() -> np.ndarray:
    return np.stack([fx.film(24, 32, seed=s) for s in range(3)])


def test_equalisation_in_jax_matches_preprocess():
    rng = np.random.default_rng(0)
    cases = [rng.random((17, 23), dtype=np.float32), rng.random((8, 8), dtype=np.float32) ** 3,
             np.full((5, 6), 0.4, np.float32), np.zeros((4, 4), np.float32)]
    for x in cases:
        got, want = np.asarray(jax.jit(X.equalize_hist_jax)(x)), equalize_hist(x)
        np.testing.assert_array_equal(np.rint(got * 255), np.rint(want * 255))  # same grey levels
        np.testing.assert_allclose(got, want, atol=1e-7)  # XLA divides by 255 as * (1/255): 1 ulp


def test_artifact_reproduces_outputs_with_symbolic_batch(model, films):
    exported = X.export_model(model, (24, 32), SMALL)
    assert str(exported.in_avals[0].shape[0]) == "b"
    restored = jax.export.deserialize(bytearray(exported.serialize()))
    fn = jax.jit(X.inference_function(model, (24, 32), SMALL))
    for batch in (films[:1], films):
        got = np.asarray(restored.call(batch))
        np.testing.assert_allclose(got, np.asarray(fn(batch)), atol=1e-6)
        # and the predict pipeline (NumPy preprocessing, same network size: no resampling)
        for film, p in zip(batch, got):
            _, want = P.predict(film, model, preprocess=SMALL, return_probabilities=True)
            np.testing.assert_allclose(p, want, atol=1e-5)


def test_artifact_resizes_other_film_sizes(model):
    film = fx.film(40, 50, seed=7)
    exported = jax.export.deserialize(bytearray(X.export_model(model, (40, 50), SMALL, batch=1).serialize()))
    got = np.asarray(exported.call(film[None]))[0]
    assert got.shape == (40, 50, 2)
    mask, want = P.predict(film, model, preprocess=SMALL, return_probabilities=True, postprocess=False)
    # Pillow vs jax.image antialiased resizing differ by ~1e-6 before 8-bit equalisation
    assert np.mean((got[..., 0] >= got[..., 1]) == mask) > 0.98
    assert np.abs(got - want).mean() < 0.02


def test_cli_and_a_process_without_crnet_jax(model, films, tmp_path):
    ckpt = save_model(model, tmp_path / "model")
    P.write_preprocess_config(SMALL, ckpt)
    out = tmp_path / "m.jaxexport"
    assert X.main([str(ckpt), str(out), "--height", "24", "--width", "32"]) == 0
    info = json.loads(pathlib.Path(str(out) + ".json").read_text())
    assert info["input"]["shape"] == ["B", 24, 32] and info["preprocess"]["height"] == 24
    np.save(tmp_path / "films.npy", films)
    code = (
        "import sys, numpy as np, jax\n"
        f"e = jax.export.deserialize(bytearray(open({str(out)!r}, 'rb').read()))\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, np.asarray(e.call(np.load({str(tmp_path / 'films.npy')!r}))))\n"
        "assert not any(m.startswith('crnet_jax') for m in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env, timeout=120)
    want = np.asarray(X.load_exported(out).call(films))
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want, atol=1e-6)


def test_clear_errors(model, tmp_path):
    with pytest.raises(NotImplementedError, match="CLAHE"):
        X.inference_function(model, (24, 32), PreprocessConfig(height=24, width=32, contrast="clahe"))
    bad = tmp_path / "bad.jaxexport"
    bad.write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a jax.export artifact"):
        X.load_exported(bad)
