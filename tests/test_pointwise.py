"""pointwise_conv: a 1 x 1 convolution whose backward is one C++ pass (the head's)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crnet_jax import _ffi
from crnet_jax.pointwise import pointwise_conv
from isa_helpers import use_isa

needs_ffi = pytest.mark.skipif(not _ffi.available(), reason=f"C++ kernels not built: {_ffi.unavailable_reason()}")


def _inputs(seed, shape, c, l):
    r = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)  # noqa: E731
    return (1.5 * f(*shape, c) + 0.5, 0.3 * f(c, l), f(l)), f(*shape, l)


def _reference(x, kernel, bias):
    return jnp.einsum("...c,cl->...l", x, kernel, precision="highest") + bias


def _close(got, want, rtol, what):
    scale = float(jnp.max(jnp.abs(want))) + 1e-6
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want))) / scale
    assert err < rtol, f"{what}: max error {err:.2e} of the largest value"


def _check(impl, shape, c, l, rtol=1e-5):
    args, ct = _inputs(hash((shape, c, l)) % 1000, shape, c, l)
    _close(jax.jit(lambda *a: pointwise_conv(*a, impl))(*args), _reference(*args), rtol, "y")
    # a nonlinear loss, so the cotangent reaching the convolution depends on its output
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)) * ct)  # noqa: E731
    got = jax.jit(jax.grad(loss(lambda *a: pointwise_conv(*a, impl)), argnums=(0, 1, 2)))(*args)
    want = jax.grad(loss(_reference), argnums=(0, 1, 2))(*args)
    for g, w, what in zip(got, want, ["dx", "dkernel", "dbias"]):
        assert g.shape == w.shape and g.dtype == w.dtype, what
        _close(g, w, rtol * 20, what)


@pytest.mark.parametrize("impl", ["xla", pytest.param("ffi", marks=needs_ffi)])
@pytest.mark.parametrize("shape,c,l", [((3, 9, 10), 48, 2), ((1, 17, 13), 48, 2), ((2, 5, 6), 16, 1),
                                       ((2, 7, 5), 64, 4), ((3, 4, 5), 5, 7), ((1, 3, 4), 48, 48)])
def test_values_and_gradients_match_autodiff(impl, shape, c, l):
    """Value and the gradients in x, kernel and bias equal JAX's autodiff of the einsum,
    for the register-blocked widths (C a multiple of the vector length, L <= 4) and the
    plain loops (others)."""
    _check(impl, shape, c, l)


@needs_ffi
@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_ffi_other_instruction_sets(isa, monkeypatch):
    """The kernels compiled for 4 and 8 float lanes per vector (AVX-512 is the default here)."""
    use_isa(isa, monkeypatch)
    for case in [((3, 9, 10), 48, 2), ((2, 7, 5), 64, 4), ((3, 4, 5), 5, 7)]:
        _check("ffi", *case)


@needs_ffi
def test_ffi_backward_is_one_kernel_pass():
    """The step's backward of the convolution is the C++ target, and no XLA product over x."""
    args, ct = _inputs(5, (2, 8, 9), 48, 2)
    f = jax.jit(jax.grad(lambda *a: jnp.sum(pointwise_conv(*a, "ffi") * ct), argnums=(0, 1, 2)))
    hlo = f.lower(*args).compile().as_text()
    assert hlo.count('custom_call_target="crnet_pointwise_bwd"') == 1
    assert " dot(" not in hlo.split("ENTRY")[1]  # the forward's product is dead in a pure backward


def test_bfloat16_and_empty_use_xla():
    """bfloat16 (and empty batches) take XLA's products: values close to float32."""
    args, ct = _inputs(9, (2, 6, 7), 48, 2)
    x16 = args[0].astype(jnp.bfloat16)
    y = pointwise_conv(x16, *args[1:], "ffi")
    assert y.dtype == jnp.bfloat16
    _close(y, _reference(*args), 2e-2, "bfloat16 y")
    dx = jax.grad(lambda x: jnp.sum(pointwise_conv(x, *args[1:], "ffi").astype(jnp.float32) * ct))(x16)
    assert dx.dtype == jnp.bfloat16
    assert pointwise_conv(jnp.zeros((0, 4, 4, 48)), *args[1:], "ffi").shape == (0, 4, 4, 2)


@needs_ffi
def test_ffi_under_vmap_and_batch_sharded():
    """Mapped over a leading axis (kernel shared or mapped), and batch-sharded over several
    devices (each device runs the kernel on its images, the sums are added over devices,
    nothing is all-gathered)."""
    args, ct = _inputs(7, (2, 6, 7), 48, 2)
    xs = jnp.stack([args[0], 0.5 * args[0] - 1.0])
    ks = jnp.stack([args[1], -args[1]])

    def grads(impl, in_axes):
        def f(x, k):
            return jax.grad(lambda x, k: jnp.sum(jnp.sin(pointwise_conv(x, k, args[2], impl)) * ct), argnums=(0, 1))(x, k)

        return jax.jit(jax.vmap(f, in_axes=in_axes))(xs, ks if in_axes[1] == 0 else args[1])

    for in_axes in [(0, None), (0, 0)]:
        for g, w in zip(grads("ffi", in_axes), grads("xla", in_axes)):
            _close(g, w, 2e-4, f"vmapped gradient {in_axes}")

    n = min(jax.device_count(), 4)
    if n < 2:
        pytest.skip("needs several devices (conftest sets --xla_force_host_platform_device_count=4)")
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    data = NamedSharding(mesh, P("data"))
    args, ct = _inputs(11, (2 * n, 8, 9), 48, 2)
    ct = jax.device_put(ct, data)
    grad = lambda impl: jax.grad(lambda *a: jnp.sum(jnp.sin(pointwise_conv(*a, impl)) * ct), argnums=(0, 1, 2))  # noqa: E731
    sharded = jax.jit(grad("ffi"), in_shardings=(data, None, None))
    x = jax.device_put(args[0], data)
    for g, w in zip(sharded(x, *args[1:]), grad("xla")(*args)):
        _close(g, w, 2e-4, "sharded gradient")
    hlo = sharded.lower(x, *args[1:]).compile().as_text()
    assert "all-gather(" not in hlo and "crnet_pointwise_bwd" in hlo


def test_bad_shapes():
    (x, k, b), _ = _inputs(13, (1, 4, 4), 6, 5)
    with pytest.raises(ValueError, match="kernel must be"):
        pointwise_conv(x, k.T, b)
    with pytest.raises(ValueError, match="kernel must be"):
        pointwise_conv(x, k, b[:2])
