"""Input pipeline: grain over a random-access source (TFDS ArrayRecord or phantoms).

    source --shard per JAX process--> shuffle (reshuffled every epoch) --> repeat
           --> decode + preprocess (threads) --> batch --> (optional worker processes)

Batches are dicts of NumPy arrays::

    {"image": (B, H, W, 1) float32, "mask": (B, H, W, 2) float32 [lung, non-lung],
     "id": (B,) str}

The iterator is grain's checkpointable ``DatasetIterator``: ``it.get_state()`` /
``it.set_state(state)`` (or :func:`save_state` / :func:`restore_state`, or orbax with
``grain.checkpoint.CheckpointSave``) resume exactly where training stopped.

Typical use::

    src = phantom_source(1000, 300, 340)                      # or tfds_source("cxr_folder", "train", data_dir, "mcsz512")
    it = make_iterator(src, PreprocessConfig(), PipelineConfig(batch_size=8, seed=0))
    batch = next(it)
    x, y = augment.augment_batch(batch["image"], batch["mask"], seed, step)   # on device
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any, Protocol

import grain
import numpy as np

from crnet_jax import phantom as phantom_lib
from crnet_jax import preprocess as pp


class RandomAccessSource(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Batching, order and parallelism.

    batch_size: per JAX process. num_epochs: None repeats forever (training); 1 with
    shuffle=False and drop_remainder=False gives every example once (evaluation).
    num_threads: threads reading and preprocessing examples; prefetch: examples buffered
    ahead; worker_processes: >0 moves the whole pipeline into that many processes
    (grain mp_prefetch; worth it only with spare CPU cores).
    """

    batch_size: int = 8
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None
    drop_remainder: bool = True
    num_threads: int = 4
    prefetch: int = 32
    worker_processes: int = 0
    shard_by_process: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"PipelineConfig: batch_size must be >= 1, got {self.batch_size}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"PipelineConfig: num_epochs must be None or >= 1, got {self.num_epochs}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"PipelineConfig: seed must be in [0, 2**32), got {self.seed}")


def _text(x: Any) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray):
        return _text(x.item())
    return str(x)


def _to_unit(x: np.ndarray) -> np.ndarray:
    if np.issubdtype(x.dtype, np.integer):
        return x.astype(np.float32) / np.float32(np.iinfo(x.dtype).max)
    return x.astype(np.float32)


def decode_record(record: dict[str, Any], cfg: pp.PreprocessConfig = pp.PreprocessConfig()) -> dict[str, Any]:
    """A stored record (TFDS example or phantom record) -> {"image": (H, W, 1), "mask": (H, W, 2), "id": str}.

    The film is taken out of its storage canvas (``content_box``); in ``pad`` mode its
    original aspect ratio (``original_shape``) is restored before the aspect-preserving
    resize, so stretched storage still gives geometrically correct padded inputs.
    """
    img = _to_unit(np.asarray(record["image"]))
    mask = _to_unit(np.asarray(record["mask"]))
    if img.ndim == 3:
        img = img[..., 0]
    if mask.ndim == 3:
        mask = mask[..., 0]
    box = record.get("content_box")
    if box is not None:
        top, left, h, w = (int(v) for v in np.asarray(box))
        if (top, left, h, w) != (0, 0) + img.shape:
            img, mask = img[top:top + h, left:left + w], mask[top:top + h, left:left + w]
    if cfg.resize_mode == "pad" and record.get("original_shape") is not None:
        h0, w0 = (int(v) for v in np.asarray(record["original_shape"]))
        h, w = img.shape
        target_w = max(1, round(h * w0 / h0))
        if abs(target_w - w) > 1:
            img = pp.resize_plane(img, (h, target_w))
            mask = pp.resize_plane(mask, (h, target_w))
    x, y, _ = pp.preprocess_example(img, mask, cfg)
    return {"image": x, "mask": y, "id": _text(record.get("id", ""))}


def make_dataset(source: RandomAccessSource, preprocess_cfg: pp.PreprocessConfig = pp.PreprocessConfig(),
                 cfg: PipelineConfig = PipelineConfig(), process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
    """The grain pipeline over ``source`` (see module docstring). Each JAX process reads an
    equal-sized, disjoint shard (process_index / process_count default to JAX's)."""
    n = len(source)
    if n == 0:
        raise ValueError("make_dataset: the source is empty")
    ds = grain.MapDataset.source(source)
    if cfg.shard_by_process:
        if process_index is None or process_count is None:
            import jax  # only needed to find this process's shard
            process_index, process_count = jax.process_index(), jax.process_count()
        per = n // process_count
        if per == 0:
            raise ValueError(f"make_dataset: {n} examples cannot be shared by {process_count} processes")
        ds = ds[process_index: per * process_count: process_count]
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)
    ds = ds.map(functools.partial(decode_record, cfg=preprocess_cfg))
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch))
    it_ds = it_ds.batch(cfg.batch_size, drop_remainder=cfg.drop_remainder)
    if cfg.worker_processes > 0:
        _absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_processes))
    return it_ds


def _absl_flags_parsed() -> None:
    """grain <= 0.2.18 reads an absl flag in mp_prefetch and fails in scripts that never
    parse absl flags (google/grain#1355, fixed upstream). Mark them parsed (defaults kept)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_iterator(source: RandomAccessSource, preprocess_cfg: pp.PreprocessConfig = pp.PreprocessConfig(),
                  cfg: PipelineConfig = PipelineConfig(), process_index: int | None = None,
                  process_count: int | None = None) -> grain.DatasetIterator:
    """A checkpointable iterator of batches (``get_state`` / ``set_state``)."""
    return iter(make_dataset(source, preprocess_cfg, cfg, process_index, process_count))


def phantom_source(num_examples: int, height: int = 300, width: int = 340, seed_offset: int = 0) -> phantom_lib.PhantomSource:
    """In-memory-free source of SYNTHETIC phantoms generated on demand (ids ``synthetic_...``)."""
    return phantom_lib.PhantomSource(num_examples, height, width, seed_offset)


def tfds_source(name: str, split: str, data_dir: str | os.PathLike, config: Any = None) -> RandomAccessSource:
    """Random-access source of a built TFDS dataset (see :mod:`crnet_jax.datasets`)."""
    from crnet_jax import datasets  # registers the builders with TFDS

    return datasets.data_source(name, split, data_dir, config)


def save_state(iterator: grain.DatasetIterator, path: str | os.PathLike) -> None:
    """Write the iterator's position as JSON (small; write it next to the model checkpoint)."""
    pathlib.Path(path).write_text(json.dumps(iterator.get_state()))


def restore_state(iterator: grain.DatasetIterator, path: str | os.PathLike) -> None:
    """Move a freshly made iterator (same source and configs) to a saved position."""
    iterator.set_state(json.loads(pathlib.Path(path).read_text()))
