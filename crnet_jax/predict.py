"""Segment the lungs on chest films with a trained Res-CR-Net.

Python:

    from crnet_jax.predict import predict
    mask = predict("film.dcm", checkpoint="models/jms")              # bool (H0, W0), original geometry
    mask, probs = predict(array, checkpoint=model, return_probabilities=True)   # probs (H0, W0, K)

Command line (a file or a folder, searched recursively; relative paths are kept):

    python -m crnet_jax.predict INPUT OUTPUT --checkpoint models/jms [--tta] [--no-postprocess]

writes OUTPUT/masks/<rel>.png (lung 255, else 0), OUTPUT/overlays/<rel>.png (fill and outline on
the film), OUTPUT/predictions.csv (one row per image: areas in pixels and mm^2, right and left
lung) and OUTPUT/errors.csv (files that could not be read or segmented; the run goes on).

Pipeline for one film: read (crnet_jax.readers) -> preprocess_image (crnet_jax.preprocess, the
same code as training: resize to the network size, histogram equalisation, scaling) -> model
(softmax probabilities (B, H, W, K), channel 0 = lung) [-> mean with the prediction on the
left-right flipped input, --tta] -> restore_prediction (back to the original geometry,
bilinear) -> argmax (lung where p_lung >= the other classes) -> keep the two largest connected
components and fill holes (crnet_jax.postprocess; off with postprocess=False).

Preprocessing settings come from ``preprocess.json`` in the model directory when it is there
(written beside config.json), else from the authors' defaults (PreprocessConfig(): 300 x 340,
stretched, histogram-equalised, [0, 1]); ``preprocess=`` / CLI flags override them.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as futures
import csv
import dataclasses
import json
import os
import pathlib
import sys
import threading
import weakref
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import numpy as np

from crnet_jax.host_memory import reexec_with_host_memory_settings
from crnet_jax.preprocess import Geometry, PreprocessConfig, preprocess_image, restore_prediction
from crnet_jax.readers import ImageMeta, ImageReadError, read_image

PathLike = Union[str, os.PathLike]
PREPROCESS_FILE = "preprocess.json"
KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")


class CheckpointError(ValueError):
    """The checkpoint could not be loaded; the message names it and says what to do."""


# ------------------------------------------------------------------------------------------
# Models and preprocessing settings
# ------------------------------------------------------------------------------------------

def preprocess_config_from_dict(d: dict[str, Any], source: str = "preprocess settings") -> PreprocessConfig:
    """PreprocessConfig from a JSON-style dict (lists become tuples); unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(PreprocessConfig)}
    unknown = set(d) - names
    if unknown:
        raise CheckpointError(f"{source}: unknown preprocessing fields {sorted(unknown)}; known: {sorted(names)}")
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return PreprocessConfig(**d)


def read_preprocess_config(model_dir: PathLike) -> PreprocessConfig | None:
    """The preprocessing a model was trained with (``model_dir/preprocess.json``), or None."""
    path = pathlib.Path(model_dir) / PREPROCESS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); fix or delete it to use the default preprocessing") from e
    return preprocess_config_from_dict(data, str(path))


def write_preprocess_config(cfg: PreprocessConfig, model_dir: PathLike) -> pathlib.Path:
    """Write ``model_dir/preprocess.json`` so that inference preprocesses as training did."""
    path = pathlib.Path(model_dir) / PREPROCESS_FILE
    path.write_text(json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True))
    return path


_MODEL_CACHE: dict[tuple[str, int], tuple[Any, PreprocessConfig | None]] = {}
_MODEL_LOCK = threading.Lock()


def load_checkpoint(checkpoint: Any) -> tuple[Any, PreprocessConfig | None, str]:
    """Resolve ``checkpoint`` into (model in inference mode, its PreprocessConfig or None, a name).

    Accepts a crnet_jax model directory (config.json + Orbax state, e.g. a training run's
    ``run_dir/model``), an authors' Keras ``.h5`` file (converted in memory), or a model object
    (used as it is). Paths are loaded once per process (cached by path and modification time).
    """
    if not isinstance(checkpoint, (str, os.PathLike)):
        if not callable(checkpoint) or not hasattr(checkpoint, "cfg"):
            raise CheckpointError(f"checkpoint must be a model directory, a Keras .h5 file or a ResCRNet, got {type(checkpoint).__name__}")
        return checkpoint, None, type(checkpoint).__name__
    path = pathlib.Path(checkpoint).expanduser().absolute()
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found; pass a model directory (config.json + state/) or a Keras .h5 file")
    key = (str(path), path.stat().st_mtime_ns)
    with _MODEL_LOCK:
        if key in _MODEL_CACHE:
            model, pre = _MODEL_CACHE[key]
            return model, pre, str(path)
        if path.is_file() and path.suffix.lower() in KERAS_SUFFIXES:
            from crnet_jax.convert_keras import KerasImportError, load_keras_model

            try:
                model = load_keras_model(path)
            except (KerasImportError, OSError) as e:
                raise CheckpointError(f"{path}: cannot convert this Keras model ({e})") from e
            pre = None
        elif path.is_dir():
            from crnet_jax.checkpoint import load_model

            try:
                model = load_model(path)
            except FileNotFoundError as e:
                raise CheckpointError(str(e)) from e
            pre = read_preprocess_config(path)
        else:
            raise CheckpointError(f"{path}: not a model directory nor a Keras file ({', '.join(KERAS_SUFFIXES)}); "
                                  "convert Keras models with python -m crnet_jax.convert_keras MODEL.h5 OUT_DIR")
        _MODEL_CACHE[key] = (model, pre)
    return model, pre, str(path)


# ------------------------------------------------------------------------------------------
# The jitted forward pass, cached per (model, input shape)
# ------------------------------------------------------------------------------------------

class _Forward:
    """Compiled inference functions of one model: probabilities = f(state, x), one executable per
    (input shape, dtype, tta). The model's current state is read at every call, so a model that
    keeps training is seen as it is now; the model object itself is never modified."""

    def __init__(self, model: Any):
        from flax import nnx

        graphdef, state = nnx.split(model)
        view = nnx.merge(graphdef, state)  # a second module over the same arrays
        view.eval()                       # inference mode (dropout off, BatchNorm running stats)
        self.graphdef = nnx.graphdef(view)
        self.compiled: dict[tuple, Any] = {}
        self.lock = threading.Lock()

    def _function(self, tta: bool) -> Callable:
        import jax
        import jax.numpy as jnp
        from flax import nnx

        graphdef = self.graphdef

        def forward(state, x):
            model = nnx.merge(graphdef, state)
            if not tta:
                return model(x)
            both = model(jnp.concatenate([x, x[:, :, ::-1]], axis=0))
            n = x.shape[0]
            return 0.5 * (both[:n] + both[n:, :, ::-1])

        return jax.jit(forward)

    def __call__(self, model: Any, x: np.ndarray, tta: bool = False) -> np.ndarray:
        from flax import nnx

        state = nnx.state(model)
        key = (tuple(x.shape), str(x.dtype), bool(tta))
        with self.lock:
            fn = self.compiled.get(key)
            if fn is None:
                fn = self._function(tta).lower(state, x).compile()
                self.compiled[key] = fn
        return np.asarray(fn(state, x))


_FORWARDS: "weakref.WeakKeyDictionary[Any, _Forward]" = weakref.WeakKeyDictionary()


def forward(model: Any, x: np.ndarray, tta: bool = False) -> np.ndarray:
    """Network probabilities for a preprocessed batch.

    Args:
      model: a ResCRNet (any mode; run in inference mode).
      x: float32 (B, H, W, C) preprocessed images.
      tta: also run the left-right flipped batch and average the (flipped back) probabilities.

    Returns:
      float32 (B, H, W, K) softmax probabilities (channel 0 = lung). Compiled once per
      (model, shape, tta); later calls reuse the executable.
    """
    x = np.asarray(x, np.float32)
    if x.ndim != 4:
        raise ValueError(f"forward expects (B, H, W, C) images, got shape {x.shape}")
    fwd = _FORWARDS.get(model)
    if fwd is None:
        fwd = _FORWARDS.setdefault(model, _Forward(model))
    return fwd(model, x, tta)


def compiled_shapes(model: Any) -> list[tuple]:
    """The (shape, dtype, tta) keys compiled so far for ``model`` (for tests and diagnostics)."""
    fwd = _FORWARDS.get(model)
    return sorted(fwd.compiled) if fwd is not None else []


# ------------------------------------------------------------------------------------------
# One film
# ------------------------------------------------------------------------------------------

def as_film(image: np.ndarray, bits: int | None = None, where: str = "image") -> np.ndarray:
    """An array of any dtype and bit depth -> float32 (H, W) in [0, 1] (bright = dense, as given).

    uint8 / 255, uint16 / 65535 (or / (2**bits - 1) when ``bits`` is given, e.g. 12 for 12-bit
    data held in uint16), other integers by their dtype's range, bool as 0/1, floats as they
    are (they must lie in [0, 1]). (H, W, 1) is squeezed; (H, W, 3) RGB is converted to grey
    (ITU-R BT.601 luma).
    """
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ValueError(f"{where}: expected a (H, W) greyscale film (or (H, W, 3) RGB), got shape {a.shape}")
    if min(a.shape[:2]) < 2:
        raise ValueError(f"{where}: image is degenerate (shape {a.shape}); use an image at least 2 x 2 pixels")
    if a.dtype == bool:
        x = a.astype(np.float64)
    elif np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        lo, hi = (0.0, float(2**int(bits) - 1)) if bits is not None else (float(info.min), float(info.max))
        x = np.clip((a.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{where}: float image contains NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(f"{where}: float image values span [{lo:g}, {hi:g}], expected [0, 1]; "
                             "scale it first (e.g. divide by 255 or 65535) or pass an integer array")
        x = np.clip(a.astype(np.float64), 0.0, 1.0)
    else:
        raise ValueError(f"{where}: unsupported dtype {a.dtype}")
    if x.ndim == 3:
        x = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    return x.astype(np.float32)


def probabilities_to_mask(probs: np.ndarray) -> np.ndarray:
    """(H, W, K) probabilities -> bool (H, W) lung mask: argmax == 0 (ties go to the lung, as in
    crnet_jax.metrics.hard_labels); for K = 2 this is p_lung >= 0.5."""
    if probs.shape[-1] == 1:
        return probs[..., 0] >= 0.5
    return np.argmax(probs, axis=-1) == 0


@dataclasses.dataclass
class Segmentation:
    """The result for one film, all in the original geometry.

    mask: bool (H0, W0), final (post-processed when asked) lung mask.
    raw_mask: bool (H0, W0), the thresholded network output before post-processing.
    probabilities: float32 (H0, W0, K) softmax probabilities (channel 0 = lung).
    film: float32 (H0, W0) the film as read, [0, 1]. meta: reader metadata (None for arrays).
    geometry: how the film was mapped to the network input.
    """

    mask: np.ndarray
    raw_mask: np.ndarray
    probabilities: np.ndarray
    film: np.ndarray
    meta: ImageMeta | None
    geometry: Geometry

    @property
    def spacing(self) -> tuple[float, float] | None:
        return None if self.meta is None else self.meta.pixel_spacing_mm


def _finish(probs_net: np.ndarray, film: np.ndarray, meta: ImageMeta | None, geom: Geometry,
            postprocess: bool, border_last: bool = False) -> Segmentation:
    from crnet_jax.postprocess import postprocess_mask

    probs = restore_prediction(probs_net, geom)
    raw = probabilities_to_mask(probs)
    mask = postprocess_mask(raw, border_last=border_last) if postprocess else raw
    return Segmentation(mask, raw, probs.astype(np.float32), film, meta, geom)


def _load_film(image: Any, bits: int | None) -> tuple[np.ndarray, ImageMeta | None]:
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    return as_film(image, bits), None


def _settings(checkpoint: Any, preprocess: PreprocessConfig | None) -> tuple[Any, PreprocessConfig]:
    model, pre, _ = load_checkpoint(checkpoint)
    cfg = preprocess or pre or PreprocessConfig()
    if model.cfg.in_channels != 1:
        raise CheckpointError(f"this model takes {model.cfg.in_channels}-channel images; predict handles greyscale chest films (1 channel)")
    return model, cfg


def segment(image: Any, checkpoint: Any, *, preprocess: PreprocessConfig | None = None, tta: bool = False,
            postprocess: bool = True, border_last: bool = False, bits: int | None = None) -> Segmentation:
    """Segment one film and return everything (:class:`Segmentation`); see :func:`predict`."""
    model, cfg = _settings(checkpoint, preprocess)
    film, meta = _load_film(image, bits)
    x, geom = preprocess_image(film, cfg)
    probs = forward(model, x[None], tta)[0]
    return _finish(probs, film, meta, geom, postprocess, border_last)


def predict(image: Any, checkpoint: Any, *, preprocess: PreprocessConfig | None = None, tta: bool = False,
            postprocess: bool = True, border_last: bool = False, return_probabilities: bool = False,
            bits: int | None = None):
    """Lung mask of one chest film, in the film's own geometry.

    Args:
      image: a file path (PNG/JPEG/TIFF 8/16-bit, DICOM, ...; read by crnet_jax.readers) or an
        array (H, W) of any size and dtype (see :func:`as_film`; ``bits`` for e.g. 12-bit data
        in uint16).
      checkpoint: a model directory, an authors' Keras .h5 file (converted on the fly) or a
        loaded model.
      preprocess: override the model's preprocessing settings (default: the model directory's
        preprocess.json, else the authors' 300 x 340 histogram-equalised input).
      tta: average with the prediction on the left-right flipped film.
      postprocess: keep the two largest connected components and fill holes.
      border_last: in post-processing, rank components touching the image border (often air
        outside the body) after all others (crnet_jax.postprocess.keep_largest_components).
      return_probabilities: also return the probabilities.

    Returns:
      bool (H0, W0) lung mask; with ``return_probabilities`` a tuple (mask, float32 (H0, W0, K)
      softmax probabilities, channel 0 = lung).
    """
    seg = segment(image, checkpoint, preprocess=preprocess, tta=tta, postprocess=postprocess,
                  border_last=border_last, bits=bits)
    return (seg.mask, seg.probabilities) if return_probabilities else seg.mask


# ------------------------------------------------------------------------------------------
# Many films: bounded read-ahead in threads, batched forward passes
# ------------------------------------------------------------------------------------------

def _prepare(item: Any, cfg: PreprocessConfig, bits: int | None):
    film, meta = _load_film(item, bits)
    x, geom = preprocess_image(film, cfg)
    return film, meta, x, geom


def segment_many(items: Iterable[Any], checkpoint: Any, *, preprocess: PreprocessConfig | None = None,
                 tta: bool = False, postprocess: bool = True, border_last: bool = False, batch_size: int = 8,
                 workers: int = 2, bits: int | None = None) -> Iterator[tuple[Any, Segmentation | Exception]]:
    """Segment many films, in order, yielding (item, Segmentation) or (item, the exception) for a
    film that could not be read or preprocessed (the others go on).

    Films are read and preprocessed ``workers`` at a time in threads (at most 2 batches ahead, so
    memory stays bounded), run through the network ``batch_size`` at a time (the last batch is
    padded so one executable serves the whole run; never larger than the number of items when it is known) and restored and post-processed one by one.
    """
    model, cfg = _settings(checkpoint, preprocess)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if hasattr(items, "__len__"):
        batch_size = max(1, min(batch_size, len(items)))  # type: ignore[arg-type]
    it = iter(items)
    with futures.ThreadPoolExecutor(max(1, workers)) as pool:
        pending: collections.deque = collections.deque()

        def refill() -> None:
            while len(pending) < 2 * batch_size:
                try:
                    item = next(it)
                except StopIteration:
                    return
                pending.append((item, pool.submit(_prepare, item, cfg, bits)))

        refill()
        while pending:
            batch: list = []
            while pending and len(batch) < batch_size:
                item, fut = pending.popleft()
                try:
                    batch.append((item, fut.result()))
                except Exception as e:  # noqa: BLE001 - reported per file, the run goes on
                    yield item, e
                refill()
            if not batch:
                continue
            x = np.stack([b[1][2] for b in batch])
            if len(batch) < batch_size:
                x = np.concatenate([x, np.zeros((batch_size - len(batch),) + x.shape[1:], x.dtype)])
            try:
                probs = forward(model, x, tta)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: report the batch, go on
                for item, _ in batch:
                    yield item, RuntimeError(f"network failed on this batch ({type(e).__name__}: {e})")
                continue
            for i, (item, (film, meta, _, geom)) in enumerate(batch):
                try:
                    yield item, _finish(probs[i], film, meta, geom, postprocess, border_last)
                except Exception as e:  # noqa: BLE001
                    yield item, e


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------

def find_inputs(root: pathlib.Path, exclude: pathlib.Path | None = None) -> list[pathlib.Path]:
    """Every regular, non-hidden file under ``root`` (recursively, sorted), or [root] for a file.
    All files are listed, whatever their suffix (DICOM files often have none): those that are
    not images end up in the errors CSV."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such file or folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = pathlib.Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (exclude is None or (here / d).resolve() != exclude.resolve()))
        found.extend(here / f for f in sorted(filenames) if not f.startswith("."))
    return found


def output_names(files: Sequence[pathlib.Path], root: pathlib.Path) -> dict[pathlib.Path, pathlib.Path]:
    """Relative output name (.png) of each input: its path under ``root`` with the suffix replaced
    by .png; when two inputs would collide (a.dcm and a.png) both keep their suffix (a.dcm.png)."""
    base = root if root.is_dir() else root.parent
    rel = {f: f.relative_to(base) for f in files}
    stems = collections.Counter(r.with_suffix(".png") for r in rel.values())
    return {f: (r.with_suffix(".png") if stems[r.with_suffix(".png")] == 1 else r.parent / (r.name + ".png"))
            for f, r in rel.items()}


def write_mask_png(path: pathlib.Path, mask: np.ndarray) -> None:
    """Write a bool mask as an 8-bit PNG, lung 255, background 0."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(path)


def write_probability_png(path: pathlib.Path, p: np.ndarray) -> None:
    """Write a probability map in [0, 1] as a 16-bit PNG (p * 65535)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.rint(np.clip(p, 0, 1) * 65535).astype(np.uint16)).save(path)


CSV_FIELDS = (
    "file", "mask", "overlay", "height", "width", "format", "bits", "spacing_row_mm", "spacing_col_mm",
    "lung_area_px", "lung_area_mm2", "right_lung_area_px", "left_lung_area_px", "right_lung_area_mm2",
    "left_lung_area_mm2", "lung_fraction", "components_before_postprocess", "notes",
)
ERROR_FIELDS = ("file", "stage", "error")


def measure(seg: Segmentation) -> dict[str, Any]:
    """Areas of a segmentation: pixels, and mm^2 when the pixel spacing is known; the right lung
    is the patient's right (image left, crnet_jax.postprocess.split_lungs)."""
    from crnet_jax.postprocess import label_components, split_lungs

    sides = split_lungs(seg.mask)
    sp = seg.spacing
    px_area = None if sp is None else sp[0] * sp[1]
    n = int(seg.mask.sum())
    row: dict[str, Any] = {
        "height": seg.mask.shape[0], "width": seg.mask.shape[1],
        "spacing_row_mm": "" if sp is None else f"{sp[0]:.6g}", "spacing_col_mm": "" if sp is None else f"{sp[1]:.6g}",
        "lung_area_px": n, "right_lung_area_px": int(sides["right"].sum()), "left_lung_area_px": int(sides["left"].sum()),
        "lung_fraction": f"{n / seg.mask.size:.6f}",
        "components_before_postprocess": int(label_components(seg.raw_mask)[1].size),
    }
    for key in ("lung_area", "right_lung_area", "left_lung_area"):
        row[f"{key}_mm2"] = "" if px_area is None else f"{row[key + '_px'] * px_area:.2f}"
    if seg.meta is not None:
        row.update(format=seg.meta.format, bits=seg.meta.bits, notes="; ".join(seg.meta.notes))
    return row


def run(input_path: PathLike, output_dir: PathLike, checkpoint: Any, *, preprocess: PreprocessConfig | None = None,
        tta: bool = False, postprocess: bool = True, border_last: bool = False, batch_size: int = 8,
        workers: int = 2, overlays: bool = True,
        probabilities: bool = False, progress: bool = True) -> dict[str, Any]:
    """The CLI's work: segment every file under ``input_path`` and write masks, overlays and CSVs
    into ``output_dir``. Returns {"n_ok", "n_errors", "csv", "errors_csv"}."""
    from tqdm import tqdm

    from crnet_jax.overlay import save_overlay

    root = pathlib.Path(input_path)
    out = pathlib.Path(output_dir)
    files = find_inputs(root, exclude=out)
    names = output_names(files, root)
    base = root if root.is_dir() else root.parent
    out.mkdir(parents=True, exist_ok=True)
    csv_path, err_path = out / "predictions.csv", out / "errors.csv"
    n_ok = n_err = 0
    with open(csv_path, "w", newline="") as fc, open(err_path, "w", newline="") as fe:
        rows = csv.DictWriter(fc, CSV_FIELDS)
        errors = csv.DictWriter(fe, ERROR_FIELDS)
        rows.writeheader()
        errors.writeheader()
        results = segment_many(files, checkpoint, preprocess=preprocess, tta=tta, postprocess=postprocess,
                               border_last=border_last, batch_size=batch_size, workers=workers)
        bar = tqdm(results, total=len(files), unit="film", disable=not progress, desc="segmenting")
        for path, result in bar:
            rel = str(path.relative_to(base))
            if isinstance(result, Exception):
                stage = "read" if isinstance(result, (ImageReadError, OSError)) else "segment"
                errors.writerow({"file": rel, "stage": stage, "error": str(result)})
                fe.flush()
                n_err += 1
                bar.set_postfix(errors=n_err)
                continue
            try:
                name = names[path]
                write_mask_png(out / "masks" / name, result.mask)
                row = {"file": rel, "mask": str(pathlib.Path("masks") / name), **measure(result)}
                if overlays:
                    save_overlay(out / "overlays" / name, result.film, result.mask)
                    row["overlay"] = str(pathlib.Path("overlays") / name)
                if probabilities:
                    write_probability_png(out / "probabilities" / name, result.probabilities[..., 0])
                rows.writerow(row)
                fc.flush()
                n_ok += 1
            except Exception as e:  # noqa: BLE001 - e.g. disk full for one file: report, go on
                errors.writerow({"file": rel, "stage": "write", "error": f"{type(e).__name__}: {e}"})
                n_err += 1
    return {"n_ok": n_ok, "n_errors": n_err, "csv": csv_path, "errors_csv": err_path}


def add_preprocess_args(parser: argparse.ArgumentParser) -> None:
    """CLI flags that override the model's preprocessing settings."""
    g = parser.add_argument_group("preprocessing (default: the model's preprocess.json, else the authors' settings)")
    g.add_argument("--height", type=int, help="network input height (authors: 300)")
    g.add_argument("--width", type=int, help="network input width (authors: 340)")
    g.add_argument("--resize-mode", choices=("stretch", "pad"))
    g.add_argument("--contrast", choices=("equalize", "clahe", "none"),
                   help="'none' for films that are already equalised (e.g. the authors' sample PNGs)")
    g.add_argument("--scaling", choices=("unit", "zscore"))


def preprocess_from_args(args: argparse.Namespace, checkpoint: Any) -> PreprocessConfig | None:
    """The checkpoint's preprocessing with the CLI overrides applied (None when nothing is overridden)."""
    changes = {k: getattr(args, k) for k in ("height", "width", "resize_mode", "contrast", "scaling")
               if getattr(args, k, None) is not None}
    if not changes:
        return None
    _, pre, _ = load_checkpoint(checkpoint)
    return dataclasses.replace(pre or PreprocessConfig(), **changes)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command line: malloc settings and block cache (crnet_jax.host_memory)
        reexec_with_host_memory_settings("crnet_jax.predict", ("crnet-predict",))
    parser = argparse.ArgumentParser(
        prog="python -m crnet_jax.predict",
        description="Segment the lungs on chest films (a file or a folder, recursively): lung masks, overlays, "
                    "a CSV of lung areas, and an errors CSV for files that could not be read.")
    parser.add_argument("input", help="an image file or a folder (PNG, JPEG, TIFF 8/16-bit, DICOM)")
    parser.add_argument("output", help="output folder (masks/, overlays/, predictions.csv, errors.csv)")
    parser.add_argument("--checkpoint", required=True, help="model directory (config.json + state/) or an authors' Keras .h5")
    parser.add_argument("--tta", action="store_true", help="average with the left-right flipped film")
    parser.add_argument("--no-postprocess", action="store_true",
                        help="keep the raw thresholded mask (default: keep the 2 largest components and fill holes)")
    parser.add_argument("--border-last", action="store_true",
                        help="post-processing: rank components touching the image border (air outside the body) last")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="threads reading and preprocessing films")
    parser.add_argument("--no-overlays", action="store_true", help="do not write overlay PNGs")
    parser.add_argument("--probabilities", action="store_true", help="also write lung probability maps (16-bit PNG)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_preprocess_args(parser)
    args = parser.parse_args(argv)
    try:
        pre = preprocess_from_args(args, args.checkpoint)
        summary = run(args.input, args.output, args.checkpoint, preprocess=pre, tta=args.tta,
                      postprocess=not args.no_postprocess, border_last=args.border_last,
                      batch_size=args.batch_size, workers=args.workers,
                      overlays=not args.no_overlays, probabilities=args.probabilities, progress=not args.quiet)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"segmented {summary['n_ok']} film(s) -> {summary['csv']}")
    if summary["n_errors"]:
        print(f"{summary['n_errors']} file(s) could not be segmented: see {summary['errors_csv']}", file=sys.stderr)
    return 0 if summary["n_ok"] or not summary["n_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
