"""Pointwise (1 x 1) convolution: the C++ kernel against a float64 NumPy reference in value
and in the input, kernel and bias gradients (wide and narrow outputs), batch sharding,
and errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crnet_jax import _ffi
from crnet_jax.pointwise import pointwise_conv2d

needs_ffi = pytest.mark.skipif(not _ffi.available(), reason="C++ FFI extension not built")


def _np_pointwise(x, w, b, ct):
    x, w, b, ct = (np.asarray(a, np.float64) for a in (x, w, b, ct))
    return x @ w + b, ct @ w.T, np.einsum("bhwc,bhwo->co", x, ct), ct.sum(axis=(0, 1, 2))


@pytest.mark.parametrize("impl", [pytest.param("ffi", marks=needs_ffi), "xla"])
@pytest.mark.parametrize(
    "shape,cout",
    [((2, 7, 9, 48), 48), ((1, 5, 6, 48), 2), ((3, 4, 5, 1), 48), ((2, 3, 7, 20), 5), ((1, 40, 70, 16), 16)],
    ids=["48-48", "head-48-2", "stem-1-48", "odd-20-5", "multi-unit"],
)
def test_matches_numpy(impl, shape, cout):
    rng = np.random.default_rng(sum(shape) + cout)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((shape[-1], cout)).astype(np.float32)
    b = rng.standard_normal((cout,)).astype(np.float32)
    ct = rng.standard_normal((*shape[:3], cout)).astype(np.float32)

    def run(x, w, b):
        y, vjp = jax.vjp(lambda x, w, b: pointwise_conv2d(x, w, b, impl), x, w, b)
        return (y,) + vjp(ct)

    got = jax.jit(run)(x, w, b)
    for name, g, want in zip(["y", "dx", "dw", "db"], got, _np_pointwise(x, w, b, ct)):
        np.testing.assert_allclose(np.asarray(g, np.float64), want, atol=2e-5 * (np.abs(want).max() + 1), err_msg=name)


@needs_ffi
def test_batch_sharded_equals_single_device():
    """Under a batch-sharded jit (data parallelism) the kernel runs per device and the
    weight gradients are summed over devices."""
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("needs several (forced) CPU devices")
    mesh = jax.make_mesh((len(devices),), ("data",))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2 * len(devices), 6, 5, 48)).astype(np.float32)
    w, b = rng.standard_normal((48, 48)).astype(np.float32), rng.standard_normal((48,)).astype(np.float32)

    def loss(x, w, b):
        return jnp.sum(jnp.sin(pointwise_conv2d(x, w, b, "ffi")))

    want = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w, b)
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(sharded, w, b)
    for g, e in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5)


def test_bad_shapes():
    with pytest.raises(ValueError, match="kernel"):
        pointwise_conv2d(jnp.zeros((1, 2, 2, 3)), jnp.zeros((4, 2)), None, "xla")
