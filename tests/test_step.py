"""The pure train step over a data mesh: 4 devices == 1 device, donation, determinism,
NaN detection; the optimiser schedules."""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from crnet_jax import distributed
from crnet_jax import optimizer as optim_lib
from crnet_jax import step as step_lib
from crnet_jax.augment import AugmentConfig
from crnet_jax.config import ModelConfig
from crnet_jax.train_config import OptimConfig

TINY = ModelConfig(num_conv_res=1, filters=4, dropout_rate=0.2)
# Adam divides the gradient by its running RMS: for parameters whose true gradient is ~0 (the
# biases before a BatchNorm) float32 rounding noise would become full-size steps. A larger
# epsilon keeps the comparison about the sharding, not about amplified rounding noise.
OPT = OptimConfig(learning_rate=1e-3, eps=1e-3)


def _batch(b=8, h=32, w=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((b, h, w, 1)).astype(np.float32)
    lung = (rng.random((b, h, w)) > 0.5).astype(np.float32)
    return {"image": x, "mask": np.stack([lung, 1 - lung], -1)}


@functools.lru_cache(maxsize=None)
def _model(model_cfg):
    return step_lib.split_model(step_lib.create_model(model_cfg, 0))


def _setup(n_devices, *, opt=OPT, augment=None, model_cfg=TINY, num_steps=10):
    model_def, params, batch_stats = _model(model_cfg)
    tx = optim_lib.make_optimizer(opt, num_steps)
    mesh = distributed.data_mesh(n_devices)
    steps = step_lib.compile_steps(mesh, model_def, tx, loss_name="tanimoto_weighted", augment_cfg=augment, seed=0,
                                   lr_fn=optim_lib.current_learning_rate(opt, num_steps))
    state = step_lib.replicate(step_lib.init_train_state(params, batch_stats, tx, 0), mesh)
    return mesh, steps, state


def _train(n_devices, n_steps=2, **kw):
    mesh, steps, state = _setup(n_devices, **kw)
    metrics = []
    for i in range(n_steps):
        batch = distributed.global_batch(mesh, _batch(seed=i), 8)
        state, m = steps.train(state, batch)
        metrics.append(m)
    ev = steps.evaluate(state.params, state.batch_stats, distributed.global_batch(mesh, _batch(seed=9), 8))
    return jax.device_get((state, metrics, ev))


def test_four_devices_equal_one_device_on_the_same_global_batch():
    assert jax.device_count() >= 4, "tests/conftest.py forces 4 CPU devices"
    aug = AugmentConfig()
    s1, m1, e1 = _train(1, augment=aug)
    s4, m4, e4 = _train(4, augment=aug)
    chex.assert_trees_all_close(m1, m4, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(s1.params, s4.params, rtol=1e-5, atol=1e-6)
    # BatchNorm statistics are those of the GLOBAL batch, not of each device's quarter.
    chex.assert_trees_all_close(s1.batch_stats, s4.batch_stats, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(s1.opt_state, s4.opt_state, rtol=1e-4, atol=1e-7)
    chex.assert_trees_all_close(e1, e4, rtol=1e-5, atol=1e-5)
    assert int(s4.step) == 2


def test_batch_is_sharded_state_replicated_and_donated():
    mesh, steps, state = _setup(4)
    batch = distributed.global_batch(mesh, _batch(), 8)
    assert batch["image"].sharding.spec == jax.sharding.PartitionSpec("data")
    assert {s.data.shape[0] for s in batch["image"].addressable_shards} == {2}
    old = jax.tree.leaves(state.params)[0]
    new, _ = steps.train(state, batch)
    assert old.is_deleted(), "the state buffers are donated to the step"
    leaf = jax.tree.leaves(new.params)[0]
    assert leaf.sharding.is_fully_replicated


def test_randomness_comes_from_seed_and_step_only():
    mesh, steps, state = _setup(1, augment=AugmentConfig())
    host = jax.device_get(state)
    batch = distributed.global_batch(mesh, _batch(), 8)
    a, ma = steps.train(step_lib.replicate(host, mesh), batch)
    b, mb = steps.train(step_lib.replicate(host, mesh), batch)
    chex.assert_trees_all_equal(jax.device_get(a.params), jax.device_get(b.params))
    # another step number draws other dropout masks and augmentations
    c, mc = steps.train(step_lib.replicate(host.replace(step=jnp.int32(5)), mesh), batch)
    assert float(mc["loss"]) != float(ma["loss"])


def test_nan_learning_rate_is_flagged():
    mesh, steps, state = _setup(1, opt=OptimConfig(learning_rate=float("nan")))
    batch = distributed.global_batch(mesh, _batch(), 8)
    state, m = steps.train(state, batch)
    assert float(m["finite"]) == 0.0  # the new parameters are NaN although this loss was finite
    state, m = steps.train(state, batch)
    assert not np.isfinite(float(m["loss"]))


def test_bfloat16_compute_keeps_float32_parameters():
    mesh, steps, state = _setup(1, model_cfg=TINY.replace(dtype="bfloat16"))
    state, m = steps.train(state, distributed.global_batch(mesh, _batch(), 8))
    assert np.isfinite(float(m["loss"]))
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}


@pytest.mark.slow
def test_a_network_with_an_lstm_block_trains():
    mesh, steps, state = _setup(1, model_cfg=TINY.replace(num_lstm_res=1))
    state, m = steps.train(state, distributed.global_batch(mesh, _batch(), 8))
    assert np.isfinite(float(m["loss"])) and float(m["finite"]) == 1.0


def test_schedules():
    cos = optim_lib.learning_rate_schedule(OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1), 100)
    assert float(cos(0)) == 0.0 and float(cos(10)) == pytest.approx(1e-3) and float(cos(100)) == pytest.approx(1e-4)
    const = optim_lib.learning_rate_schedule(OptimConfig(), 100)
    assert float(const(0)) == float(const(99)) == pytest.approx(1e-3)


def test_reduce_on_plateau_lowers_the_rate_when_the_loss_stalls():
    cfg = OptimConfig(schedule="plateau", plateau_patience=2, plateau_accumulation=2, plateau_factor=0.5)
    tx = optim_lib.make_optimizer(cfg, 100)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    lr = optim_lib.current_learning_rate(cfg, 100)
    assert float(lr(0, state)) == pytest.approx(1e-3)
    for _ in range(12):
        _, state = tx.update({"w": jnp.ones(3)}, state, params, value=jnp.float32(1.0))
    assert float(lr(12, state)) < 1e-3


def test_gradient_clipping():
    cfg = OptimConfig(clip_norm=1e-6, learning_rate=1.0, b1=0.0, b2=0.0, eps=0.0)
    tx = optim_lib.make_optimizer(cfg, 10)
    params = {"w": jnp.zeros(2)}
    # with Adam the step size is lr whatever the norm; check the clip is in the chain instead
    updates, _ = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params, value=jnp.float32(0.0))
    assert np.all(np.isfinite(np.asarray(updates["w"])))
    clipped = optax.clip_by_global_norm(1e-6).update({"w": jnp.array([3.0, 4.0])}, None)[0]
    assert float(optax.tree.norm(clipped)) == pytest.approx(1e-6, rel=1e-3)
