"""A 1 x 1 convolution y = x @ kernel + bias whose backward is one pass over x.

Differentiated by XLA, the backward of a convolution with few output channels (the head:
48 -> 2) is two products over the whole input, each a full pass over it at a fraction of
the memory bandwidth: the input gradient g @ kernel^T (a (B, H, W, C) result from a
contraction over 2) and the kernel gradient x^T g (a (C, 2) result from a contraction over
every pixel). With the C++ kernels (impl "ffi", float32) one pass reads x and g once and
writes dx, summing x^T g and g on the way (`crnet_pointwise_bwd`). The forward stays an
XLA product. Values equal the XLA composition up to summation order.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from crnet_jax import _ffi
from crnet_jax.depthwise import _batch_partitioned, _isa_code, default_implementation

f32 = jnp.float32


def _grads_xla(x, g, kernel):
    """(g @ kernel^T, x^T g, sum g) in float32."""
    hi = jax.lax.Precision.HIGHEST
    xf, gf = x.astype(f32), g.astype(f32)
    axes = tuple(range(x.ndim - 1))
    dx = jnp.einsum("...l,cl->...c", gf, kernel.astype(f32), precision=hi)
    return dx, jnp.einsum("...c,...l->cl", xf, gf, precision=hi), jnp.sum(gf, axes)


@functools.lru_cache(maxsize=None)
def _ffi_bwd_op(isa: int, threads: int):
    """custom_vmap-wrapped, batch-partitioned `crnet_pointwise_bwd`: (x, g, kT) ->
    (dx, x^T g, sum g)."""
    attrs = dict(isa=np.int64(isa), threads=np.int64(threads))

    def raw(x, g, kt):
        c, l = x.shape[-1], g.shape[-1]
        shapes = (jax.ShapeDtypeStruct(x.shape, f32), jax.ShapeDtypeStruct((c, l), f32),
                  jax.ShapeDtypeStruct((l,), f32))
        return tuple(jax.ffi.ffi_call("crnet_pointwise_bwd", shapes)(x, g, kt, **attrs))

    partitioned = _batch_partitioned(raw, "bbv", "brr", "n h w c, n h w l, l c -> n h w c, c l, l",
                                     weight_groups=False)

    @jax.custom_batching.custom_vmap
    def op(x, g, kt):
        return tuple(partitioned(x, g, kt))

    @op.def_vmap
    def _rule(axis_size, in_batched, x, g, kt):  # per mapped element, by XLA
        axes = tuple(0 if b else None for b in in_batched)
        return jax.vmap(lambda x, g, kt: _grads_xla(x, g, kt.T), in_axes=axes)(x, g, kt), (True, True, True)

    return op


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _pointwise(x, kernel, bias, use_ffi: bool):
    y = jnp.einsum("...c,cl->...l", x, kernel.astype(x.dtype))
    return y + bias.astype(x.dtype)


def _pointwise_fwd(x, kernel, bias, use_ffi):
    return _pointwise(x, kernel, bias, use_ffi), (x, kernel, bias)


def _pointwise_bwd(use_ffi, res, g):
    x, kernel, bias = res
    if use_ffi:
        dx, xg, gs = _ffi_bwd_op(_isa_code(None), 0)(x, g.astype(f32), kernel.astype(f32).T)
    else:
        dx, xg, gs = _grads_xla(x, g, kernel)
    return dx.astype(x.dtype), xg.astype(kernel.dtype), gs.astype(bias.dtype)


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


def pointwise_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, impl: str = "auto") -> jax.Array:
    """x (..., C) @ kernel (C, L) + bias (L,) in x.dtype (kernel and bias cast to it).

    impl "ffi" (or "auto" where the C++ kernels are the default): the backward is one C++
    pass (see the module docstring) for a float32 x of rank 4; anything else, or another
    dtype: XLA's products."""
    if kernel.ndim != 2 or kernel.shape[0] != x.shape[-1] or bias.shape != kernel.shape[1:]:
        raise ValueError(f"kernel must be ({x.shape[-1]}, L) and bias (L,), got {kernel.shape} and {bias.shape}")
    impl = default_implementation() if impl == "auto" else impl
    use_ffi = (impl == "ffi" and x.ndim == 4 and x.size > 0 and x.dtype == f32 and _ffi.available())
    return _pointwise(x, kernel, bias, use_ffi)
