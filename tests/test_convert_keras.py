"""Keras HDF5 import: our network with the authors' weights reproduces their outputs."""
import json
import pathlib

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from crnet_jax.checkpoint import load_model
from crnet_jax.convert_keras import KerasImportError, load_keras_model, main, read_keras_h5
from crnet_jax.model import count_parameters

MODELS = {"JMS": "jms_model_all.h5", "V7": "v7_model_all.h5"}


def _samples(authors_dir: pathlib.Path, tag: str):
    ref = np.load(authors_dir / "keras_reference_outputs.npz")
    keys = sorted(k for k in ref.files if k.startswith(tag + "__"))
    assert len(keys) == 4, keys
    images = []
    for key in keys:
        _, split, image_id = key.split("__")
        png = authors_dir / "samples" / split / "images" / f"{image_id}.png"
        images.append(np.asarray(Image.open(png), np.float32) / 255.0)
    return keys, np.stack(images)[..., None], np.stack([ref[k] for k in keys])


@pytest.mark.parametrize("tag", sorted(MODELS))
def test_authors_models_reproduce_keras_outputs(authors_dir, tag):
    model = load_keras_model(authors_dir / MODELS[tag])
    counts = count_parameters(model)
    assert counts == {"trainable": 58_309, "batch_stats": 1_632, "total": 59_941}
    keys, x, want = _samples(authors_dir, tag)
    assert x.shape == (4, 300, 340, 1)
    got = np.asarray(jax.jit(lambda v: model(v))(jnp.asarray(x)))
    err = np.abs(got - want).max(axis=(1, 2, 3))
    assert (err <= 1e-4).all(), dict(zip(keys, err))
    if tag == "JMS":  # the README's worked figure
        i = keys.index("JMS__val_local_952__CHNCXR_0019_0")
        assert abs(got[i, ..., 0].mean() - 0.263635) < 1e-5


def test_cli_writes_a_checkpoint_that_restores(authors_dir, tmp_path, capsys):
    out = tmp_path / "jms"
    assert main([str(authors_dir / MODELS["JMS"]), str(out)]) == 0
    assert "58,309 trainable" in capsys.readouterr().out
    restored = load_model(out)
    direct = load_keras_model(authors_dir / MODELS["JMS"])
    x = jax.random.uniform(jax.random.key(0), (1, 40, 48, 1))
    np.testing.assert_array_equal(np.asarray(restored(x)), np.asarray(direct(x)))
    # refuses to overwrite without --force
    with pytest.raises(FileExistsError):
        main([str(authors_dir / MODELS["JMS"]), str(out)])
    assert main([str(authors_dir / MODELS["JMS"]), str(out), "--force"]) == 0


def test_missing_file_is_named(tmp_path):
    with pytest.raises(KerasImportError, match="no such file"):
        read_keras_h5(tmp_path / "nope.h5")


def test_not_hdf5_is_explained(tmp_path):
    bad = tmp_path / "model.h5"
    bad.write_bytes(b"this is not HDF5")
    with pytest.raises(KerasImportError, match=r"model\.h5: not a readable HDF5 file"):
        read_keras_h5(bad)


def test_weights_only_file_is_explained(tmp_path):
    f = tmp_path / "weights.h5"
    with h5py.File(f, "w") as h:
        h.create_group("conv2d")
    with pytest.raises(KerasImportError, match="no 'model_config'"):
        read_keras_h5(f)


def test_foreign_model_is_refused(tmp_path):
    """A plain CNN without residual blocks."""
    cfg = {
        "class_name": "Model",
        "config": {
            "layers": [
                {"class_name": "InputLayer", "name": "in", "config": {"name": "in", "batch_input_shape": [None, 8, 8, 1]}, "inbound_nodes": []},
                {"class_name": "Conv2D", "name": "c", "config": {"name": "c", "filters": 2, "kernel_size": [3, 3]}, "inbound_nodes": [[["in", 0, 0, {}]]]},
            ]
        },
    }
    f = tmp_path / "foreign.h5"
    with h5py.File(f, "w") as h:
        h.attrs["model_config"] = json.dumps(cfg)
    with pytest.raises(KerasImportError, match="no Add layer"):
        read_keras_h5(f)


def test_missing_weights_are_named(authors_dir, tmp_path):
    """The authors' graph with one layer's weights deleted."""
    src = authors_dir / MODELS["JMS"]
    f = tmp_path / "broken.h5"
    with h5py.File(src, "r") as a, h5py.File(f, "w") as b:
        for k, v in a.attrs.items():
            b.attrs[k] = v
        a.copy("model_weights", b)
        del b["model_weights"]["conv2d_3"]
    with pytest.raises(KerasImportError, match="no weights stored for layer 'conv2d_3'"):
        read_keras_h5(f)
