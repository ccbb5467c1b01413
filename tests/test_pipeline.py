"""grain input pipeline: batches, per-epoch shuffling, sharding, exact resume, TFDS sources."""
from __future__ import annotations

import time

import chex
import numpy as np
import pytest

from crnet_jax import datasets as D
from crnet_jax import pipeline as pl
from crnet_jax import preprocess as pp

import fixtures_data as fx

PRE = pp.PreprocessConfig(height=32, width=40)


def _ids(batches) -> list[str]:
    return [i for b in batches for i in b["id"]]


def test_phantom_batches():
    it = pl.make_iterator(pl.phantom_source(12, 48, 40), PRE, pl.PipelineConfig(batch_size=4, seed=0), 0, 1)
    b = next(it)
    assert set(b) == {"image", "mask", "id"}
    chex.assert_shape(b["image"], (4, 32, 40, 1))
    chex.assert_shape(b["mask"], (4, 32, 40, 2))
    chex.assert_type([b["image"], b["mask"]], [np.float32, np.float32])
    np.testing.assert_array_equal(b["mask"].sum(-1), 1.0)
    assert all(i.startswith("synthetic_") for i in b["id"])


def test_eval_mode_every_example_once_in_order():
    cfg = pl.PipelineConfig(batch_size=4, shuffle=False, num_epochs=1, drop_remainder=False)
    batches = list(pl.make_iterator(pl.phantom_source(10, 24, 24), PRE, cfg, 0, 1))
    assert [len(b["id"]) for b in batches] == [4, 4, 2]
    assert _ids(batches) == [f"synthetic_phantom_{i:06d}" for i in range(10)]


def test_shuffled_differently_each_epoch():
    cfg = pl.PipelineConfig(batch_size=4, shuffle=True, seed=3, num_epochs=2)
    ids = _ids(pl.make_iterator(pl.phantom_source(16, 24, 24), PRE, cfg, 0, 1))
    first, second = ids[:16], ids[16:]
    assert sorted(first) == sorted(second) == sorted(set(first)) and len(set(first)) == 16
    assert first != second
    assert first != sorted(first)
    again = _ids(pl.make_iterator(pl.phantom_source(16, 24, 24), PRE, cfg, 0, 1))
    assert again == ids  # same seed, same order
    other = _ids(pl.make_iterator(pl.phantom_source(16, 24, 24), PRE, pl.PipelineConfig(batch_size=4, seed=4, num_epochs=2), 0, 1))
    assert other != ids


def test_sharding_per_process_is_disjoint_and_even():
    src = pl.phantom_source(11, 24, 24)
    cfg = pl.PipelineConfig(batch_size=1, shuffle=True, seed=0, num_epochs=1)
    shards = [set(_ids(pl.make_iterator(src, PRE, cfg, i, 2))) for i in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert not shards[0] & shards[1]


def test_resume_exactly_from_saved_state(tmp_path):
    src = pl.phantom_source(20, 24, 24)
    cfg = pl.PipelineConfig(batch_size=3, seed=5)
    it = pl.make_iterator(src, PRE, cfg, 0, 1)
    for _ in range(4):
        next(it)
    pl.save_state(it, tmp_path / "data_state.json")
    state = it.get_state()
    expected = [next(it) for _ in range(4)]  # crosses an epoch boundary (20 / 3)
    for restore in ("dict", "file"):
        it2 = pl.make_iterator(src, PRE, cfg, 0, 1)
        if restore == "dict":
            it2.set_state(state)
        else:
            pl.restore_state(it2, tmp_path / "data_state.json")
        got = [next(it2) for _ in range(4)]
        for a, b in zip(expected, got):
            assert list(a["id"]) == list(b["id"])
            np.testing.assert_array_equal(a["image"], b["image"])


def test_tfds_source_through_pipeline(tmp_path):
    ids = fx.make_folder(tmp_path / "fo", n=6, h=40, w=30)
    cfg = D.CxrConfig(name="pipe", height=48, width=48, split_fractions=(1.0, 0.0, 0.0))
    D.build("cxr_folder", tmp_path / "tfds", tmp_path / "fo", cfg)
    src = pl.tfds_source("cxr_folder", "train", tmp_path / "tfds", cfg)
    batches = list(pl.make_iterator(src, PRE, pl.PipelineConfig(batch_size=2, shuffle=True, num_epochs=1), 0, 1))
    assert sorted(_ids(batches)) == sorted(ids)
    b = batches[0]
    chex.assert_shape([b["image"], b["mask"]], [(2, 32, 40, 1), (2, 32, 40, 2)])
    assert 0.05 < b["mask"][..., 0].mean() < 0.7


def test_pad_mode_restores_aspect_from_stretched_storage():
    # Stored stretched to 32 x 32 from a 20 x 40 (H x W) original.
    rec = {"image": np.full((32, 32, 1), 40000, np.uint16), "mask": np.full((32, 32, 1), 255, np.uint8),
           "id": b"wide", "original_shape": np.array([20, 40], np.int32), "content_box": np.array([0, 0, 32, 32], np.int32)}
    out = pl.decode_record(rec, pp.PreprocessConfig(height=40, width=40, resize_mode="pad", contrast="none"))
    lung = out["mask"][..., 0]
    assert lung[:10].max() == 0 and lung[30:].max() == 0 and lung[10:30].min() == 1
    assert out["id"] == "wide"
    out2 = pl.decode_record(rec, pp.PreprocessConfig(height=40, width=40, contrast="none"))
    assert out2["mask"][..., 0].min() == 1  # stretch fills the frame


def test_bad_configs():
    with pytest.raises(ValueError, match="batch_size"):
        pl.PipelineConfig(batch_size=0)
    with pytest.raises(ValueError, match="cannot be shared"):
        pl.make_dataset(pl.phantom_source(2, 24, 24), PRE, pl.PipelineConfig(), 0, 4)


@pytest.mark.slow
def test_throughput_keeps_up_with_training(capsys):
    """300 x 340, batch 8: the pipeline must deliver well over 8 images/s (one 1-s step)."""
    it = pl.make_iterator(pl.phantom_source(200, 300, 340), pp.PreprocessConfig(), pl.PipelineConfig(batch_size=8), 0, 1)
    next(it)
    t = time.perf_counter()
    n = 0
    for _ in range(15):
        n += len(next(it)["id"])
    rate = n / (time.perf_counter() - t)
    with capsys.disabled():
        print(f"\nphantom pipeline: {rate:.1f} images/s at 300 x 340, batch 8")
    assert rate > 8.0
