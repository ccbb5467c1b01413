"""TFDS builders: every layout from tiny fixtures, patient splits, bad-data handling."""
from __future__ import annotations

import collections
import json
import pathlib
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from crnet_jax import datasets as D

import fixtures_data as fx

CFG = D.CxrConfig(name="test32x24", height=32, width=24, split_fractions=(0.5, 0.25, 0.25))


def _all_records(name: str, data_dir: pathlib.Path, config=CFG) -> dict[str, list[dict]]:
    builder = D.BUILDERS[name](data_dir=str(data_dir), config=config)
    out = {}
    for split in builder.info.splits:
        src = tfds.data_source(name, split=split, data_dir=str(data_dir), download=False, builder_kwargs={"config": config})
        out[split] = [src[i] for i in range(len(src))]
    return out


def _ids(records: dict[str, list[dict]]) -> set[str]:
    return {r["id"].decode() for rs in records.values() for r in rs}


def _check_features(rec: dict, h: int = 32, w: int = 24) -> None:
    assert rec["image"].shape == (h, w, 1) and rec["image"].dtype == np.uint16
    assert rec["mask"].shape == (h, w, 1) and rec["mask"].dtype == np.uint8
    assert rec["pixel_spacing"].shape == (2,) and rec["original_shape"].dtype == np.int32
    assert (rec["mask"] > 127).mean() > 0.05, "lung mask should not be empty"
    # lungs are darker than the rest in the fixture films
    lung = rec["mask"][..., 0] > 127
    assert rec["image"][..., 0][lung].mean() < rec["image"][..., 0][~lung].mean()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    data = root / "tfds"
    expected = {
        "montgomery_cxr": fx.make_montgomery(root / "mc"),
        "shenzhen_cxr": fx.make_shenzhen(root / "sz"),
        "jsrt_scr": fx.make_jsrt(root / "js"),
        "v7_covid_lungs": fx.make_v7(root / "v7"),
        "cxr_folder": fx.make_folder(root / "fo"),
    }
    dirs = {"montgomery_cxr": "mc", "shenzhen_cxr": "sz", "jsrt_scr": "js", "v7_covid_lungs": "v7", "cxr_folder": "fo"}
    reports = {}
    for name, d in dirs.items():
        b = D.build(name, data, root / d, CFG)
        reports[name] = b.build_report
    return data, expected, reports


@pytest.mark.parametrize("name", ["montgomery_cxr", "shenzhen_cxr", "jsrt_scr", "v7_covid_lungs", "cxr_folder"])
def test_every_builder_round_trips(built, name):
    data, expected, _ = built
    records = _all_records(name, data)
    assert _ids(records) == set(expected[name])
    for rs in records.values():
        for r in rs:
            _check_features(r)
    assert "tensorflow" not in sys.modules  # TFDS + ArrayRecord without TensorFlow


def test_montgomery_labels_and_merged_mask(built):
    data, _, _ = built
    recs = {r["id"].decode(): r for rs in _all_records("montgomery_cxr", data).values() for r in rs}
    r0, r1 = recs["MCUCXR_0001_0"], recs["MCUCXR_0002_1"]
    assert (r0["finding"], r1["finding"], r1["finding_detail"]) == (b"normal", b"abnormal", b"tb")
    np.testing.assert_allclose(r0["pixel_spacing"], [0.0875, 0.0875])
    lung = r0["mask"][..., 0] > 127
    assert lung[:, :12].any() and lung[:, 12:].any()  # both lungs present after merging
    assert list(r0["original_shape"]) == [40, 36] and r0["source"] == b"montgomery"


def test_shenzhen_reports_image_without_mask(built, capsys):
    _, _, reports = built
    rep = reports["shenzhen_cxr"]
    assert len(rep.skipped["missing_mask"]) == 1 and "CHNCXR_0004_1" in rep.skipped["missing_mask"][0]
    assert sum(rep.written.values()) == 3


def test_jsrt_half_size_masks_and_inversion(built):
    data, _, reports = built
    recs = [r for rs in _all_records("jsrt_scr", data).values() for r in rs]
    assert not reports["jsrt_scr"].notes.get("mask_resized")  # SCR masks are half size by design
    for r in recs:
        np.testing.assert_allclose(r["pixel_spacing"], [0.175, 0.175])
        assert r["finding"] in (b"normal", b"abnormal")


def test_v7_ignore_is_not_lung_and_lateral_left_out(built):
    data, _, reports = built
    assert any("lateral_only" in m for m in reports["v7_covid_lungs"].skipped["missing_mask"])
    recs = [r for rs in _all_records("v7_covid_lungs", data).values() for r in rs]
    for r in recs:
        assert r["source"] == b"v7-darwin" and r["finding"] == b"unknown"
        assert r["mask"][0, 0, 0] == 0  # the Ignore patch in the corner is not lung
    assert D.v7_patient_id("person12_bacteria_46") == "person12"
    assert D.v7_patient_id("NORMAL2-IM-1427-0001") == "NORMAL2-IM-1427"
    assert D.v7_patient_id("IM-0115-0001") == "IM-0115"
    assert D.v7_patient_id("covid-19-pneumonia-7-PA") == "covid-19-pneumonia-7-PA"


def test_folder_manifest_labels(built):
    data, _, _ = built
    recs = {r["id"].decode(): r for rs in _all_records("cxr_folder", data).values() for r in rs}
    assert recs["case000"]["finding"] == b"abnormal" and recs["case000"]["finding_detail"] == b"tb"
    assert recs["case001"]["finding"] == b"normal" and recs["case001"]["source"] == b"montgomery"


def test_phantom_builder(tmp_path):
    b = D.build("cxr_phantom", tmp_path, None, "tiny")
    assert {s: b.info.splits[s].num_examples for s in b.info.splits} == {"train": 8, "validation": 2, "test": 2}
    src = tfds.data_source("cxr_phantom", split="validation", data_dir=str(tmp_path), download=False, builder_kwargs={"config": "tiny"})
    rec = src[0]
    assert rec["id"].decode().startswith("synthetic_") and rec["source"] == b"synthetic-phantom"
    assert rec["image"].shape == (64, 64, 1)


def test_split_of_is_deterministic_and_proportional():
    ids = [f"patient{i}" for i in range(20000)]
    splits = [D.split_of(p) for p in ids]
    assert splits == [D.split_of(p) for p in ids]
    c = collections.Counter(splits)
    assert abs(c["train"] / 20000 - 0.8) < 0.02 and abs(c["validation"] / 20000 - 0.1) < 0.01
    assert D.split_of("x", salt="a") in D.SPLITS
    assert len({D.split_of(p, salt="other") for p in ids[:50]}) == 3


def test_no_patient_in_two_splits(tmp_path):
    """24 films of 8 patients (3 each): every patient's films land in one split."""
    root = tmp_path / "multi"
    rows = ["id,source,finding,patient"]
    for i in range(24):
        pid = f"img{i:02d}"
        fx.write_u8(root / "images" / f"{pid}.png", fx.film(32, 32, i))
        fx.write_mask(root / "masks" / f"{pid}.png", fx.blob_mask(32, 32, i))
        rows.append(f"{pid},clinic,normal,P{i % 8}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    cfg = D.CxrConfig(name="multi", height=32, width=32, split_fractions=(0.5, 0.25, 0.25))
    D.build("cxr_folder", tmp_path / "tfds", root, cfg)
    records = _all_records("cxr_folder", tmp_path / "tfds", cfg)
    where = collections.defaultdict(set)
    for split, rs in records.items():
        for r in rs:
            where[r["patient_id"].decode()].add(split)
    assert len(where) == 8 and all(len(s) == 1 for s in where.values())
    assert sum(len(rs) for rs in records.values()) == 24
    assert len(records) >= 2  # the patients really were spread over splits


def test_bad_data_is_reported_and_never_stops_the_build(tmp_path, capsys):
    root = tmp_path / "bad"
    good = fx.make_folder(root, n=3, manifest=False)
    # missing mask
    fx.write_u8(root / "images" / "nomask.png", fx.film(32, 32, 1))
    # empty mask
    fx.write_u8(root / "images" / "emptymask.png", fx.film(32, 32, 2))
    fx.write_mask(root / "masks" / "emptymask.png", np.zeros((32, 32), bool))
    # mask with another aspect ratio
    fx.write_u8(root / "images" / "mismatch.png", fx.film(32, 32, 3))
    fx.write_mask(root / "masks" / "mismatch.png", fx.blob_mask(20, 40))
    # same aspect, other size: kept, with a note
    fx.write_u8(root / "images" / "halfmask.png", fx.film(32, 32, 4))
    fx.write_mask(root / "masks" / "halfmask.png", fx.blob_mask(16, 16, 4))
    # non-binary mask: kept, with a note
    fx.write_u8(root / "images" / "soft.png", fx.film(32, 32, 5))
    soft = (fx.blob_mask(32, 32, 5) * 200 + np.random.default_rng(0).integers(0, 50, (32, 32))).astype(np.uint8)
    fx.write_png(root / "masks" / "soft.png", soft)
    # RGB film: kept, converted, noted
    rgb = np.repeat((fx.film(32, 32, 6) * 255).astype(np.uint8)[..., None], 3, -1)
    rgb[..., 0] = np.clip(rgb[..., 0].astype(int) + 20, 0, 255)
    fx.write_png(root / "images" / "colour.png", rgb)
    fx.write_mask(root / "masks" / "colour.png", fx.blob_mask(32, 32, 6))
    # duplicate id (same stem, two formats)
    fx.write_u8(root / "images" / "case000.tif", fx.film(32, 32, 0))
    # corrupt image and unsupported file
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    fx.write_mask(root / "masks" / "broken.png", fx.blob_mask(32, 32))
    (root / "images" / "readme.txt").write_text("not an image")
    # orphan mask
    fx.write_mask(root / "masks" / "ghost.png", fx.blob_mask(32, 32))

    cfg = D.CxrConfig(name="bad", height=32, width=32, split_fractions=(0.34, 0.33, 0.33))
    b = D.build("cxr_folder", tmp_path / "tfds", root, cfg)
    rep = b.build_report
    counts = {k: len(v) for k, v in rep.skipped.items()}
    assert counts == {"missing_mask": 1, "empty_mask": 1, "size_mismatch": 1, "duplicate_id": 1, "unreadable_image": 2}
    notes = {k: len(v) for k, v in rep.notes.items()}
    assert notes["rgb_converted"] == 1 and notes["non_binary_mask"] == 1 and notes["mask_resized"] == 1 and notes["orphan_mask"] == 1
    written = _ids(_all_records("cxr_folder", tmp_path / "tfds", cfg))
    assert written == set(good) | {"halfmask", "soft", "colour"}
    # messages name the file and say what is wrong
    assert "mismatch.png" in rep.skipped["size_mismatch"][0] and "aspect ratio" in rep.skipped["size_mismatch"][0]
    assert "emptymask.png" in rep.skipped["empty_mask"][0]
    assert "case000.tif" in rep.skipped["duplicate_id"][0]
    out = capsys.readouterr().out
    assert "Build report for cxr_folder" in out and "size_mismatch: 1" in out
    saved = json.loads((pathlib.Path(b.data_path) / "build_report.json").read_text())
    assert saved["skipped"]["empty_mask"]


def test_missing_layout_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("nothing here")
    with pytest.raises(FileNotFoundError, match="no CXR_png folder"):
        D.build("montgomery_cxr", tmp_path / "tfds", tmp_path / "empty", CFG)


def test_pad_storage_keeps_aspect(tmp_path):
    root = tmp_path / "wide"
    fx.write_u8(root / "images" / "w.png", fx.film(20, 40, 0))
    fx.write_mask(root / "masks" / "w.png", fx.blob_mask(20, 40, 0))
    cfg = D.CxrConfig(name="pad", height=32, width=32, resize_mode="pad", split_fractions=(1.0, 0.0, 0.0))
    D.build("cxr_folder", tmp_path / "tfds", root, cfg)
    rec = _all_records("cxr_folder", tmp_path / "tfds", cfg)["train"][0]
    assert list(rec["content_box"]) == [8, 0, 16, 32]
    assert rec["image"][:8].max() == 0 and rec["mask"][:8].max() == 0


def test_real_mcsz512_subset(mcsz512_dir, tmp_path):
    """A few real films through the generic builder (linked, not copied)."""
    root = tmp_path / "subset"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    ids = ["MCUCXR_0001_0", "MCUCXR_0003_0", "CHNCXR_0001_0", "CHNCXR_0002_0"]
    for i in ids:
        (root / "images" / f"{i}.png").symlink_to(mcsz512_dir / "images" / f"{i}.png")
        (root / "masks" / f"{i}.png").symlink_to(mcsz512_dir / "masks" / f"{i}.png")
    manifest = [ln for ln in (mcsz512_dir / "manifest.csv").read_text().splitlines() if ln.split(",")[0] in ids or ln.startswith("id,")]
    (root / "manifest.csv").write_text("\n".join(manifest) + "\n")
    cfg = D.CxrConfig(name="real", height=128, width=128, split_fractions=(1.0, 0.0, 0.0))
    b = D.build("cxr_folder", tmp_path / "tfds", root, cfg)
    assert b.build_report.num_skipped == 0 and not b.build_report.notes.get("non_binary_mask")
    recs = _all_records("cxr_folder", tmp_path / "tfds", cfg)["train"]
    assert {r["id"].decode() for r in recs} == set(ids)
    for r in recs:
        lung = r["mask"][..., 0] > 127
        assert 0.15 < lung.mean() < 0.5
        grown = lung.copy()
        for sh, ax in ((4, 0), (-4, 0), (4, 1), (-4, 1)):
            grown |= np.roll(lung, sh, ax)
        ring = grown & ~lung  # just outside the lungs: ribs, heart, diaphragm - brighter than lung
        assert r["image"][..., 0][lung].mean() < r["image"][..., 0][ring].mean()
        assert r["source"] in (b"montgomery", b"shenzhen")
