"""The optax optimiser of a run: Adam (the authors' 1e-3), a learning-rate schedule, optional
gradient clipping and reduce-on-plateau.

Every transformation is an ``optax.GradientTransformationExtraArgs``: the train step calls
``tx.update(grads, opt_state, params, value=loss)``; only reduce-on-plateau reads ``value``.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
import optax.contrib

from crnet_jax.train_config import OptimConfig


def learning_rate_schedule(cfg: OptimConfig, num_steps: int) -> optax.Schedule:
    """Step -> learning rate before any reduce-on-plateau scaling.

    constant / plateau: ``learning_rate`` after an optional linear warm-up; cosine: warm-up then
    cosine decay to ``min_lr_ratio * learning_rate`` at ``num_steps``.
    """
    lr = cfg.learning_rate
    if cfg.schedule == "cosine":
        warmup = min(cfg.warmup_steps, max(num_steps - 1, 0))
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup,
            decay_steps=max(num_steps, warmup + 1), end_value=lr * cfg.min_lr_ratio)
    if cfg.warmup_steps > 0:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, cfg.warmup_steps), optax.constant_schedule(lr)], [cfg.warmup_steps])
    return optax.constant_schedule(lr)


def make_optimizer(cfg: OptimConfig, num_steps: int) -> optax.GradientTransformationExtraArgs:
    """clip (optional) -> Adam / AdamW with the schedule -> reduce-on-plateau (optional)."""
    schedule = learning_rate_schedule(cfg, num_steps)
    parts = []
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    if cfg.weight_decay > 0:
        parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    else:
        parts.append(optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    if cfg.schedule == "plateau":
        parts.append(optax.contrib.reduce_on_plateau(
            factor=cfg.plateau_factor, patience=cfg.plateau_patience, rtol=cfg.plateau_rtol,
            cooldown=cfg.plateau_cooldown, accumulation_size=cfg.plateau_accumulation,
            min_scale=cfg.plateau_min_scale))
    return optax.with_extra_args_support(optax.chain(*parts))


def plateau_scale(opt_state: optax.OptState) -> jax.Array:
    """The reduce-on-plateau factor in ``opt_state`` (1.0 when there is none)."""
    found = [s.scale for s in jax.tree.leaves(opt_state, is_leaf=_is_plateau_state) if _is_plateau_state(s)]
    return jnp.asarray(found[0], jnp.float32) if found else jnp.float32(1.0)


def _is_plateau_state(x: object) -> bool:
    return isinstance(x, optax.contrib.ReduceLROnPlateauState)


def current_learning_rate(cfg: OptimConfig, num_steps: int) -> Callable[[jax.Array, optax.OptState], jax.Array]:
    """(step, opt_state) -> effective learning rate of that step (schedule x plateau scale)."""
    schedule = learning_rate_schedule(cfg, num_steps)
    return lambda step, opt_state: jnp.asarray(schedule(step), jnp.float32) * plateau_scale(opt_state)
