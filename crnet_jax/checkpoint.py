"""Save and restore a trained model: `config.json` plus an Orbax checkpoint of its Params and
BatchNorm statistics. (Training checkpoints with optimizer state live in the training loop.)"""
from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import jax
from flax import nnx

from crnet_jax.config import ModelConfig

CONFIG_FILE = "config.json"
STATE_DIR = "state"


def model_state(model: nnx.Module) -> dict[str, Any]:
    """The model's Params and BatchStats as a nested dict of arrays."""
    return nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat)))


def save_model(model: nnx.Module, directory: str | pathlib.Path, *, overwrite: bool = False) -> pathlib.Path:
    """Write `directory/config.json` and `directory/state` (Orbax). Returns the absolute directory."""
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    if directory.exists():
        if not overwrite:
            raise FileExistsError(f"{directory} already exists; pass overwrite=True (CLI: --force) to replace it")
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    (directory / CONFIG_FILE).write_text(model.cfg.to_json())
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / STATE_DIR, model_state(model))
        ckptr.wait_until_finished()
    return directory


def read_config(directory: str | pathlib.Path) -> ModelConfig:
    path = pathlib.Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {directory} is not a crnet_jax model directory (expected {CONFIG_FILE} and {STATE_DIR}/)")
    return ModelConfig.from_dict(json.loads(path.read_text()))


def load_model(directory: str | pathlib.Path, **config_changes: Any) -> nnx.Module:
    """Restore a model written by `save_model`, in inference mode.

    `config_changes` override non-structural settings (dtype, depthwise_impl, remat).
    """
    import orbax.checkpoint as ocp

    from crnet_jax.model import ResCRNet

    directory = pathlib.Path(directory).absolute()
    cfg = read_config(directory).replace(**config_changes)
    model = ResCRNet(cfg, rngs=nnx.Rngs(0))
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, model_state(model))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(directory / STATE_DIR, target)
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    model.eval()
    return model
