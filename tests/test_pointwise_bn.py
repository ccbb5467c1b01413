"""pointwise_batch_norm: BatchNorm(x @ W + b) on batch statistics whose backward needs
neither the convolution's output nor a recomputation of it."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crnet_jax import _ffi
from crnet_jax.pointwise_bn import pointwise_batch_norm
from isa_helpers import use_isa

needs_ffi = pytest.mark.skipif(not _ffi.available(), reason=f"C++ kernels not built: {_ffi.unavailable_reason()}")
IMPLS = ["xla", pytest.param("ffi", marks=needs_ffi)]


def _reference(x, kernel, bias, gamma, beta, eps):
    """Layer by layer, differentiated by JAX: what the custom backward must equal."""
    y = jnp.einsum("...c,cl->...l", x, kernel, precision="highest") + bias
    axes = tuple(range(y.ndim - 1))
    mean, mean_sq = jnp.mean(y, axes), jnp.mean(y * y, axes)
    var = jnp.maximum(0.0, mean_sq - mean * mean)
    scale = gamma * jax.lax.rsqrt(var + eps)
    return y * scale + beta - mean * scale, mean, var


def _inputs(seed, shape, c, l):
    r = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)  # noqa: E731
    x = 1.5 * f(*shape, c) + 0.5  # off-centre, as activations are
    return (x, 0.3 * f(c, l), f(l), 1.0 + 0.2 * f(l), f(l)), (f(*shape, l), f(l), f(l))


def _loss(fn, cts):
    ct_out, ct_mean, ct_var = cts

    def loss(*args):
        out, mean, var = fn(*args)
        return jnp.sum(out * ct_out) + jnp.sum(mean * ct_mean) + jnp.sum(var * ct_var)

    return loss


def _close(got, want, rtol, what, scale=None):
    """Max error within rtol of the largest reference value (or of `scale`)."""
    scale = (float(jnp.max(jnp.abs(want))) if scale is None else scale) + 1e-6
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want))) / scale
    assert err < rtol, f"{what}: max error {err:.2e} of the largest value"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,c,l", [((3, 9, 10), 48, 48), ((1, 8, 7), 1, 48), ((3, 5, 6), 5, 7),
                                       ((2, 33, 31), 48, 48)])
def test_values_and_gradients_match_autodiff(impl, shape, c, l):
    """out, mean, var and the gradients in x, kernel, bias, gamma, beta (cotangents on all
    three outputs) equal JAX's autodiff of the layer-by-layer formulation."""
    args, cts = _inputs(hash((shape, c, l)) % 1000, shape, c, l)
    fn = lambda *a: pointwise_batch_norm(*a, 1e-3, impl)  # noqa: E731
    ref = lambda *a: _reference(*a, 1e-3)  # noqa: E731
    for got, want, what in zip(jax.jit(fn)(*args), ref(*args), ["out", "mean", "var"]):
        _close(got, want, 5e-5, what)
    got = jax.jit(jax.grad(_loss(fn, cts), argnums=range(5)))(*args)
    want = jax.grad(_loss(ref, cts), argnums=range(5))(*args)
    for g, w, what in zip(got, want, ["dx", "dkernel", "dbias", "dgamma", "dbeta"]):
        # dbias is a sum of cancelling terms (BatchNorm removes the bias but for the mean
        # output): its error is measured on the scale of the kernel's gradient
        _close(g, w, 2e-4, what, float(jnp.max(jnp.abs(want[1]))) if what == "dbias" else None)


@needs_ffi
@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_ffi_other_instruction_sets(isa, monkeypatch):
    """The kernels compiled for 4 and 8 float lanes per vector (AVX-512 is the default here)."""
    use_isa(isa, monkeypatch)
    for case in [((3, 9, 10), 48, 48), ((1, 8, 7), 1, 48), ((3, 5, 6), 5, 7)]:
        test_values_and_gradients_match_autodiff("ffi", *case)


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_keeps_only_x(impl):
    """The point of the op: its VJP holds x and per-channel vectors, never a tensor the size
    of the output (so a block does not keep its shortcut's output, nor recompute it)."""
    args, cts = _inputs(3, (2, 12, 11), 48, 48)
    _, vjp = jax.vjp(lambda *a: pointwise_batch_norm(*a, 1e-3, impl), *args)
    big = [leaf.shape for leaf in jax.tree.leaves(vjp) if getattr(leaf, "size", 0) > 48 * 48]
    assert big == [args[0].shape], big
    grads = vjp(cts)
    assert [g.shape for g in grads] == [a.shape for a in args]


@pytest.mark.parametrize("impl", IMPLS)
def test_computed_convolution_gives_the_same_values_and_gradients(impl):
    """computed=(y, E[y], E[y^2]) from the caller (a block's fan-out): the same outputs and
    the same, whole, gradients; gradients through the given values are ignored."""
    args, cts = _inputs(17, (2, 7, 6), 48, 48)

    def given(x, kernel, bias, gamma, beta):
        y = jnp.einsum("...c,cl->...l", x, kernel, precision="highest") + bias
        moments = (jnp.mean(y, (0, 1, 2)), jnp.mean(y * y, (0, 1, 2)))
        return pointwise_batch_norm(x, kernel, bias, gamma, beta, 1e-3, impl, computed=(y, *moments))

    plain = lambda *a: pointwise_batch_norm(*a, 1e-3, impl)  # noqa: E731
    for got, want, what in zip(given(*args), plain(*args), ["out", "mean", "var"]):
        _close(got, want, 1e-5, what)
    got = jax.jit(jax.grad(_loss(given, cts), argnums=range(5)))(*args)
    want = jax.grad(_loss(plain, cts), argnums=range(5))(*args)
    for g, w, what in zip(got, want, ["dx", "dkernel", "dbias", "dgamma", "dbeta"]):
        _close(g, w, 2e-4, what, float(jnp.max(jnp.abs(want[1]))) if what == "dbias" else None)
    with pytest.raises(ValueError, match="computed"):
        pointwise_batch_norm(*args, 1e-3, impl, computed=(args[0][..., :10], args[2], args[2]))


@pytest.mark.parametrize("impl", IMPLS)
def test_deferred_scale_and_shift(impl):
    """deferred=True: (y, mean, var, scale, shift) with scale * y + shift the output, and y's
    cotangent taken as the output's: a loss on y differentiates as the same loss on the
    output (so a caller that forms the output where it reads y keeps the whole gradient);
    scale and shift carry none."""
    args, cts = _inputs(19, (2, 7, 6), 48, 48)
    y, mean, var, scale, shift = pointwise_batch_norm(*args, 1e-3, impl, deferred=True)
    out, mean0, var0 = pointwise_batch_norm(*args, 1e-3, impl)
    _close(y * scale + shift, out, 1e-5, "out")
    _close(mean, mean0, 1e-6, "mean")
    _close(var, var0, 1e-6, "var")

    def deferred(*a):
        y, mean, var, scale, shift = pointwise_batch_norm(*a, 1e-3, impl, deferred=True)
        return y + 0.0 * (scale + shift), mean, var  # scale, shift used: no gradient through them

    got = jax.jit(jax.grad(_loss(deferred, cts), argnums=range(5)))(*args)
    want = jax.grad(_loss(lambda *a: pointwise_batch_norm(*a, 1e-3, impl), cts), argnums=range(5))(*args)
    for g, w, what in zip(got, want, ["dx", "dkernel", "dbias", "dgamma", "dbeta"]):
        _close(g, w, 1e-5, what)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16(impl):
    """bfloat16 x, kernel and bias (the compute dtype of a bfloat16 model): out in bfloat16,
    moments and gradients within bfloat16 rounding of the float32 reference."""
    args, cts = _inputs(5, (2, 9, 8), 48, 48)
    bf = [a.astype(jnp.bfloat16) for a in args[:3]] + list(args[3:])
    fn = lambda *a: pointwise_batch_norm(*a, 1e-3, impl)  # noqa: E731
    out, mean, var = jax.jit(fn)(*bf)
    assert out.dtype == jnp.bfloat16 and mean.dtype == var.dtype == jnp.float32
    want = _reference(*[a.astype(jnp.float32) for a in bf], 1e-3)
    for got, w, what in zip((out, mean, var), want, ["out", "mean", "var"]):
        _close(got, w, 2e-2, what)
    got = jax.grad(_loss(fn, cts), argnums=(0, 1, 3))(*bf)
    want = jax.grad(_loss(lambda *a: _reference(*a, 1e-3), cts), argnums=(0, 1, 3))(
        *[a.astype(jnp.float32) for a in bf])
    for g, w, what in zip(got, want, ["dx", "dkernel", "dgamma"]):
        _close(g, w, 5e-2, what)


@needs_ffi
def test_ffi_under_vmap_is_per_element():
    """Mapped over a leading axis, the statistics (and so the gradients) are each element's."""
    args, cts = _inputs(7, (2, 6, 7), 48, 48)
    xs = jnp.stack([args[0], 0.5 * args[0] - 1.0])
    ct_out = jnp.stack([cts[0], -cts[0]])

    def per_element(impl):
        def f(x, ct):
            return jax.grad(_loss(lambda x: pointwise_batch_norm(x, *args[1:], 1e-3, impl), (ct, *cts[1:])))(x)

        return jax.jit(jax.vmap(f))(xs, ct_out)

    got, want = per_element("ffi"), per_element("xla")
    assert got.shape == xs.shape
    _close(got, want, 1e-4, "vmapped dx")


@needs_ffi
def test_ffi_batch_sharded():
    """Batch-sharded over several devices: each device runs the kernels on its images, the
    backward's sums are added over devices, and nothing is all-gathered."""
    n = min(jax.device_count(), 4)
    if n < 2:
        pytest.skip("needs several devices (conftest sets --xla_force_host_platform_device_count=4)")
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    data = NamedSharding(mesh, P("data"))
    args, cts = _inputs(11, (2 * n, 8, 9), 48, 48)
    grad = lambda impl: jax.grad(_loss(lambda *a: pointwise_batch_norm(*a, 1e-3, impl), cts), argnums=range(5))  # noqa: E731
    sharded = jax.jit(grad("ffi"), in_shardings=(data,) + (None,) * 4)
    x = jax.device_put(args[0], data)
    for g, w in zip(sharded(x, *args[1:]), grad("xla")(*args)):
        _close(g, w, 2e-4, "sharded gradient")
    hlo = sharded.lower(x, *args[1:]).compile().as_text()
    assert "all-gather(" not in hlo and "crnet_pointwise_bn_sums" in hlo


def test_bad_shapes():
    args, _ = _inputs(13, (1, 4, 4), 6, 5)
    x, k, b, g, be = args
    with pytest.raises(ValueError, match="kernel must be"):
        pointwise_batch_norm(x, k.T, b, g, be, 1e-3)
    with pytest.raises(ValueError, match="gamma and beta"):
        pointwise_batch_norm(x, k, b, g[:3], be, 1e-3)
