"""Read chest films and lung masks from disk into float32 [0, 1] plus metadata.

Supported: PNG, JPEG, TIFF, GIF, BMP (8 and 16 bit grey, RGB/RGBA/palette converted to
grey), DICOM (through pydicom) and raw JSRT ``.IMG`` files (12-bit big-endian, square).

Intensity conventions (all outputs: bright = dense, like a displayed radiograph):

* 8-bit files are divided by 255, 16-bit files by 65535 (never reduced to 8 bit);
  32-bit integer TIFFs by 2**32 - 1 unless their values fit 16 bit; float TIFFs are
  min-max scaled (noted in the metadata).
* DICOM: modality LUT (rescale slope/intercept or LUT sequence), then the VOI LUT
  sequence or the first window (WindowCenter/Width, LINEAR, LINEAR_EXACT or SIGMOID) when
  present, else the full range of BitsStored; MONOCHROME1 is inverted; PixelSpacing (or
  ImagerPixelSpacing, noted) kept in mm.
* JSRT raw: 12-bit big-endian, 0 = white, so values are inverted: 1 - v / 4095; the
  side is taken from the file size (2048 x 2048 for the real set); spacing 0.175 mm.

Every failure raises :class:`ImageReadError` naming the file, what is wrong and what to do.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import warnings
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

PathLike = Union[str, os.PathLike]

JSRT_SPACING_MM = 0.175
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
RAW_SUFFIXES = (".img",)
SUPPORTED_SUFFIXES = RASTER_SUFFIXES + DICOM_SUFFIXES + RAW_SUFFIXES


class ImageReadError(ValueError):
    """A file could not be read as a chest film or mask; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class ImageMeta:
    """What the reader learned about a file.

    path: the file; format: ``png``/``jpeg``/``tiff``/``gif``/``bmp``/``dicom``/``jsrt_raw``;
    shape: (H, W) in pixels; bits: bits per sample used for scaling (8, 12, 16, ...);
    pixel_spacing_mm: (row, col) spacing in mm, or None when the file does not say;
    photometric: e.g. ``MONOCHROME2``, ``RGB``; notes: conversions applied (e.g. RGB to grey).
    """

    path: str
    format: str
    shape: tuple[int, int]
    bits: int
    pixel_spacing_mm: tuple[float, float] | None = None
    photometric: str = "MONOCHROME2"
    notes: tuple[str, ...] = ()

    @property
    def was_rgb(self) -> bool:
        return any(n.startswith("converted RGB") or n.startswith("converted palette") for n in self.notes)


def _fail(path: PathLike, what: str, todo: str) -> ImageReadError:
    return ImageReadError(f"{os.fspath(path)}: {what}. {todo}")


def _sniff(path: pathlib.Path) -> str:
    """Guess the format from the first bytes, falling back to the suffix."""
    with open(path, "rb") as f:
        head = f.read(132)
    if head.startswith(b"\x89PNG"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"GIF8"):
        return "gif"
    if head.startswith(b"BM"):
        return "bmp"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if suffix in RAW_SUFFIXES:
        return "jsrt_raw"
    if suffix in RASTER_SUFFIXES:
        return "corrupt"
    return "unknown"


def _rgb_to_grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an (H, W, 3) array (float64)."""
    rgb = rgb.astype(np.float64)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def _read_raster(path: pathlib.Path, fmt: str) -> tuple[np.ndarray, ImageMeta]:
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise _fail(path, f"cannot decode this {fmt.upper()} file ({e})", "The file is corrupt or truncated; re-download or re-export it.") from e
    n_frames = getattr(im, "n_frames", 1)
    if n_frames > 1:
        notes.append(f"file has {n_frames} frames; read the first")
    mode = im.mode
    photometric = "MONOCHROME2"
    if mode in ("P", "PA"):
        im = im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB")
        notes.append("converted palette image to RGB")
        mode = im.mode
    if mode == "1":
        arr = np.asarray(im, dtype=np.float32)
        bits = 1
    elif mode in ("L", "LA"):
        arr = np.asarray(im.getchannel("L"), dtype=np.float32) / 255.0
        bits = 8
        if mode == "LA":
            notes.append("ignored alpha channel")
    elif mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr"):
        if mode == "CMYK" or mode == "YCbCr":
            im = im.convert("RGB")
        rgb = np.asarray(im)[..., :3]
        if mode == "RGBA":
            notes.append("ignored alpha channel")
        same = bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))
        notes.append("converted RGB to grey (channels identical)" if same
                     else "converted RGB to grey (ITU-R BT.601 luma)")
        arr = (_rgb_to_grey(rgb) / 255.0).astype(np.float32)
        bits = 8
        photometric = "RGB"
    elif mode.startswith("I;16") or mode in ("I", "I;32"):
        raw = np.asarray(im)
        if raw.dtype.byteorder == ">" or mode.startswith("I;16B"):
            raw = raw.astype(raw.dtype.newbyteorder("="))
        raw = raw.astype(np.int64)
        if mode.startswith("I;16"):
            bits = 16
        elif raw.min() >= 0 and raw.max() <= 65535:
            bits = 16  # Pillow opens 16-bit PNGs as mode "I"
        else:
            bits = 32
            if raw.min() < 0:
                raw = raw - raw.min()
                notes.append("shifted signed 32-bit values to start at 0")
        arr = (raw / float(2**bits - 1)).astype(np.float32)
    elif mode == "F":
        raw = np.asarray(im, dtype=np.float64)
        if not np.all(np.isfinite(raw)):
            raise _fail(path, "float image contains NaN or infinite values", "Re-export the image without invalid pixels.")
        lo, hi = float(raw.min()), float(raw.max())
        if 0.0 <= lo and hi <= 1.0:
            arr = raw.astype(np.float32)
        else:
            arr = ((raw - lo) / max(hi - lo, 1e-12)).astype(np.float32)
            notes.append(f"float image min-max scaled from [{lo:g}, {hi:g}]")
        bits = 32
    else:
        raise _fail(path, f"unsupported pixel mode {mode!r}", "Convert the image to 8- or 16-bit greyscale PNG or TIFF.")
    if arr.ndim != 2:
        raise _fail(path, f"unexpected array shape {arr.shape}", "Convert the image to a single-channel greyscale file.")
    # Raster formats carry no trustworthy detector spacing (TIFF/PNG resolution tags are
    # usually a 72-dpi default), so it is left unknown.
    return arr, ImageMeta(str(path), fmt, (int(arr.shape[0]), int(arr.shape[1])), bits, None, photometric, tuple(notes))


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2/3 VOI window mapped straight to [0, 1]."""
    function = function.upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    # LINEAR (default): centre - 0.5, width - 1.
    if width < 1:
        raise ValueError(f"window width {width} < 1 is invalid for VOI LUT function LINEAR")
    return np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _first(value: object) -> float:
    try:
        return float(value[0])  # type: ignore[index]
    except TypeError:
        return float(value)  # type: ignore[arg-type]


def _read_dicom(path: pathlib.Path) -> tuple[np.ndarray, ImageMeta]:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise _fail(path, "reading DICOM needs the pydicom package", "Install it: pip install pydicom.") from e
    try:
        ds = pydicom.dcmread(path, force=path.suffix.lower() in DICOM_SUFFIXES)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError) as e:
        raise _fail(path, f"not a readable DICOM file ({e})", "Check that the file is complete and really DICOM.") from e
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise _fail(path, "DICOM file has no pixel data (e.g. a report or structured document)", "Point the reader at the image series instead.")
    notes: list[str] = []
    try:
        arr = ds.pixel_array
    except Exception as e:  # pydicom raises many types for missing codecs / bad data
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise _fail(path, f"cannot decode the DICOM pixel data (transfer syntax {ts}: {e})",
                    "Install a decoder plugin (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg) or convert the file to uncompressed DICOM.") from e
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        arr = arr[0]
        notes.append(f"file has {frames} frames; read the first")
    bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    if spp == 3 or photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR"):
        if photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut
            arr = apply_color_lut(arr, ds)
            bits_stored = 16 if arr.dtype == np.uint16 else 8
        elif photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space
            arr = convert_color_space(arr, photometric, "RGB")
        grey = _rgb_to_grey(arr) / float(2**bits_stored - 1)
        notes.append(f"converted RGB to grey (ITU-R BT.601 luma) from {photometric}")
        img = np.clip(grey, 0.0, 1.0).astype(np.float32)
        spacing = _dicom_spacing(ds, notes)
        return img, ImageMeta(str(path), "dicom", img.shape, bits_stored, spacing, "RGB", tuple(notes))
    if arr.ndim != 2:
        raise _fail(path, f"unexpected DICOM pixel array shape {arr.shape}", "Only single-frame greyscale radiographs are supported.")
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    stored_lo = -(2 ** (bits_stored - 1)) if signed else 0
    stored_hi = 2 ** (bits_stored - 1) - 1 if signed else 2**bits_stored - 1
    modality = apply_modality_lut(arr, ds)
    x = np.asarray(modality, dtype=np.float64)
    if "ModalityLUTSequence" in ds:
        notes.append("applied modality LUT sequence")
        lut = ds.ModalityLUTSequence[0]
        desc = lut.LUTDescriptor
        out_bits = int(desc[2])
        lo, hi = 0.0, float(2**out_bits - 1)
    else:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        if (slope, intercept) != (1.0, 0.0):
            notes.append(f"applied rescale slope {slope:g}, intercept {intercept:g}")
        ends = (stored_lo * slope + intercept, stored_hi * slope + intercept)
        lo, hi = min(ends), max(ends)
    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        out_bits = int(item.LUTDescriptor[2])
        # LUTs are indexed by integer values: keep (or round back to) integers.
        lut_in = modality if np.issubdtype(np.asarray(modality).dtype, np.integer) else np.rint(x).astype(np.int64)
        y = np.asarray(apply_voi_lut(lut_in, ds, index=0, prefer_lut=True), dtype=np.float64)
        img = y / float(2**out_bits - 1)
        notes.append("applied VOI LUT sequence")
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
        try:
            img = _window(x, center, width, function)
        except ValueError as e:
            raise _fail(path, str(e), "Fix WindowWidth in the file or remove the window so the full range is used.") from e
        notes.append(f"applied window centre {center:g}, width {width:g} ({function.upper()})")
    else:
        img = (x - lo) / max(hi - lo, 1e-12)
        notes.append(f"scaled by BitsStored={bits_stored}")
    if photometric == "MONOCHROME1":
        img = 1.0 - img
        notes.append("inverted MONOCHROME1")
    img = np.clip(img, 0.0, 1.0).astype(np.float32)
    spacing = _dicom_spacing(ds, notes)
    return img, ImageMeta(str(path), "dicom", (int(img.shape[0]), int(img.shape[1])), bits_stored, spacing, photometric, tuple(notes))


def _dicom_spacing(ds: object, notes: list[str]) -> tuple[float, float] | None:
    for key, note in (("PixelSpacing", None), ("ImagerPixelSpacing", "pixel spacing from ImagerPixelSpacing (at the detector)")):
        value = getattr(ds, key, None)
        if value is not None:
            try:
                r, c = float(value[0]), float(value[1])
            except (TypeError, ValueError, IndexError):
                continue
            if r > 0 and c > 0:
                if note:
                    notes.append(note)
                return (r, c)
    return None


def read_jsrt_raw(path: PathLike, bits: int = 12, spacing_mm: float = JSRT_SPACING_MM) -> tuple[np.ndarray, ImageMeta]:
    """Read a JSRT ``.IMG`` file: square, big-endian unsigned 16-bit words holding 12-bit
    values with 0 = white. Returns (1 - v / (2**bits - 1)) as float32 (H, W) and metadata.

    The side is taken from the file size (2048 for the real set, whose spacing is 0.175 mm).
    """
    path = pathlib.Path(path)
    size = path.stat().st_size
    if size == 0:
        raise _fail(path, "file is empty (0 bytes)", "Re-download the JSRT image.")
    side = math.isqrt(size // 2)
    if size % 2 or side * side * 2 != size:
        raise _fail(path, f"size {size} bytes is not a square image of 16-bit words (JSRT .IMG files are 2048 x 2048 x 2 = 8388608 bytes)",
                    "The file is truncated or not a JSRT raw image; re-download it.")
    raw = np.fromfile(path, dtype=">u2").reshape(side, side)
    top = 2**bits - 1
    if int(raw.max()) > top:
        raise _fail(path, f"values up to {int(raw.max())} exceed {bits} bits", "Check the byte order and bit depth (JSRT is 12-bit big-endian).")
    img = (1.0 - raw.astype(np.float32) / np.float32(top)).astype(np.float32)
    notes = (f"JSRT raw {bits}-bit big-endian, inverted (0 = white in the file)",)
    return img, ImageMeta(str(path), "jsrt_raw", (side, side), bits, (spacing_mm, spacing_mm), "MONOCHROME1", notes)


def read_image(path: PathLike) -> tuple[np.ndarray, ImageMeta]:
    """Read a chest film -> (float32 (H, W) in [0, 1], bright = dense; ImageMeta).

    Raises ImageReadError (naming the file) when it is missing, empty, corrupt or of an
    unsupported type.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise _fail(path, "file not found", "Check the path.")
    if path.is_dir():
        raise _fail(path, "is a directory, not an image file", "Pass the path of an image file.")
    if path.stat().st_size == 0:
        raise _fail(path, "file is empty (0 bytes)", "Re-download or re-export it.")
    fmt = _sniff(path)
    if fmt in ("png", "jpeg", "tiff", "gif", "bmp"):
        img, meta = _read_raster(path, fmt)
    elif fmt == "dicom":
        img, meta = _read_dicom(path)
    elif fmt == "jsrt_raw":
        img, meta = read_jsrt_raw(path)
    elif fmt == "corrupt":
        raise _fail(path, f"the content is not a valid {path.suffix.lstrip('.').upper()} file (unrecognised header)",
                    "The file is corrupt or mis-named; re-download or re-export it.")
    else:
        raise _fail(path, f"unsupported file type {path.suffix or '(no suffix)'!r}",
                    f"Supported: {', '.join(SUPPORTED_SUFFIXES)} (and DICOM with a DICM header).")
    if img.size == 0 or min(img.shape) < 2:
        raise _fail(path, f"image is degenerate (shape {img.shape})", "Use an image at least 2 x 2 pixels.")
    return img, meta


@dataclasses.dataclass(frozen=True)
class MaskInfo:
    """How a mask file was interpreted: threshold used (in [0, 1] units), fraction of
    pixels that were neither background nor the top value, and warnings (e.g. non-binary)."""

    threshold: float
    intermediate_fraction: float
    lung_fraction: float
    warnings: tuple[str, ...] = ()


def binarize_mask(values: np.ndarray, where: str = "mask", non_binary_tolerance: float = 0.05) -> tuple[np.ndarray, MaskInfo]:
    """Lung mask values in [0, 1] (H, W) -> bool (H, W) and MaskInfo.

    Threshold: 0.5 when the mask reaches above 0.5 (0/255 masks, anti-aliased edges, V7
    semantic masks whose ``Ignore`` class 127 then counts as background), else half its
    maximum (masks stored as 0/1 labels). Raises ImageReadError for an empty mask.
    A warning is recorded when more than ``non_binary_tolerance`` of the pixels are
    neither 0 nor the maximum (a probability map or a photo, not a label mask).
    """
    top = float(values.max()) if values.size else 0.0
    if top <= 0.0:
        raise ImageReadError(f"{where}: mask is empty (no lung pixels). Fix or remove this mask; the image is left out.")
    threshold = 0.5 if top > 0.5 else top / 2.0
    mask = values > threshold
    inter = float(np.mean((values > 0) & (values < top)))
    warns: list[str] = []
    if inter > non_binary_tolerance:
        warns.append(f"mask is not binary: {inter:.1%} of pixels are between 0 and the maximum; thresholded at {threshold:.3f}")
    if not mask.any():
        raise ImageReadError(f"{where}: mask is empty after thresholding at {threshold:.3f}. Fix or remove this mask; the image is left out.")
    return mask, MaskInfo(threshold, inter, float(mask.mean()), tuple(warns))


def read_mask(path: PathLike) -> tuple[np.ndarray, ImageMeta, MaskInfo]:
    """Read a lung mask file -> (bool (H, W), ImageMeta, MaskInfo); see :func:`binarize_mask`."""
    values, meta = read_image(path)
    mask, info = binarize_mask(values, where=os.fspath(path))
    return mask, meta, info


def probe_image(path: PathLike) -> ImageMeta:
    """Check a film cheaply, without decoding its pixels: existence, size, format, header,
    dimensions (and PNG chunk checksums). Returns ImageMeta (bits may be approximate);
    raises ImageReadError like :func:`read_image`. Used to vet files before a build."""
    path = pathlib.Path(path)
    if not path.exists():
        raise _fail(path, "file not found", "Check the path.")
    if path.stat().st_size == 0:
        raise _fail(path, "file is empty (0 bytes)", "Re-download or re-export it.")
    fmt = _sniff(path)
    if fmt in ("png", "jpeg", "tiff", "gif", "bmp"):
        try:
            with Image.open(path) as im:
                size, mode = im.size, im.mode
                if fmt == "png":
                    im.verify()  # chunk CRCs; catches truncated and damaged files
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise _fail(path, f"cannot decode this {fmt.upper()} file ({e})", "The file is corrupt or truncated; re-download or re-export it.") from e
        rgb = mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "P", "PA")
        notes = ("converted RGB to grey (on read)",) if rgb else ()
        bits = 16 if mode.startswith("I") else 8
        return ImageMeta(str(path), fmt, (size[1], size[0]), bits, None, "RGB" if rgb else "MONOCHROME2", notes)
    if fmt == "dicom":
        try:
            import pydicom
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=path.suffix.lower() in DICOM_SUFFIXES)
            rows, cols = int(ds.Rows), int(ds.Columns)
        except Exception as e:  # noqa: BLE001 - any failure means an unusable header
            raise _fail(path, f"not a readable DICOM image header ({e})", "Check that the file is a complete DICOM image.") from e
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        notes = ("converted RGB to grey (on read)",) if photometric not in ("MONOCHROME1", "MONOCHROME2") else ()
        return ImageMeta(str(path), "dicom", (rows, cols), int(ds.get("BitsStored", 16) or 16), _dicom_spacing(ds, []), photometric, notes)
    if fmt == "jsrt_raw":
        size = path.stat().st_size
        side = math.isqrt(size // 2)
        if size % 2 or side * side * 2 != size:
            raise _fail(path, f"size {size} bytes is not a square image of 16-bit words (JSRT .IMG files are 2048 x 2048 x 2 = 8388608 bytes)",
                        "The file is truncated or not a JSRT raw image; re-download it.")
        return ImageMeta(str(path), "jsrt_raw", (side, side), 12, (JSRT_SPACING_MM, JSRT_SPACING_MM), "MONOCHROME1", ())
    if fmt == "corrupt":
        raise _fail(path, f"the content is not a valid {path.suffix.lstrip('.').upper()} file (unrecognised header)",
                    "The file is corrupt or mis-named; re-download or re-export it.")
    raise _fail(path, f"unsupported file type {path.suffix or '(no suffix)'!r}",
                f"Supported: {', '.join(SUPPORTED_SUFFIXES)} (and DICOM with a DICM header).")


def read_label_image(path: PathLike) -> np.ndarray:
    """Raw integer labels of a label/semantic-mask image (H, W), without grey conversion:
    palette images give their palette indices, greyscale images their values; RGB images
    are reduced to grey luma (rounded). Raises ImageReadError naming the file."""
    path = pathlib.Path(path)
    if not path.exists() or path.stat().st_size == 0:
        raise _fail(path, "file not found or empty", "Check the mask file.")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "L", "I", "I;16", "I;16B", "1"):
                arr = np.asarray(im).astype(np.int64)
            elif im.mode in ("LA", "PA"):
                arr = np.asarray(im)[..., 0].astype(np.int64)
            else:
                arr = np.rint(_rgb_to_grey(np.asarray(im.convert("RGB")))).astype(np.int64)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise _fail(path, f"cannot decode this mask image ({e})", "The file is corrupt or truncated; re-export it.") from e
    return arr
