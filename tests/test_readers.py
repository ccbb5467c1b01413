"""Tests for the file readers (PNG/JPEG/TIFF 8/16 bit, DICOM, JSRT raw, masks, errors)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from crnet_jax import readers
from crnet_jax.readers import ImageReadError

import fixtures_data as fx

pydicom = pytest.importorskip("pydicom")


def test_png_8bit(tmp_path):
    a = np.arange(256, dtype=np.uint8).reshape(16, 16)
    x, meta = readers.read_image(fx.write_png(tmp_path / "a.png", a))
    np.testing.assert_allclose(x, a / 255.0, atol=1e-7)
    assert x.dtype == np.float32 and meta.bits == 8 and meta.format == "png" and meta.shape == (16, 16)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_not_clipped_to_8(tmp_path, suffix):
    a = (np.arange(64 * 64).reshape(64, 64) * 16 + 3).astype(np.uint16)
    x, meta = readers.read_image(fx.write_png(tmp_path / f"a{suffix}", a))
    assert meta.bits == 16
    np.testing.assert_allclose(x, a / 65535.0, rtol=1e-6)
    assert len(np.unique(x)) == a.size  # all 4096 distinct levels survive


def test_tiff_16bit_big_endian(tmp_path):
    a = (np.arange(32 * 32).reshape(32, 32) * 50).astype(np.uint16)
    p = tmp_path / "b.tif"
    Image.frombytes("I;16B", (32, 32), a.astype(">u2").tobytes()).save(p)
    x, meta = readers.read_image(p)
    np.testing.assert_allclose(x, a / 65535.0, rtol=1e-6)


def test_jpeg(tmp_path):
    a = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))
    p = tmp_path / "c.jpg"
    Image.fromarray(a).save(p, quality=95)
    x, meta = readers.read_image(p)
    assert meta.format == "jpeg" and x.shape == (32, 32)
    assert np.abs(x - a / 255.0).max() < 0.05


def test_rgb_converted_with_note(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[..., 1] = 100
    x, meta = readers.read_image(fx.write_png(tmp_path / "rgb.png", rgb))
    np.testing.assert_allclose(x, (0.299 * 200 + 0.587 * 100) / 255.0, rtol=1e-5)
    assert meta.was_rgb and any("RGB" in n for n in meta.notes)
    grey3 = np.repeat(np.arange(64, dtype=np.uint8).reshape(8, 8)[..., None], 3, -1)
    x2, meta2 = readers.read_image(fx.write_png(tmp_path / "grey3.png", grey3))
    np.testing.assert_allclose(x2, grey3[..., 0] / 255.0, atol=1e-6)
    assert "channels identical" in meta2.notes[0]


def test_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty.png: file is empty"):
        readers.read_image(empty)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png at all")
    with pytest.raises(ImageReadError, match="bad.png: .*not a valid PNG"):
        readers.read_image(bad)
    trunc = tmp_path / "trunc.png"
    data = (fx.write_png(tmp_path / "full.png", np.zeros((64, 64), np.uint8) + 7)).read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="trunc.png: cannot decode"):
        readers.read_image(trunc)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(ImageReadError, match="notes.txt: unsupported file type '.txt'.*Supported"):
        readers.read_image(other)
    with pytest.raises(ImageReadError, match="missing.png: file not found"):
        readers.read_image(tmp_path / "missing.png")


def test_dicom_bits_stored_scaling_and_spacing(tmp_path):
    a = (np.arange(64 * 64).reshape(64, 64)).astype(np.uint16)  # 0..4095
    x, meta = readers.read_image(fx.write_dicom(tmp_path / "a.dcm", a, bits_stored=12, spacing=(0.15, 0.16)))
    np.testing.assert_allclose(x, a / 4095.0, rtol=1e-6)
    assert meta.format == "dicom" and meta.bits == 12 and meta.pixel_spacing_mm == (0.15, 0.16)


def test_dicom_monochrome1_inverted(tmp_path):
    a = (np.arange(64 * 64).reshape(64, 64)).astype(np.uint16)
    x, meta = readers.read_image(fx.write_dicom(tmp_path / "m1.dcm", a, photometric="MONOCHROME1"))
    np.testing.assert_allclose(x, 1.0 - a / 4095.0, atol=1e-6)
    assert "inverted MONOCHROME1" in meta.notes


def test_dicom_window(tmp_path):
    a = (np.arange(64 * 64).reshape(64, 64)).astype(np.uint16)
    x, meta = readers.read_image(fx.write_dicom(tmp_path / "w.dcm", a, window=(2048.0, 1025.0)))
    # LINEAR: x <= c - 0.5 - (w-1)/2 -> 0 ; x > c - 0.5 + (w-1)/2 -> 1
    flat = x.ravel()
    assert flat[a.ravel() <= 1535].max() == 0.0
    assert flat[a.ravel() >= 2560].min() == 1.0
    np.testing.assert_allclose(flat[2047], (2047 - 2047.5) / 1024 + 0.5, rtol=1e-6)
    x2, _ = readers.read_image(fx.write_dicom(tmp_path / "we.dcm", a, window=(2048.0, 1024.0), voi_function="LINEAR_EXACT"))
    np.testing.assert_allclose(x2.ravel()[2048], 0.5, atol=1e-6)


def test_dicom_rescale_then_full_range(tmp_path):
    a = (np.arange(64 * 64).reshape(64, 64)).astype(np.uint16)
    x, meta = readers.read_image(fx.write_dicom(tmp_path / "r.dcm", a, rescale=(2.0, -100.0)))
    np.testing.assert_allclose(x, a / 4095.0, atol=1e-6)
    assert any("rescale" in n for n in meta.notes)


def test_dicom_voi_lut_sequence(tmp_path):
    a = (np.arange(64 * 64).reshape(64, 64)).astype(np.uint16)
    lut = np.round(np.linspace(0, 1, 4096) ** 2 * 65535).astype(np.uint16)
    x, meta = readers.read_image(fx.write_dicom(tmp_path / "l.dcm", a, voi_lut=lut))
    np.testing.assert_allclose(x, lut[a] / 65535.0, atol=1e-6)
    assert "applied VOI LUT sequence" in meta.notes


def test_dicom_without_pixels_is_clear(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.Modality = "SR"
    p = tmp_path / "report.dcm"
    ds.save_as(p, enforce_file_format=True)
    with pytest.raises(ImageReadError, match="report.dcm: DICOM file has no pixel data"):
        readers.read_image(p)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 10)
    with pytest.raises(ImageReadError, match="junk.dcm"):
        readers.read_image(junk)


def test_jsrt_raw(tmp_path):
    side = 32
    v = (np.arange(side * side).reshape(side, side) * 4).astype(">u2")  # up to 4092
    p = tmp_path / "JPCLN001.IMG"
    v.tofile(p)
    x, meta = readers.read_image(p)
    np.testing.assert_allclose(x, 1.0 - v.astype(np.float64) / 4095.0, atol=1e-6)
    assert meta.format == "jsrt_raw" and meta.shape == (32, 32) and meta.pixel_spacing_mm == (0.175, 0.175)
    bad = tmp_path / "JPCLN002.IMG"
    bad.write_bytes(b"\x00" * 1001)
    with pytest.raises(ImageReadError, match="JPCLN002.IMG: size 1001 bytes is not a square"):
        readers.read_image(bad)


def test_read_mask_variants(tmp_path):
    m = fx.blob_mask(20, 24)
    for name, arr in {
        "m255.png": m.astype(np.uint8) * 255,
        "m1.png": m.astype(np.uint8),
        "mrgb.png": np.repeat((m.astype(np.uint8) * 255)[..., None], 3, -1),
    }.items():
        got, meta, info = readers.read_mask(fx.write_png(tmp_path / name, arr))
        np.testing.assert_array_equal(got, m, err_msg=name)
        assert not info.warnings
    gif = tmp_path / "m.gif"
    Image.fromarray(m.astype(np.uint8) * 255).save(gif)
    np.testing.assert_array_equal(readers.read_mask(gif)[0], m)
    # V7 semantic mask: 127 = Ignore counts as background
    sem = m.astype(np.uint8) * 255
    sem[0:3, 0:3] = 127
    got, _, _ = readers.read_mask(fx.write_png(tmp_path / "sem.png", sem))
    assert not got[0:3, 0:3].any()


def test_mask_empty_and_non_binary(tmp_path):
    with pytest.raises(ImageReadError, match="zero.png: mask is empty"):
        readers.read_mask(fx.write_png(tmp_path / "zero.png", np.zeros((8, 8), np.uint8)))
    ramp = np.tile(np.linspace(0, 255, 16).astype(np.uint8), (16, 1))
    got, _, info = readers.read_mask(fx.write_png(tmp_path / "ramp.png", ramp))
    assert info.warnings and "not binary" in info.warnings[0]
    assert got[:, -1].all() and not got[:, 0].any()
