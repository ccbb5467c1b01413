"""predict: API on paths and arrays, checkpoint forms, forward cache, TTA, the CLI on a messy
folder, and the authors' JMS model on their samples."""
from __future__ import annotations

import csv
import pathlib

import chex
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import fixtures_data as fx
from crnet_jax import predict as P
from crnet_jax.checkpoint import save_model
from crnet_jax.config import ModelConfig
from crnet_jax.evaluate import evaluate_pair, read_binary_mask
from crnet_jax.model import ResCRNet
from crnet_jax.preprocess import PreprocessConfig, preprocess_image, restore_prediction

SMALL = PreprocessConfig(height=24, width=32)


def _tiny_model(seed: int = 0) -> ResCRNet:
    model = ResCRNet(ModelConfig(filters=2, num_conv_res=1), rngs=nnx.Rngs(seed))
    model.eval()
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    d = save_model(_tiny_model(), tmp_path_factory.mktemp("ckpt") / "model")
    P.write_preprocess_config(SMALL, d)
    return d


def test_predict_path_and_arrays_keep_the_original_geometry(model_dir, tmp_path):
    film = fx.film(50, 70, seed=3)
    path = fx.write_u8(tmp_path / "f.png", film)
    mask, probs = P.predict(path, model_dir, return_probabilities=True)
    chex.assert_shape(mask, (50, 70))
    chex.assert_shape(probs, (50, 70, 2))
    assert mask.dtype == bool and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    # the same film as uint8, uint16 and float arrays gives the same mask
    u8 = np.asarray(Image.open(path))
    for arr in (u8, u8.astype(np.uint16) * 257, u8.astype(np.float32) / 255.0, u8[..., None]):
        np.testing.assert_array_equal(P.predict(arr, model_dir), mask)


def test_same_preprocessing_as_training(model_dir):
    """predict = preprocess_image -> model -> restore_prediction -> argmax (no post-processing)."""
    model, pre, _ = P.load_checkpoint(model_dir)
    assert pre == SMALL
    film = fx.film(41, 37, seed=5)
    x, geom = preprocess_image(film, SMALL)
    want = restore_prediction(np.asarray(model(x[None]))[0], geom)
    mask, probs = P.predict(film, model_dir, return_probabilities=True, postprocess=False)
    np.testing.assert_allclose(probs, want, atol=1e-5)
    np.testing.assert_array_equal(mask, want[..., 0] >= want[..., 1])


def test_checkpoint_forms_agree_and_are_cached(model_dir):
    film = fx.film(30, 30, seed=1)
    model, _, _ = P.load_checkpoint(model_dir)
    assert P.load_checkpoint(model_dir)[0] is model          # loaded once
    by_dir = P.predict(film, model_dir, return_probabilities=True)[1]
    by_obj = P.predict(film, model, preprocess=SMALL, return_probabilities=True)[1]
    np.testing.assert_array_equal(by_dir, by_obj)
    with pytest.raises(P.CheckpointError, match="not found"):
        P.predict(film, model_dir.parent / "nope")


def test_forward_is_compiled_once_per_shape():
    model = _tiny_model(1)
    x = np.random.default_rng(0).random((2, 16, 24, 1), dtype=np.float32)
    a = P.forward(model, x)
    b = P.forward(model, x)
    np.testing.assert_array_equal(a, b)
    assert P.compiled_shapes(model) == [((2, 16, 24, 1), "float32", False)]
    P.forward(model, x[:1])
    P.forward(model, x, tta=True)
    assert len(P.compiled_shapes(model)) == 3
    P.forward(model, x[:1])
    assert len(P.compiled_shapes(model)) == 3


def test_tta_averages_with_the_flipped_film():
    model = _tiny_model(2)
    x = np.random.default_rng(1).random((1, 16, 24, 1), dtype=np.float32)
    want = 0.5 * (P.forward(model, x) + P.forward(model, x[:, :, ::-1].copy())[:, :, ::-1])
    np.testing.assert_allclose(P.forward(model, x, tta=True), want, atol=1e-6)


def test_train_mode_model_is_run_in_inference_mode():
    model = _tiny_model(3)
    model.train()
    x = np.random.default_rng(2).random((1, 16, 24, 1), dtype=np.float32)
    a, b = P.forward(model, x), P.forward(model, x)
    np.testing.assert_array_equal(a, b)                       # no dropout
    model.eval()
    np.testing.assert_allclose(a, np.asarray(model(x)), atol=1e-6)


def test_as_film_conversions():
    a12 = np.array([[0, 4095], [2048, 1024]], np.uint16)
    np.testing.assert_allclose(P.as_film(a12, bits=12), a12 / 4095.0, atol=1e-7)
    np.testing.assert_allclose(P.as_film(a12), a12 / 65535.0, atol=1e-7)
    assert P.as_film(np.ones((2, 2), bool)).dtype == np.float32
    rgb = np.zeros((3, 3, 3), np.uint8)
    rgb[..., 1] = 255
    np.testing.assert_allclose(P.as_film(rgb), 0.587, atol=1e-6)
    with pytest.raises(ValueError, match=r"expected \[0, 1\]"):
        P.as_film(np.array([[0.0, 255.0]] * 2))
    with pytest.raises(ValueError, match="greyscale"):
        P.as_film(np.zeros((2, 2, 2, 2)))


def test_cli_folder_with_bad_files(model_dir, tmp_path, capsys):
    src = tmp_path / "in"
    fx.write_u8(src / "a.png", fx.film(40, 44, seed=0))
    u16 = np.rint(fx.film(36, 30, seed=1) * 65535).astype(np.uint16)
    (src / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(u16).save(src / "sub" / "b16.tif")
    fx.write_dicom(src / "sub" / "deeper" / "c.dcm", np.rint(fx.film(32, 32, seed=2) * 4095).astype(np.uint16),
                   spacing=(0.2, 0.25))
    Image.fromarray(np.rint(fx.film(30, 34, seed=4) * 255).astype(np.uint8)).save(src / "sub" / "e.jpeg", quality=90)
    (src / "sub" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    rc = P.main([str(src), str(out), "--checkpoint", str(model_dir), "--batch-size", "2", "--quiet"])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    errors = list(csv.DictReader(open(out / "errors.csv")))
    assert sorted(r["file"] for r in rows) == ["a.png", "sub/b16.tif", "sub/deeper/c.dcm", "sub/e.jpeg"]
    assert sorted(e["file"] for e in errors) == ["empty.jpg", "notes.txt", "sub/corrupt.png"]
    assert all(e["stage"] == "read" and e["file"].split("/")[-1] in e["error"] for e in errors)
    by = {r["file"]: r for r in rows}
    for r in rows:
        m = np.asarray(Image.open(out / r["mask"]))
        assert m.shape == (int(r["height"]), int(r["width"])) and set(np.unique(m)) <= {0, 255}
        assert int(r["lung_area_px"]) == int((m == 255).sum())
        assert int(r["right_lung_area_px"]) + int(r["left_lung_area_px"]) == int(r["lung_area_px"])
        assert np.asarray(Image.open(out / r["overlay"])).shape == m.shape + (3,)
    assert by["sub/b16.tif"]["bits"] == "16" and by["sub/b16.tif"]["lung_area_mm2"] == ""
    assert (out / "masks" / "sub" / "deeper" / "c.png").is_file()
    dcm = by["sub/deeper/c.dcm"]
    assert float(dcm["lung_area_mm2"]) == pytest.approx(int(dcm["lung_area_px"]) * 0.05, abs=0.01)
    assert "3 file(s) could not be segmented" in capsys.readouterr().err
    # a single file
    assert P.main([str(src / "sub" / "e.jpeg"), str(tmp_path / "one"), "--checkpoint", str(model_dir), "--quiet",
                   "--tta", "--no-overlays"]) == 0
    assert [r["file"] for r in csv.DictReader(open(tmp_path / "one" / "predictions.csv"))] == ["e.jpeg"]
    assert (tmp_path / "one" / "masks" / "e.png").is_file() and not (tmp_path / "one" / "overlays").exists()


def test_output_names_avoid_collisions(tmp_path):
    files = [tmp_path / "x.png", tmp_path / "x.dcm", tmp_path / "d" / "y.tif"]
    names = P.output_names(files, tmp_path)
    assert names[files[0]] == pathlib.Path("x.png.png") and names[files[1]] == pathlib.Path("x.dcm.png")
    assert names[files[2]] == pathlib.Path("d/y.png")


def test_authors_jms_on_their_samples(authors_dir):
    """The authors' JMS model (Keras .h5, converted on the fly) on their 952-set samples: lung
    Dice against the sample's own lung mask > 0.9, with and without TTA."""
    h5 = authors_dir / "jms_model_all.h5"
    images = sorted(authors_dir.glob("samples/*_952/images/*.png"))
    assert images
    for img in images:
        truth, _, _ = read_binary_mask(img.parent.parent / "lungs" / img.name)
        mask = P.predict(img, h5)
        chex.assert_shape(mask, truth.shape)
        assert evaluate_pair(mask, truth)["dice"] > 0.9, img.name
    img = images[0]
    truth, _, _ = read_binary_mask(img.parent.parent / "lungs" / img.name)
    assert evaluate_pair(P.predict(img, h5, tta=True), truth)["dice"] > 0.9
