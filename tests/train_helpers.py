"""A tiny training configuration for the tests (seconds per run on a CPU)."""
from __future__ import annotations

from crnet_jax.config import ModelConfig
from crnet_jax.train_config import CheckpointConfig, DataConfig, OptimConfig, TrainConfig


def multiprocess_config() -> TrainConfig:
    """The tiny run over all devices with the pure-JAX depthwise kernels (what several CPU
    processes use) and a large Adam epsilon (so float rounding in parameters whose gradient is
    ~0 is not amplified into full-size steps): one process and two give the same numbers."""
    cfg = tiny_config(num_devices=0)
    return cfg.replace(model=cfg.model.replace(depthwise_impl="shift"), optim=OptimConfig(eps=1e-3))


def tiny_config(**changes) -> TrainConfig:
    """1 CONV RES block of 4 filters per branch, 32 x 32 phantoms, batch 4, 4 steps, one device."""
    base = TrainConfig(
        model=ModelConfig(num_conv_res=1, filters=4, bn_momentum=0.9, dropout_rate=0.2),
        data=DataConfig(source="phantom", height=32, width=32, num_train=12, num_val=4, augment=True, prefetch=1),
        checkpoint=CheckpointConfig(every=0, keep=2, asynchronous=True),
        batch_size=4, num_steps=4, eval_every=2, log_every=1, num_devices=1, num_overlays=2,
    )
    return base.replace(**changes)


TINY_SETS = [
    "model.num_conv_res=1", "model.filters=4", "model.bn_momentum=0.9", "model.dropout_rate=0.2",
    "data.height=32", "data.width=32", "data.num_train=12", "data.num_val=4", "data.augment=true",
    "data.prefetch=1", "batch_size=4", "log_every=1", "num_devices=1", "num_overlays=2",
]
"""The same tiny run as ``--set`` arguments (add num_steps, eval_every, checkpoint.*)."""
