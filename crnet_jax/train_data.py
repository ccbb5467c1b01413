"""Training and validation data of a run, sharded over JAX processes.

Sources (``DataConfig.source``):

* ``phantom``: SYNTHETIC phantoms (crnet_jax.phantom), generated on demand at the network size;
  training phantoms are seeds [0, num_train), validation ones seeds [VAL_SEED_OFFSET, +num_val).
* ``folder``: ``path/images/<id>.<ext>`` + ``path/masks/<id>.png`` (+ optional manifest.csv with a
  ``patient`` or ``patient_id`` column); 90/10 train/validation split by a SHA-256 hash of the
  patient id, so no patient is in both. Read with crnet_jax.readers (this module's
  :class:`FolderSource` adapter: the TFDS ``cxr_folder`` builder needs a build step first).
* ``tfds``: a dataset built by crnet_jax.datasets (``name`` e.g. "cxr_folder/mcsz512",
  ``path`` = its data_dir), splits "train" and "validation".

Every record goes through :func:`crnet_jax.pipeline.decode_record` (resize, histogram
equalisation, [lung, non-lung] masks), so training sees exactly what inference sees.

Order. Example k of the run's global stream is ``grain.MapDataset.source(src).shuffle(seed)
.repeat()[k]`` (a new permutation every epoch); the global batch of step s holds examples
[s*B, (s+1)*B). Each process reads only the rows of the global batch that live on its devices
(:func:`crnet_jax.distributed.local_rows`) and the global array is assembled with
``jax.make_array_from_process_local_data``. The iterator position is therefore just the step:
a resumed run reads exactly the batches a straight run would.
"""
from __future__ import annotations

import csv
import hashlib
import pathlib
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import grain
import numpy as np

from crnet_jax import phantom as phantom_lib
from crnet_jax import pipeline
from crnet_jax import preprocess as pp
from crnet_jax import readers
from crnet_jax.train_config import DataConfig

VAL_SEED_OFFSET = 1_000_000


# --------------------------------------------------------------------------- sources

def patient_split(patient_id: str, val_fraction: float, salt: str) -> str:
    """'train' or 'validation' from a SHA-256 hash of (salt, patient id); stable across machines."""
    digest = hashlib.sha256(f"{salt}\x00{patient_id}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "validation" if u < val_fraction else "train"


class FolderSource:
    """Random-access source over images/<id>.<ext> + masks/<id>.png (records as crnet_jax.pipeline
    expects them: ``image`` float32 (H0, W0) in [0, 1], ``mask`` float32 (H0, W0) in {0, 1}, ``id``)."""

    def __init__(self, items: list[tuple[str, pathlib.Path, pathlib.Path]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ident, image_path, mask_path = self.items[int(index)]
        image, _ = readers.read_image(image_path)
        mask, _, _ = readers.read_mask(mask_path)
        if mask.shape != image.shape:
            raise ValueError(f"{mask_path}: mask is {mask.shape}, its image {image_path} is {image.shape}; "
                             "masks must have the size of their films")
        return {"image": image, "mask": mask.astype(np.float32), "id": ident}


def scan_folder(root: str | pathlib.Path, val_fraction: float, salt: str) -> dict[str, FolderSource]:
    """Pair images/ and masks/ of ``root`` and split them by patient (see module docstring)."""
    root = pathlib.Path(root).expanduser()
    img_dir, mask_dir = root / "images", root / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise FileNotFoundError(f"{root}: expected folders images/ (films) and masks/ (<id>.png lung masks); "
                                "point data.path at the folder that holds them")
    patients: dict[str, str] = {}
    manifest = root / "manifest.csv"
    if manifest.is_file():
        with open(manifest, newline="") as f:
            for row in csv.DictReader(f):
                pid = (row.get("patient") or row.get("patient_id") or "").strip()
                if row.get("id") and pid:
                    patients[row["id"].strip()] = pid
    splits: dict[str, list] = {"train": [], "validation": []}
    missing = []
    for p in sorted(img_dir.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.suffix.lower() not in readers.SUPPORTED_SUFFIXES:
            continue
        m = mask_dir / f"{p.stem}.png"
        if not m.is_file():
            missing.append(p.name)
            continue
        split = patient_split(patients.get(p.stem, p.stem), val_fraction, salt)
        splits[split].append((p.stem, p, m))
    if not splits["train"] or not splits["validation"]:
        raise ValueError(f"{root}: the split left {len(splits['train'])} training and {len(splits['validation'])} "
                         f"validation examples ({len(missing)} images had no mask); add data or change data.val_fraction")
    return {k: FolderSource(v) for k, v in splits.items()}


class DecodedSource:
    """A record source decoded by :func:`crnet_jax.pipeline.decode_record`, optionally cached in memory.

    Items: {"image": (H, W, 1) float32, "mask": (H, W, 2) float32, "id": str}.
    """

    def __init__(self, source: Any, preprocess_cfg: pp.PreprocessConfig, cache: bool):
        self.source = source
        self.preprocess_cfg = preprocess_cfg
        self.cache: dict[int, dict[str, Any]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        try:
            item = pipeline.decode_record(self.source[index], self.preprocess_cfg)
        except Exception as e:  # name the example: a bad file must be findable
            raise RuntimeError(f"could not prepare example {index} of {self.source!r}: {e}") from e
        if self.cache is not None:
            self.cache[index] = item
        return item


def preprocess_config(cfg: DataConfig) -> pp.PreprocessConfig:
    return pp.PreprocessConfig(height=cfg.height, width=cfg.width, contrast=cfg.contrast, resize_mode=cfg.resize_mode)


def make_sources(cfg: DataConfig) -> tuple[DecodedSource, DecodedSource, str]:
    """(train, validation, description) for a DataConfig."""
    pcfg = preprocess_config(cfg)
    if cfg.source == "phantom":
        train = phantom_lib.PhantomSource(cfg.num_train, cfg.height, cfg.width, 0)
        val = phantom_lib.PhantomSource(cfg.num_val, cfg.height, cfg.width, VAL_SEED_OFFSET)
        desc = f"SYNTHETIC phantoms ({cfg.num_train} train / {cfg.num_val} validation, {cfg.height} x {cfg.width})"
    elif cfg.source == "folder":
        parts = scan_folder(cfg.path, cfg.val_fraction, cfg.split_salt)
        train, val = parts["train"], parts["validation"]
        desc = f"folder {cfg.path} ({len(train)} train / {len(val)} validation by patient hash)"
    elif cfg.source == "tfds":
        if not cfg.name:
            raise ValueError("data.source=tfds needs data.name, e.g. --set data.name=cxr_folder/mcsz512")
        name, _, config = cfg.name.partition("/")
        train = pipeline.tfds_source(name, "train", cfg.path, config or None)
        val = pipeline.tfds_source(name, "validation", cfg.path, config or None)
        desc = f"TFDS {cfg.name} in {cfg.path} ({len(train)} train / {len(val)} validation)"
    else:  # guarded by DataConfig
        raise ValueError(f"unknown data.source {cfg.source!r}")
    return DecodedSource(train, pcfg, cfg.cache), DecodedSource(val, pcfg, cfg.cache), desc


# --------------------------------------------------------------------------- training batches

class TrainBatches:
    """Process-local training batches by step, read ahead by a background thread.

    ``batch(step)`` is a pure function of (source, seed, step): {"image": (b, H, W, 1),
    "mask": (b, H, W, 2)} with b = this process's rows of the global batch. Iterating from
    ``start_step`` yields (step, local batch) with up to ``prefetch`` batches prepared ahead.
    """

    def __init__(self, source: DecodedSource, *, seed: int, global_batch_size: int, rows: tuple[int, int],
                 start_step: int = 0, prefetch: int = 2, num_threads: int = 4):
        self.source = source
        self.order = grain.MapDataset.source(np.arange(len(source))).shuffle(seed=seed).repeat()
        self.global_batch_size = global_batch_size
        self.rows = rows
        self.start_step = start_step
        self.prefetch = prefetch
        self.pool = ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="crnet-data")
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def indices(self, step: int) -> np.ndarray:
        """Source indices of this process's rows of step ``step``."""
        base = step * self.global_batch_size
        return np.array([self.order[base + r] for r in range(*self.rows)], np.int64)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        items = list(self.pool.map(self.source.__getitem__, self.indices(step)))
        return {"image": np.stack([it["image"] for it in items]), "mask": np.stack([it["mask"] for it in items])}

    def _produce(self) -> None:
        step = self.start_step
        while not self._stop.is_set():
            try:
                item = (step, self.batch(step))
            except Exception as e:  # hand the error to the consumer
                item = (step, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item[1], Exception):
                return
            step += 1

    def __iter__(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        if self.prefetch <= 0:
            step = self.start_step
            while True:
                yield step, self.batch(step)
                step += 1
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, name="crnet-prefetch", daemon=True)
        self._thread.start()
        while True:
            step, item = self._queue.get()
            if isinstance(item, Exception):
                raise item
            yield step, item

    def position(self, next_step: int) -> dict[str, Any]:
        """The iterator position to store in a checkpoint (JSON-able)."""
        return {"next_step": int(next_step), "examples_consumed": int(next_step) * self.global_batch_size,
                "global_batch_size": self.global_batch_size, "num_examples": len(self.source)}

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- validation batches

def eval_batches(source: DecodedSource, global_batch_size: int, rows: tuple[int, int]
                 ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]]:
    """Every validation example once, in order, as process-local rows of global batches.

    The last batch is padded by repeating example 0. Yields (local batch, global indices (B,)
    of the whole global batch, valid (B,) bool): every process knows which GLOBAL rows are real.
    """
    n = len(source)
    for start in range(0, n, global_batch_size):
        idx = np.arange(start, start + global_batch_size)
        items = [source[int(i) if i < n else 0] for i in idx[rows[0]:rows[1]]]
        yield ({"image": np.stack([it["image"] for it in items]),
                "mask": np.stack([it["mask"] for it in items])}, idx, idx < n)
