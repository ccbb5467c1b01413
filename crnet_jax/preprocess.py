"""Preprocessing shared by training and inference (pure NumPy functions).

Pipeline for one film (see :func:`preprocess_image`):

1. resize to the network's H x W, either stretched (what the Res-CR-Net authors did) or
   keeping the aspect ratio and padding (``resize_mode="pad"``); the :class:`Geometry`
   returned lets :func:`restore_prediction` map outputs back onto the original film;
2. contrast: global histogram equalisation identical to OpenCV's ``equalizeHist``
   (the authors' choice, default), CLAHE, or none; computed on the image content only,
   before padding;
3. intensity scaling: ``"unit"`` keeps [0, 1] (the authors fed PNG / 255), ``"zscore"``
   standardises per image.

Images are float32 arrays in [0, 1], shape (H, W); masks are float arrays in [0, 1]
(soft masks allowed) that are resized bilinearly and then binarised at 0.5 into two
channels, channel 0 = lung, channel 1 = non-lung (float32, summing to 1).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
from PIL import Image

ResizeMode = Literal["stretch", "pad"]
Contrast = Literal["equalize", "clahe", "none"]
Scaling = Literal["unit", "zscore"]


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing settings. Defaults follow the authors: 300 x 340 (H x W), stretched,
    global histogram equalisation on 256 levels, intensities in [0, 1]."""

    height: int = 300
    width: int = 340
    resize_mode: ResizeMode = "stretch"
    contrast: Contrast = "equalize"
    hist_bins: int = 256           # grey levels for equalisation / CLAHE (256 = 8-bit, like OpenCV)
    clahe_clip_limit: float = 2.0  # OpenCV's clipLimit
    clahe_tiles: tuple[int, int] = (8, 8)  # (rows, cols) of tiles
    scaling: Scaling = "unit"
    mask_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"PreprocessConfig: height and width must be >= 1, got {self.height} x {self.width}")
        if self.resize_mode not in ("stretch", "pad"):
            raise ValueError(f"PreprocessConfig: resize_mode must be 'stretch' or 'pad', got {self.resize_mode!r}")
        if self.contrast not in ("equalize", "clahe", "none"):
            raise ValueError(f"PreprocessConfig: contrast must be 'equalize', 'clahe' or 'none', got {self.contrast!r}")
        if self.scaling not in ("unit", "zscore"):
            raise ValueError(f"PreprocessConfig: scaling must be 'unit' or 'zscore', got {self.scaling!r}")
        if not 2 <= self.hist_bins <= 65536:
            raise ValueError(f"PreprocessConfig: hist_bins must be in [2, 65536], got {self.hist_bins}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where the original film sits in the network input.

    src_shape: (H0, W0) of the original; dst_shape: (H, W) of the network input;
    box: (top, left, height, width) of the resized content inside dst (pixels); the rest
    is padding. For ``stretch`` the box is the whole of dst.
    """

    src_shape: tuple[int, int]
    dst_shape: tuple[int, int]
    box: tuple[int, int, int, int]

    @property
    def scale(self) -> tuple[float, float]:
        """(row, col) scale factors original -> network input (content)."""
        return (self.box[2] / self.src_shape[0], self.box[3] / self.src_shape[1])


def compute_geometry(src_shape: tuple[int, int], dst_shape: tuple[int, int], mode: ResizeMode = "stretch") -> Geometry:
    """Geometry of resizing src_shape (H0, W0) into dst_shape (H, W) by stretching or padding."""
    h0, w0 = int(src_shape[0]), int(src_shape[1])
    h, w = int(dst_shape[0]), int(dst_shape[1])
    if min(h0, w0, h, w) < 1:
        raise ValueError(f"compute_geometry: shapes must be positive, got src {src_shape} dst {dst_shape}")
    if mode == "stretch":
        return Geometry((h0, w0), (h, w), (0, 0, h, w))
    if mode != "pad":
        raise ValueError(f"compute_geometry: mode must be 'stretch' or 'pad', got {mode!r}")
    s = min(h / h0, w / w0)
    ch, cw = max(1, min(h, round(h0 * s))), max(1, min(w, round(w0 * s)))
    return Geometry((h0, w0), (h, w), ((h - ch) // 2, (w - cw) // 2, ch, cw))


def resize_plane(x: np.ndarray, shape: tuple[int, int], method: Literal["bilinear", "nearest", "area"] = "bilinear") -> np.ndarray:
    """Resize a 2-D float array to shape (H, W) -> float32.

    Bilinear uses Pillow's resampler, which widens its kernel when shrinking
    (anti-aliased), in float32 so 16-bit precision is kept.
    """
    if x.ndim != 2:
        raise ValueError(f"resize_plane expects a 2-D array, got shape {x.shape}")
    h, w = int(shape[0]), int(shape[1])
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape == (h, w):
        return x.copy()
    resample = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST,
                "area": Image.Resampling.BOX}[method]
    return np.asarray(Image.fromarray(x, mode="F").resize((w, h), resample=resample), dtype=np.float32)


def resize(x: np.ndarray, shape: tuple[int, int], method: Literal["bilinear", "nearest", "area"] = "bilinear") -> np.ndarray:
    """Resize (H0, W0) or (H0, W0, C) float array to (H, W[, C]) -> float32."""
    if x.ndim == 2:
        return resize_plane(x, shape, method)
    if x.ndim == 3:
        return np.stack([resize_plane(x[..., c], shape, method) for c in range(x.shape[-1])], axis=-1)
    raise ValueError(f"resize expects (H, W) or (H, W, C), got shape {x.shape}")


def _place(content: np.ndarray, geometry: Geometry, fill: float = 0.0) -> np.ndarray:
    """Put resized content (box h, box w[, C]) into the padded canvas (H, W[, C])."""
    top, left, ch, cw = geometry.box
    if (top, left) == (0, 0) and (ch, cw) == geometry.dst_shape:
        return content
    canvas = np.full(geometry.dst_shape + content.shape[2:], fill, dtype=content.dtype)
    canvas[top:top + ch, left:left + cw] = content
    return canvas


def equalize_hist_u8(img: np.ndarray, bins: int = 256) -> np.ndarray:
    """Global histogram equalisation of integer grey levels, exactly as OpenCV's equalizeHist.

    For uint8 input and bins=256 the output is identical to ``cv2.equalizeHist``: the
    first occupied level maps to 0, level i to round(cdf_excl_first(i) * 255 / (N - n_first))
    computed in float32 and rounded half to even (cvRound); a constant image stays constant.

    Args:
      img: integer array (any shape) with values in [0, bins).
      bins: number of grey levels.
    Returns:
      array of the same shape and dtype, values in [0, bins).
    """
    flat = img.ravel()
    if flat.size == 0:
        raise ValueError("equalize_hist: empty image")
    hist = np.bincount(flat.astype(np.int64), minlength=bins)
    if hist.size > bins:
        raise ValueError(f"equalize_hist: values must be < {bins}, got max {int(flat.max())}")
    first = int(np.flatnonzero(hist)[0])
    total = flat.size
    if hist[first] == total:
        return np.full_like(img, first)
    scale = np.float32(bins - 1) / np.float32(total - hist[first])
    cum = np.cumsum(hist).astype(np.int64) - hist[first]  # sum of hist[first+1 .. i]
    lut = np.rint(cum.astype(np.float32) * scale)
    lut = np.clip(lut, 0, bins - 1)
    lut[: first + 1] = 0
    return lut.astype(img.dtype)[img]


def quantize(x: np.ndarray, bins: int = 256) -> np.ndarray:
    """Float image in [0, 1] -> integer levels round(x * (bins - 1)) (uint8 or uint16/int32)."""
    dtype = np.uint8 if bins <= 256 else (np.uint16 if bins <= 65536 else np.int64)
    return np.rint(np.clip(x, 0.0, 1.0) * (bins - 1)).astype(dtype)


def equalize_hist(x: np.ndarray, bins: int = 256) -> np.ndarray:
    """Histogram equalisation of a float image in [0, 1] -> float32 in [0, 1].

    The image is quantised to ``bins`` levels first; for an 8-bit image read as
    uint8 / 255 and bins=256 this equals ``cv2.equalizeHist(uint8) / 255``.
    """
    return equalize_hist_u8(quantize(x, bins), bins).astype(np.float32) / np.float32(bins - 1)


def clahe(x: np.ndarray, clip_limit: float = 2.0, tiles: tuple[int, int] = (8, 8), bins: int = 256) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (OpenCV's algorithm) -> float32 in [0, 1].

    Follows cv::CLAHE: tiles on a grid of (rows, cols); the image is extended at the
    bottom/right by reflection (BORDER_REFLECT_101) to a multiple of the grid; each tile
    histogram is clipped at max(1, int(clip_limit * tile_area / bins)) with the excess
    redistributed evenly (remainder spread with a stride); tile LUTs are interpolated
    bilinearly between tile centres. Matches OpenCV up to float rounding (not bit-exact).

    Args:
      x: float image (H, W) in [0, 1]. clip_limit: <= 0 disables clipping.
      tiles: (rows, cols) of the tile grid. bins: grey levels.
    """
    if x.ndim != 2:
        raise ValueError(f"clahe expects (H, W), got {x.shape}")
    q = quantize(x, bins).astype(np.int64)
    h, w = q.shape
    ty, tx = int(tiles[0]), int(tiles[1])
    if ty < 1 or tx < 1:
        raise ValueError(f"clahe: tiles must be >= 1, got {tiles}")
    ph, pw = (-h) % ty, (-w) % tx
    qp = np.pad(q, ((0, ph), (0, pw)), mode="reflect") if (ph or pw) else q
    th, tw = qp.shape[0] // ty, qp.shape[1] // tx
    area = th * tw
    # Per-tile histograms: (ty, tx, bins).
    blocks = qp.reshape(ty, th, tx, tw).transpose(0, 2, 1, 3).reshape(ty * tx, area)
    hist = np.zeros((ty * tx, bins), np.int64)
    np.add.at(hist, (np.repeat(np.arange(ty * tx), area), blocks.ravel()), 1)
    if clip_limit > 0:
        limit = max(int(clip_limit * area / bins), 1)
        excess = np.maximum(hist - limit, 0).sum(axis=1)
        hist = np.minimum(hist, limit)
        batch = excess // bins
        residual = excess - batch * bins
        hist += batch[:, None]
        # Residual: +1 on every step-th bin from 0 while residual lasts (step = max(bins // residual, 1)).
        for t in np.flatnonzero(residual):
            step = max(bins // int(residual[t]), 1)
            idx = np.arange(0, bins, step)[: int(residual[t])]
            hist[t, idx] += 1
    lut_scale = np.float32(bins - 1) / np.float32(area)
    luts = np.clip(np.rint(np.cumsum(hist, axis=1).astype(np.float32) * lut_scale), 0, bins - 1)
    luts = luts.astype(np.float32).reshape(ty, tx, bins)
    # Bilinear interpolation between tile centres.
    yf = (np.arange(h, dtype=np.float32) / th) - 0.5
    xf = (np.arange(w, dtype=np.float32) / tw) - 0.5
    y1 = np.floor(yf).astype(np.int64)
    x1 = np.floor(xf).astype(np.int64)
    ya = (yf - y1)[:, None]
    xa = (xf - x1)[None, :]
    y2, x2 = np.minimum(y1 + 1, ty - 1), np.minimum(x1 + 1, tx - 1)
    y1, x1 = np.maximum(y1, 0), np.maximum(x1, 0)
    Y1, Y2 = y1[:, None], y2[:, None]
    X1, X2 = x1[None, :], x2[None, :]
    top = luts[Y1, X1, q] * (1 - xa) + luts[Y1, X2, q] * xa
    bot = luts[Y2, X1, q] * (1 - xa) + luts[Y2, X2, q] * xa
    out = np.clip(np.rint(top * (1 - ya) + bot * ya), 0, bins - 1)
    return (out / np.float32(bins - 1)).astype(np.float32)


def apply_contrast(x: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """The configured contrast step on a float image (H, W) in [0, 1] -> float32 (H, W)."""
    if cfg.contrast == "equalize":
        return equalize_hist(x, cfg.hist_bins)
    if cfg.contrast == "clahe":
        return clahe(x, cfg.clahe_clip_limit, cfg.clahe_tiles, cfg.hist_bins)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def scale_intensity(x: np.ndarray, scaling: Scaling = "unit") -> np.ndarray:
    """``unit``: unchanged [0, 1]; ``zscore``: (x - mean) / std of this image (std floor 1e-6)."""
    x = x.astype(np.float32, copy=False)
    if scaling == "unit":
        return x
    if scaling == "zscore":
        return ((x - x.mean()) / max(float(x.std()), 1e-6)).astype(np.float32)
    raise ValueError(f"scale_intensity: scaling must be 'unit' or 'zscore', got {scaling!r}")


def mask_to_channels(mask: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Binarise a (soft) lung mask (H, W) in [0, 1] at ``threshold`` -> float32 (H, W, 2).

    Channel 0 = lung (mask > threshold), channel 1 = non-lung; the channels sum to 1.
    """
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ValueError(f"mask_to_channels expects (H, W) or (H, W, 1), got {mask.shape}")
    lung = (mask > threshold).astype(np.float32)
    return np.stack([lung, 1.0 - lung], axis=-1)


def _as_plane(x: np.ndarray, what: str) -> np.ndarray:
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 2:
        raise ValueError(f"{what} must be (H, W) or (H, W, 1), got shape {x.shape}")
    return x


def preprocess_image(image: np.ndarray, cfg: PreprocessConfig = PreprocessConfig()) -> tuple[np.ndarray, Geometry]:
    """Film (H0, W0[, 1]) float in [0, 1] -> network input float32 (H, W, 1) and its Geometry.

    Steps: resize the content (stretch or aspect-preserving), contrast on the content,
    pad with 0 (pad mode), then scaling.
    """
    image = _as_plane(image, "image")
    geom = compute_geometry(image.shape, cfg.shape, cfg.resize_mode)
    _, _, ch, cw = geom.box
    content = apply_contrast(resize_plane(image, (ch, cw)), cfg)
    x = scale_intensity(_place(content, geom, 0.0), cfg.scaling)
    return x[..., None], geom


def preprocess_mask(mask: np.ndarray, geometry: Geometry, threshold: float = 0.5) -> np.ndarray:
    """Lung mask (H0, W0[, 1]) in [0, 1] -> float32 (H, W, 2) [lung, non-lung] in the geometry of the image."""
    mask = _as_plane(mask, "mask")
    if mask.shape != geometry.src_shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {geometry.src_shape}")
    _, _, ch, cw = geometry.box
    soft = _place(resize_plane(mask.astype(np.float32), (ch, cw)), geometry, 0.0)
    return mask_to_channels(soft, threshold)


def preprocess_example(image: np.ndarray, mask: np.ndarray, cfg: PreprocessConfig = PreprocessConfig()) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """(image, mask) -> (x float32 (H, W, 1), y float32 (H, W, 2) [lung, non-lung], Geometry)."""
    x, geom = preprocess_image(image, cfg)
    return x, preprocess_mask(mask, geom, cfg.mask_threshold), geom


def restore_prediction(pred: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Map network output (H, W[, C]) back onto the original film (H0, W0[, C]).

    Crops the padding (pad mode) and resizes bilinearly; probabilities stay in [0, 1]
    (threshold or argmax afterwards).
    """
    if pred.shape[:2] != geometry.dst_shape:
        raise ValueError(f"restore_prediction: prediction is {pred.shape[:2]}, expected {geometry.dst_shape}")
    top, left, ch, cw = geometry.box
    crop = pred[top:top + ch, left:left + cw]
    return resize(crop.astype(np.float32), geometry.src_shape, "bilinear")
