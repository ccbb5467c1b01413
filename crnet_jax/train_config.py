"""Training configuration as plain, frozen data, and how a run gets it.

A run's configuration is one :class:`TrainConfig` holding nested dataclasses (model, data,
augmentation, optimiser, checkpoints). It comes from, in order:

1. a Python config file (``--config configs/x.py``) that defines ``config = TrainConfig(...)``
   or a function ``get_config() -> TrainConfig``; or a JSON file written by a run
   (``run_dir/config.json``); without a file the defaults of :class:`TrainConfig`;
2. ``--set key=value`` overrides with dotted keys into the nested dataclasses
   (``--set model.num_conv_res=3 --set optim.learning_rate=3e-4 --set data.source=folder``),
   parsed by the field's type: int, float (``1e-3``, ``nan``, ``inf``), bool
   (``true/false/1/0/yes/no``), str, tuples (``3,5,7`` or ``[3, 5, 7]``), ``None`` for
   optional fields.

The resolved configuration is saved with each run as JSON (:func:`save_config`) and read back
by :func:`load_config` (``--resume`` uses it).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import types
import typing
from typing import Any, Sequence

from crnet_jax.augment import AugmentConfig
from crnet_jax.config import ModelConfig

DATA_SOURCES = ("phantom", "folder", "tfds")
LOSSES = ("tanimoto_weighted", "tanimoto", "defu_dice")
SCHEDULES = ("constant", "cosine", "plateau")
VAL_METRICS = ("dice", "iou", "loss", "pooled_dice", "accuracy")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where examples come from and how they are prepared.

    Attributes:
      source: "phantom" (synthetic phantoms generated in memory), "folder" (``path`` holds
        images/<id>.<ext> and masks/<id>.png, optional manifest.csv with a patient column),
        or "tfds" (a dataset built by :mod:`crnet_jax.datasets`, ``name`` + ``path`` = data_dir).
      path: folder root (folder) or TFDS data_dir (tfds).
      name: TFDS dataset name (tfds), e.g. "cxr_folder/mcsz512".
      height, width: network input size in pixels (H x W); the authors used 300 x 340.
      num_train, num_val: number of phantoms in the training / validation sets (phantom only).
      val_fraction: fraction of patients held out for validation by id hash (folder only).
      split_salt: salt of the patient-id hash split (folder only).
      contrast: "equalize" (the authors'), "clahe" or "none" (see crnet_jax.preprocess).
      resize_mode: "stretch" (the authors') or "pad" (keep the aspect ratio).
      augment: apply on-device augmentation (crnet_jax.augment) to training batches.
      cache: keep prepared examples in memory after their first use.
      prefetch: batches prepared ahead of the device by a background thread (0 = none).
    """

    source: str = "phantom"
    path: str = ""
    name: str = ""
    height: int = 64
    width: int = 64
    num_train: int = 512
    num_val: int = 32
    val_fraction: float = 0.1
    split_salt: str = "crnet-train-v1"
    contrast: str = "equalize"
    resize_mode: str = "stretch"
    augment: bool = False
    cache: bool = True
    prefetch: int = 2

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ValueError(f"data.source must be one of {DATA_SOURCES}, got {self.source!r}")
        if self.source in ("folder", "tfds") and not self.path:
            raise ValueError(f"data.source={self.source!r} needs data.path (e.g. --set data.path=/data/mcsz512)")
        if self.height < 16 or self.width < 16:
            raise ValueError(f"data.height/width must be >= 16, got {self.height} x {self.width}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimiser and learning-rate schedule.

    Attributes:
      learning_rate: peak learning rate (the authors: Adam 1e-3).
      b1, b2, eps: Adam moments and epsilon (Keras' epsilon is 1e-7).
      weight_decay: decoupled weight decay (AdamW) when > 0.
      schedule: "constant", "cosine" (decay to ``min_lr_ratio`` * lr over the run, after
        ``warmup_steps`` of linear warm-up) or "plateau" (``optax.contrib.reduce_on_plateau``:
        multiply the rate by ``plateau_factor`` when the training loss averaged over
        ``plateau_accumulation`` steps has not improved for ``plateau_patience`` such averages,
        as DEFU-Net's ReduceLROnPlateau).
      clip_norm: clip gradients to this global norm (None = no clipping).
    """

    learning_rate: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-7
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    plateau_cooldown: int = 0
    plateau_accumulation: int = 10
    plateau_rtol: float = 1e-4
    plateau_min_scale: float = 1e-3
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"optim.clip_norm must be > 0 or None, got {self.clip_norm}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Run checkpoints (Orbax CheckpointManager of the full training state).

    Attributes:
      every: save every this many steps (0 = only at validations and at the end).
      keep: number of most recent checkpoints kept (the best one is kept besides them).
      asynchronous: write checkpoints in a background thread while training goes on.
      save_best: keep the checkpoint with the best validation metric too.
    """

    every: int = 0
    keep: int = 2
    asynchronous: bool = True
    save_best: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. The defaults are the quick phantom run of ``configs/default.py``
    (the authors' lung network with BatchNorm momentum 0.9, 64 x 64 phantoms, 80 steps).

    Attributes:
      model, data, augment, optim, checkpoint: the nested settings.
      seed: seeds parameter init, data order, dropout and augmentation; all randomness of
        step s is derived from (seed, s), so a resumed run repeats a straight one exactly.
      batch_size: GLOBAL batch size (all devices and processes); must divide evenly.
      num_steps: optimiser steps of the whole run.
      loss: "tanimoto_weighted" (the authors' contour-weighted dual Tanimoto), "tanimoto"
        (unweighted) or "defu_dice".
      eval_every: validate every this many steps (and at the end).
      eval_batch_size: global batch size of validation (0 = batch_size).
      log_every: write training scalars every this many steps.
      val_metric: the validation metric that picks the best checkpoint and drives early
        stopping ("dice" = mean per-image lung Dice; "loss" is minimised, the rest maximised).
      early_stopping_patience: stop after this many validations without an improvement of
        more than ``early_stopping_min_delta`` (0 = never stop early).
      num_overlays: validation examples shown in the final overlay grid.
      num_devices: devices of the data mesh (0 = all).
      label: free text recorded with the run (e.g. "synthetic phantoms").
    """

    model: ModelConfig = ModelConfig(bn_momentum=0.9)
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    seed: int = 0
    batch_size: int = 8
    num_steps: int = 80
    loss: str = "tanimoto_weighted"
    eval_every: int = 20
    eval_batch_size: int = 0
    log_every: int = 5
    val_metric: str = "dice"
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0
    num_overlays: int = 8
    num_devices: int = 0
    label: str = ""

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.val_metric not in VAL_METRICS:
            raise ValueError(f"val_metric must be one of {VAL_METRICS}, got {self.val_metric!r}")
        for name in ("batch_size", "num_steps", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @property
    def global_eval_batch_size(self) -> int:
        return self.eval_batch_size or self.batch_size

    @property
    def val_mode(self) -> str:
        """'min' for the loss, 'max' for the scores."""
        return "min" if self.val_metric == "loss" else "max"

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=True)


# --------------------------------------------------------------------------- dict / JSON

def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested dataclass -> nested dict of JSON-able values (tuples become lists)."""
    return dataclasses.asdict(cfg)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def from_dict(cls: type, d: dict[str, Any], where: str = "") -> Any:
    """Nested dict -> dataclass ``cls``; unknown keys are an error that names them."""
    if not isinstance(d, dict):
        raise TypeError(f"{where or cls.__name__}: expected a mapping, got {type(d).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where or cls.__name__}: unknown fields {unknown}; known: {sorted(names)}")
    kwargs = {}
    for k, v in d.items():
        tp = hints[k]
        if _is_dataclass_type(tp):
            kwargs[k] = from_dict(tp, v, f"{where}.{k}" if where else k)
        elif isinstance(v, list):
            kwargs[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        else:
            kwargs[k] = v
    return cls(**kwargs)


# --------------------------------------------------------------------------- --set parsing

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def parse_value(text: str, tp: Any, key: str = "") -> Any:
    """Parse ``text`` as a value of type ``tp`` (int, float, bool, str, tuple[...], X | None)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if type(None) in args and text.strip().lower() in ("none", "null", ""):
            return None
        errors = []
        for a in non_none:
            try:
                return parse_value(text, a, key)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError(f"--set {key}={text}: cannot parse as {tp}: {'; '.join(errors)}")
    if origin is tuple:
        s = text.strip()
        if s.startswith(("[", "(")):
            s = s[1:-1]
        items = [p.strip() for p in s.split(",") if p.strip()]
        elem = args[0] if args else str
        return tuple(parse_value(p, elem, key) for p in items)
    if tp is bool:
        t = text.strip().lower()
        if t in _TRUE:
            return True
        if t in _FALSE:
            return False
        raise ValueError(f"--set {key}={text}: expected a boolean (true/false/1/0/yes/no)")
    if tp is int:
        try:
            f = float(text)
        except ValueError:
            raise ValueError(f"--set {key}={text}: expected an integer") from None
        if not f.is_integer():
            raise ValueError(f"--set {key}={text}: expected an integer")
        return int(f)
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--set {key}={text}: expected a number such as 1e-3") from None
    if tp is str:
        return text
    if typing.get_origin(tp) is typing.Literal:
        if text not in args:
            raise ValueError(f"--set {key}={text}: expected one of {args}")
        return text
    raise TypeError(f"--set {key}: fields of type {tp} cannot be set from the command line")


def _apply(cfg: Any, items: list[tuple[list[str], str, str]]) -> Any:
    """Apply (path, text, full key) items to a dataclass with ONE ``replace`` per level, so that
    fields validated together (e.g. kernel_sizes and dilations) may change together."""
    names = {f.name for f in dataclasses.fields(cfg)}
    hints = _hints(type(cfg))
    leaves: dict[str, Any] = {}
    nested: dict[str, list[tuple[list[str], str, str]]] = {}
    for path, text, key in items:
        head, rest = path[0], path[1:]
        if head not in names:
            raise ValueError(f"--set {key}: {type(cfg).__name__} has no field {head!r}; known: {sorted(names)}")
        current = getattr(cfg, head)
        if rest:
            if not dataclasses.is_dataclass(current):
                raise ValueError(f"--set {key}: {head!r} is a {type(current).__name__}, not a nested config")
            nested.setdefault(head, []).append((rest, text, key))
        else:
            if dataclasses.is_dataclass(current):
                raise ValueError(f"--set {key}: {head!r} is a nested config; set one of its fields, e.g. {head}.<field>=...")
            leaves[head] = parse_value(text, hints[head], key)  # later ones win
    changes = dict(leaves)
    for head, sub in nested.items():
        changes[head] = _apply(getattr(cfg, head), sub)
    try:
        return dataclasses.replace(cfg, **changes)
    except (ValueError, TypeError) as e:
        keys = ", ".join(k for _, _, k in items)
        raise ValueError(f"--set {keys}: {e}") from e


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Apply ``key=value`` strings (dotted keys into nested configs; later ones win) and
    validate the result once."""
    items = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected key=value, e.g. --set optim.learning_rate=3e-4")
        key = key.strip()
        items.append((key.split("."), text.strip(), key))
    return _apply(cfg, items) if items else cfg


# --------------------------------------------------------------------------- files

def load_config(path: str | pathlib.Path | None) -> TrainConfig:
    """Read a config: a Python file (``config`` or ``get_config()``), a run's JSON, or defaults."""
    if path is None:
        return TrainConfig()
    path = pathlib.Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found (pass a configs/*.py file or a run's config.json)")
    if path.suffix == ".json":
        try:
            return from_dict(TrainConfig, json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a valid TrainConfig JSON: {e}") from e
    if path.suffix != ".py":
        raise ValueError(f"{path}: a config must be a .py file (defining `config` or `get_config()`) or a .json file")
    spec = importlib.util.spec_from_file_location(f"crnet_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if hasattr(module, "get_config"):
        cfg = module.get_config()
    elif hasattr(module, "config"):
        cfg = module.config
    else:
        raise ValueError(f"{path}: defines neither `config = TrainConfig(...)` nor `def get_config() -> TrainConfig`")
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"{path}: the config must be a crnet_jax.train_config.TrainConfig, got {type(cfg).__name__}")
    return cfg


def save_config(cfg: TrainConfig, path: str | pathlib.Path) -> pathlib.Path:
    """Write the resolved config as JSON (NaN/inf allowed as in Python's json)."""
    path = pathlib.Path(path)
    path.write_text(cfg.to_json() + "\n")
    return path
