"""Builders of tiny on-disk fixtures: images, masks, DICOM files and the dataset layouts
(Montgomery, Shenzhen, JSRT/SCR, V7 Darwin, generic folder). Used by the data tests."""
from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image


def blob_mask(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Two elliptical 'lungs' (bool (H, W)), shifted a little per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    cy = h * (0.5 + rng.uniform(-0.05, 0.05))
    m = np.zeros((h, w), bool)
    for cx in (0.3 * w, 0.7 * w):
        m |= ((yy - cy) / (0.3 * h)) ** 2 + ((xx - cx) / (0.15 * w)) ** 2 <= 1.0
    return m


def film(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A float film in [0, 1] (H, W): bright body, darker blobs where the lungs are."""
    rng = np.random.default_rng(seed + 1000)
    img = 0.7 - 0.4 * blob_mask(h, w, seed) + 0.05 * rng.random((h, w))
    return np.clip(img, 0, 1).astype(np.float32)


def write_png(path: pathlib.Path, arr: np.ndarray) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def write_u8(path: pathlib.Path, x: np.ndarray) -> pathlib.Path:
    return write_png(path, np.round(np.clip(x, 0, 1) * 255).astype(np.uint8))


def write_mask(path: pathlib.Path, m: np.ndarray, value: int = 255) -> pathlib.Path:
    return write_png(path, (m.astype(np.uint8) * value).astype(np.uint8))


def write_dicom(path: pathlib.Path, arr: np.ndarray, bits_stored: int = 12, photometric: str = "MONOCHROME2",
                window: tuple[float, float] | None = None, spacing: tuple[float, float] | None = (0.143, 0.143),
                rescale: tuple[float, float] | None = None, voi_lut: np.ndarray | None = None,
                voi_function: str | None = None) -> pathlib.Path:
    """Write an uncompressed single-frame DX DICOM file with the given uint16 pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if spacing is not None:
        ds.PixelSpacing = [spacing[0], spacing[1]]
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if voi_lut is not None:
        item = Dataset()
        item.LUTDescriptor = [len(voi_lut), 0, 16]
        item.LUTData = np.asarray(voi_lut, dtype="<u2").tobytes()
        ds.VOILUTSequence = Sequence([item])
    ds.PixelData = np.ascontiguousarray(arr.astype("<u2")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# ----------------------------------------------------------------------------- layouts

def make_montgomery(root: pathlib.Path, n: int = 4, h: int = 40, w: int = 36) -> list[str]:
    """MontgomerySet/CXR_png/MCUCXR_####_F.png with ManualMask/{left,right}Mask/*.png."""
    ids = []
    base = root / "MontgomerySet"
    for i in range(n):
        pid = f"MCUCXR_{i + 1:04d}_{i % 2}"
        m = blob_mask(h, w, i)
        left, right = m.copy(), m.copy()
        left[:, : w // 2] = False  # patient's left lung is on the image right
        right[:, w // 2:] = False
        write_u8(base / "CXR_png" / f"{pid}.png", film(h, w, i))
        write_mask(base / "ManualMask" / "leftMask" / f"{pid}.png", left)
        write_mask(base / "ManualMask" / "rightMask" / f"{pid}.png", right)
        ids.append(pid)
    return ids


def make_shenzhen(root: pathlib.Path, n: int = 4, h: int = 36, w: int = 40, without_mask: int = 1) -> list[str]:
    """ChinaSet_AllFiles/CXR_png/CHNCXR_####_F.png with Kyiv masks mask/*_mask.png; the
    last ``without_mask`` images have no mask. Returns the ids that have masks."""
    ids = []
    for i in range(n):
        pid = f"CHNCXR_{i + 1:04d}_{i % 2}"
        write_u8(root / "ChinaSet_AllFiles" / "CXR_png" / f"{pid}.png", film(h, w, i))
        if i < n - without_mask:
            write_mask(root / "mask" / f"{pid}_mask.png", blob_mask(h, w, i))
            ids.append(pid)
    return ids


def make_jsrt(root: pathlib.Path, n: int = 3, side: int = 32, mask_side: int = 16) -> list[str]:
    """JSRT .IMG (12-bit big-endian raw, 0 = white) + SCR masks/{left,right} lung/*.gif."""
    ids = []
    for i in range(n):
        pid = f"JPCLN{i + 1:03d}" if i % 2 else f"JPCNN{i + 1:03d}"
        x = film(side, side, i)
        raw = np.round((1.0 - x) * 4095).astype(">u2")
        (root / "All247images").mkdir(parents=True, exist_ok=True)
        raw.tofile(root / "All247images" / f"{pid}.IMG")
        m = blob_mask(mask_side, mask_side, i)
        left, right = m.copy(), m.copy()
        left[:, : mask_side // 2] = False
        right[:, mask_side // 2:] = False
        for name, part in (("left lung", left), ("right lung", right)):
            p = root / "scr" / "masks" / name / f"{pid}.gif"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(part.astype(np.uint8) * 255).save(p)
        ids.append(pid)
    return ids


def make_v7(root: pathlib.Path, n: int = 4, h: int = 30, w: int = 34) -> list[str]:
    """V7 Darwin COVID-19: images/<name>.<ext> + masks/<name>.png (0 / 127 Ignore / 255 Lung)
    with class_mapping.csv; one lateral film without a mask."""
    ids = []
    (root / "masks").mkdir(parents=True, exist_ok=True)
    (root / "masks" / "class_mapping.csv").write_text("class_idx,class_name\n0,__background__\n127,Ignore\n255,Lung\n")
    for i in range(n):
        name = f"v7img_{i:03d}"
        ext = "jpg" if i % 2 else "png"
        img = np.round(film(h, w, i) * 255).astype(np.uint8)
        p = root / "images" / f"{name}.{ext}"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(p)
        sem = blob_mask(h, w, i).astype(np.uint8) * 255
        sem[2:5, 2:5] = 127  # an Ignore patch
        write_png(root / "masks" / f"{name}.png", sem)
        ids.append(name)
    write_u8(root / "images" / "lateral_only.png", film(h, w, 99))
    return ids


def make_folder(root: pathlib.Path, n: int = 5, h: int = 32, w: int = 32, manifest: bool = True) -> list[str]:
    """Generic layout: images/<id>.png + masks/<id>.png (+ manifest.csv id,source,finding)."""
    ids = []
    rows = ["id,source,finding"]
    for i in range(n):
        pid = f"case{i:03d}"
        write_u8(root / "images" / f"{pid}.png", film(h, w, i))
        write_mask(root / "masks" / f"{pid}.png", blob_mask(h, w, i))
        rows.append(f"{pid},{'montgomery' if i % 2 else 'shenzhen'},{'tb' if i % 3 == 0 else 'normal'}")
        ids.append(pid)
    if manifest:
        (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return ids
