"""Pointwise (1 x 1) convolution with bias: out = x @ kernel + bias over the channel axis.

Shapes: x (B, H, W, Cin), kernel (Cin, Cout), bias (Cout,) -> (B, H, W, Cout).

Implementations follow the depthwise ones (`crnet_jax.depthwise`): "ffi" runs a C++ CPU
kernel through the XLA FFI (forward; one backward pass giving the input, kernel and bias
gradients), every other implementation is an `einsum`. On CPU XLA lowers this thin
matrix product poorly at full image resolution (measured at 300 x 340 x 8: ~0.2 s for the
48 -> 48 shortcut forward and ~0.4 s for the 48 -> 2 head's input gradient), while the
problem is a single pass over memory: the kernel is vectorised over output channels
(over input channels for outputs narrower than a vector, such as the 2-class head) and
threaded over fixed blocks of pixels, so results do not depend on the thread count.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from crnet_jax import _ffi
from crnet_jax.depthwise import _batch_partitioned, _isa_code, default_implementation


@functools.lru_cache(maxsize=None)
def _ffi_pointwise_ops(isa: int, threads: int):
    """Batch-partitioned FFI calls: fwd(x, w, b) -> out; bwd(x, w, dout) -> (dx, dw, db)."""
    attrs = dict(isa=np.int64(isa), threads=np.int64(threads))
    f32 = jnp.float32

    def raw_fwd(x, w, b):
        out = jax.ShapeDtypeStruct((*x.shape[:-1], w.shape[1]), f32)
        return jax.ffi.ffi_call("crnet_pointwise_fwd", out, vmap_method="sequential")(x, w, b, **attrs)

    def raw_bwd(x, w, dout):
        shapes = tuple(jax.ShapeDtypeStruct(s, f32) for s in (x.shape, w.shape, (w.shape[1],)))
        return tuple(jax.ffi.ffi_call("crnet_pointwise_bwd", shapes, vmap_method="sequential")(x, w, dout, **attrs))

    fwd = _batch_partitioned(raw_fwd, "bww", "b", "n h w c, c o, o -> n h w o")
    bwd = _batch_partitioned(raw_bwd, "bwb", "brr", "n h w c, c o, n h w o -> n h w c, c o, o")
    return fwd, bwd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _ffi_pointwise(x, w, b, isa: int, threads: int):
    f = jnp.float32
    return _ffi_pointwise_ops(isa, threads)[0](x.astype(f), w.astype(f), b.astype(f)).astype(x.dtype)


def _ffi_pointwise_fwd(x, w, b, isa, threads):
    return _ffi_pointwise(x, w, b, isa, threads), (x, w, b)


def _ffi_pointwise_bwd(isa, threads, res, g):
    x, w, b = res
    f = jnp.float32
    dx, dw, db = _ffi_pointwise_ops(isa, threads)[1](x.astype(f), w.astype(f), g.astype(f))
    return dx.astype(x.dtype), dw.astype(w.dtype), db.astype(b.dtype)


_ffi_pointwise.defvjp(_ffi_pointwise_fwd, _ffi_pointwise_bwd)


def pointwise_conv2d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, impl: str = "auto") -> jax.Array:
    """1 x 1 convolution: x (B, H, W, Cin) @ kernel (Cin, Cout) + bias (Cout,) -> (B, H, W, Cout).

    impl: "ffi" for the C++ kernel (float32 inside, result in the dtype of x; float64
    inputs keep their precision through the einsum instead), any other implementation
    name for an einsum in the dtype of x, "auto" for the backend's default
    (`crnet_jax.depthwise.default_implementation`).
    """
    if x.ndim != 4 or kernel.ndim != 2 or kernel.shape[0] != x.shape[-1]:
        raise ValueError(f"pointwise_conv2d: x (B, H, W, Cin) and kernel (Cin, Cout) expected, got {x.shape}, {kernel.shape}")
    impl = default_implementation() if impl == "auto" else impl
    if impl == "ffi" and jnp.dtype(x.dtype).itemsize <= 4:
        if not _ffi.available():
            raise RuntimeError(
                "impl='ffi' needs the compiled extension: " + _ffi.unavailable_reason()
                + ". Reinstall with a C++17 compiler available (pip install .), or use impl='shift'."
            )
        b = jnp.zeros((kernel.shape[1],), kernel.dtype) if bias is None else bias
        return _ffi_pointwise(x, kernel, b, _isa_code(None), 0)
    y = jnp.einsum("bhwc,cd->bhwd", x, kernel.astype(x.dtype))
    return y if bias is None else y + bias.astype(y.dtype)
