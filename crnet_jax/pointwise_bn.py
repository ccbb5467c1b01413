"""A 1 x 1 convolution followed by a BatchNorm on batch statistics, whose backward never
needs the convolution's output: a training block's shortcut, BN(x @ W + b).

Written layer by layer, the backward of out = s * y + t (y = x @ W + b, s and t from y's
batch mean and mean square) needs y twice: for the scale's gradient, sum over pixels of
dout * y, and for the moments' cotangent, dy = s dout + q y + r. So y (B, H, W, L) is
either kept from the forward pass or recomputed, and XLA adds two full passes over y
and dout. But y is a linear function of x, so every one of those terms is one too:

    sum_p dout * y       = colsum(W o P) + b * sum_p dout            P = x^T dout (C, L)
    dx = dy @ W^T        = dout @ (s W)^T + x @ (W diag(q) W^T) + (r + q b) @ W^T
    dW = x^T dy          = P diag(s) + (G W + sx b^T) diag(q) + sx r^T   G = x^T x (C, C)
    db = sum_p dy        = s sum_p dout + q (sx W + N b) + N r          sx = sum_p x

(p: the N = B H W pixels). The backward is two passes over (x, dout): one for the sums
P, G, sum dout, sum x and one for dx, with the per-channel algebra between them on (C, L)
matrices. The forward keeps only x (the block input, kept anyway) and the moments, so a
block needs no recomputation to save memory on its shortcut.

With the C++ kernels (impl "ffi") the forward is the fan-out kernel's 1 x 1 convolution
with its moments and both backward passes are kernels of their own
(`crnet_pointwise_bn_sums`, `crnet_pointwise_bn_dx`); otherwise they are XLA products.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from crnet_jax import _ffi
from crnet_jax.depthwise import (
    _batch_partitioned,
    _fold,
    _isa_code,
    _unfold,
    default_implementation,
    separable_conv2d_fanout,
)

f32 = jnp.float32


def _scale_shift(mean, mean_sq, gamma, beta, epsilon: float):
    """BatchNorm (scale, shift) from the batch moments, and (mean, var) for the running
    statistics: var = max(0, E[y^2] - E[y]^2) like flax."""
    var = jnp.maximum(0.0, mean_sq - jnp.square(mean))
    scale = gamma * jax.lax.rsqrt(var + epsilon)
    return scale, beta - mean * scale, mean, var


def _sums_xla(x, g):
    """(x^T g (C, L), sum g (L,), x^T x (C, C), sum x (C,)) over every pixel, float32."""
    hi = jax.lax.Precision.HIGHEST
    xf, gf = x.astype(f32), g.astype(f32)
    axes = tuple(range(x.ndim - 1))
    xg = jnp.einsum("...c,...l->cl", xf, gf, precision=hi)
    xx = jnp.einsum("...c,...d->cd", xf, xf, precision=hi)
    return xg, jnp.sum(gf, axes), xx, jnp.sum(xf, axes)


def _dx_xla(g, a, x, m, c):
    """g @ a + x @ m + c: (..., L) @ (L, C) + (..., C) @ (C, C) + (C,), float32."""
    hi = jax.lax.Precision.HIGHEST
    return (jnp.einsum("...l,lc->...c", g.astype(f32), a, precision=hi)
            + jnp.einsum("...d,dc->...c", x.astype(f32), m, precision=hi) + c)


@functools.lru_cache(maxsize=None)
def _ffi_sums_op(isa: int, threads: int):
    """custom_vmap-wrapped, batch-partitioned `crnet_pointwise_bn_sums`."""
    attrs = dict(isa=np.int64(isa), threads=np.int64(threads))

    def raw(x, g):
        c, l = x.shape[-1], g.shape[-1]
        shapes = (jax.ShapeDtypeStruct((c, l), f32), jax.ShapeDtypeStruct((l,), f32),
                  jax.ShapeDtypeStruct((c, c), f32), jax.ShapeDtypeStruct((c,), f32))
        return tuple(jax.ffi.ffi_call("crnet_pointwise_bn_sums", shapes)(x, g, **attrs))

    partitioned = _batch_partitioned(raw, "bb", "rrrr", "n h w c, n h w l -> c l, l, c d, c",
                                     weight_groups=False)

    @jax.custom_batching.custom_vmap
    def op(x, g):
        return tuple(partitioned(x, g))

    @op.def_vmap
    def _rule(axis_size, in_batched, x, g):  # sums per mapped element
        axes = tuple(0 if b else None for b in in_batched)
        return jax.vmap(_sums_xla, in_axes=axes)(x, g), (True,) * 4

    return op


@functools.lru_cache(maxsize=None)
def _ffi_dx_op(isa: int, threads: int):
    """custom_vmap-wrapped, batch-partitioned `crnet_pointwise_bn_dx`."""
    attrs = dict(isa=np.int64(isa), threads=np.int64(threads))

    def raw(g, a, x, m, c):
        return jax.ffi.ffi_call("crnet_pointwise_bn_dx", jax.ShapeDtypeStruct(x.shape, f32))(g, a, x, m, c, **attrs)

    partitioned = _batch_partitioned(raw, "bwbww", "b", "n h w l, l c, n h w c, c d, d -> n h w c",
                                     weight_groups=False)

    @jax.custom_batching.custom_vmap
    def op(g, a, x, m, c):
        return partitioned(g, a, x, m, c)

    @op.def_vmap
    def _rule(axis_size, in_batched, g, a, x, m, c):
        gb, ab, xb, mb, cb = in_batched
        if not (ab or mb or cb):  # shared weights: the mapped axis folded into the batch
            return _unfold(axis_size, op(_fold(axis_size, gb, g), a, _fold(axis_size, xb, x), m, c)), True
        axes = tuple(0 if b else None for b in in_batched)
        return jax.vmap(_dx_xla, in_axes=axes)(g, a, x, m, c), True

    return op


def _conv_with_moments(x, kernel, bias, use_ffi: bool):
    """(y = x @ kernel + bias in x.dtype, E[y], E[y^2] in float32)."""
    if use_ffi:
        ones = jnp.ones((1, 1, x.shape[-1]), x.dtype)
        ((y, mean, mean_sq),) = separable_conv2d_fanout(x, [(ones, kernel, bias, 1)], "ffi", moments=True)
        return y, mean, mean_sq
    y = (jnp.einsum("...c,cl->...l", x, kernel.astype(x.dtype)) + bias.astype(x.dtype)).astype(x.dtype)
    yf, axes = y.astype(f32), tuple(range(y.ndim - 1))
    return y, jnp.mean(yf, axes), jnp.mean(jnp.square(yf), axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _pointwise_bn(x, kernel, bias, gamma, beta, computed, epsilon: float, use_ffi: bool, deferred: bool):
    """-> (out, mean, var, scale, shift); deferred: out is y itself, its cotangent that of
    scale * y + shift (see `pointwise_batch_norm`); scale and shift get no gradient."""
    return _pointwise_bn_fwd(x, kernel, bias, gamma, beta, computed, epsilon, use_ffi, deferred)[0]


def _pointwise_bn_fwd(x, kernel, bias, gamma, beta, computed, epsilon, use_ffi, deferred):
    y, mean, mean_sq = computed if computed is not None else _conv_with_moments(x, kernel, bias, use_ffi)
    scale, shift, mean, var = _scale_shift(mean, mean_sq, gamma.astype(f32), beta.astype(f32), epsilon)
    out = y.astype(x.dtype) if deferred else (y.astype(f32) * scale + shift).astype(x.dtype)
    return (out, mean, var, scale, shift), (x, kernel, bias, gamma, beta, mean, mean_sq)


def _pointwise_bn_bwd(epsilon, use_ffi, deferred, res, cts):
    x, kernel, bias, gamma, beta, mean, mean_sq = res
    dout, dmean_out, dvar_out = cts[:3]
    n = np.float32(np.prod(x.shape[:-1]))
    w, b = kernel.astype(f32), bias.astype(f32)
    isa = _isa_code(None)
    if use_ffi:
        xg, gsum, xx, xsum = _ffi_sums_op(isa, 0)(x.astype(f32), dout.astype(f32))
    else:
        xg, gsum, xx, xsum = _sums_xla(x, dout)
    hi = jax.lax.Precision.HIGHEST
    # d/d(scale, shift) of sum_p dout * (scale * y + shift); y never formed
    dscale = jnp.sum(w * xg, axis=0) + b * gsum
    (scale, _, _, _), small_vjp = jax.vjp(lambda m, m2, ga, be: _scale_shift(m, m2, ga, be, epsilon),
                                          mean, mean_sq, gamma.astype(f32), beta.astype(f32))
    dmean, dmean_sq, dgamma, dbeta = small_vjp((dscale, gsum, dmean_out.astype(f32), dvar_out.astype(f32)))
    # dy = scale * dout + q * y + r, from out = scale y + shift and the moments' cotangents
    q, r = 2.0 * dmean_sq / n, dmean / n
    a = (w * scale).T                                          # (L, C)
    m = jnp.matmul(w * q, w.T, precision=hi)                  # (C, C)
    c = jnp.matmul(r + q * b, w.T, precision=hi)              # (C,)
    if use_ffi:
        dx = _ffi_dx_op(isa, 0)(dout.astype(f32), a, x.astype(f32), m, c)
    else:
        dx = _dx_xla(dout, a, x, m, c)
    xy = jnp.matmul(xx, w, precision=hi) + jnp.outer(xsum, b)   # x^T y (C, L)
    dw = xg * scale + xy * q + jnp.outer(xsum, r)
    ysum = jnp.matmul(xsum, w, precision=hi) + n * b
    db = gsum * scale + q * ysum + n * r
    return (dx.astype(x.dtype), dw.astype(kernel.dtype), db.astype(bias.dtype), dgamma.astype(gamma.dtype),
            dbeta.astype(beta.dtype), None)


_pointwise_bn.defvjp(_pointwise_bn_fwd, _pointwise_bn_bwd)


def pointwise_batch_norm(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    gamma: jax.Array,
    beta: jax.Array,
    epsilon: float,
    impl: str = "auto",
    computed: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    deferred: bool = False,
) -> tuple:
    """BatchNorm on batch statistics of a 1 x 1 convolution: (out, mean, var).

    x (..., C) -> out (..., L) = gamma (y - mean) / sqrt(var + epsilon) + beta in x.dtype,
    y = x @ kernel (C, L) + bias (L,); mean, var (L,) float32: y's batch statistics over
    every axis but the last (var = max(0, E[y^2] - E[y]^2), as flax), for the running
    averages. Differentiable in x, kernel, bias, gamma, beta (and through mean and var);
    the backward reads only x and the output gradient (see the module docstring).
    impl: "ffi" uses the C++ kernels (when built; x of rank 4), anything else XLA
    products ("auto": the C++ kernels where they are the default).
    computed: (y, E[y], E[y^2]) when the caller has them already (a residual block's
    fan-out computes the convolution in its pass over x): values only, their own
    gradients are ignored; this function's gradients are the whole ones.
    deferred: (y, mean, var, scale, shift) with out = scale * y + shift (scale, shift (L,)
    float32) left to the caller to form where it reads y anyway (a residual block's
    branch kernels, `separable_conv2d_into(deferred_scale=)`): y's cotangent is taken as
    out's, so the caller must differentiate as if y were out; scale and shift carry no
    gradient of their own (theirs is in y's).
    """
    if kernel.ndim != 2 or kernel.shape[0] != x.shape[-1] or bias.shape != kernel.shape[1:]:
        raise ValueError(f"kernel must be ({x.shape[-1]}, L) and bias (L,), got {kernel.shape} and {bias.shape}")
    if gamma.shape != bias.shape or beta.shape != bias.shape:
        raise ValueError(f"gamma and beta must have shape {bias.shape}, got {gamma.shape} and {beta.shape}")
    impl = default_implementation() if impl == "auto" else impl
    use_ffi = impl == "ffi" and x.ndim == 4 and x.size > 0 and _ffi.available()
    if computed is not None:
        y, mean, mean_sq = computed
        if y.shape != (*x.shape[:-1], kernel.shape[1]) or mean.shape != bias.shape or mean_sq.shape != bias.shape:
            raise ValueError(f"computed (y, mean, mean_sq) must have shapes {(*x.shape[:-1], kernel.shape[1])}, "
                             f"{bias.shape}, {bias.shape}; got {y.shape}, {mean.shape}, {mean_sq.shape}")
        computed = jax.lax.stop_gradient((y.astype(x.dtype), mean.astype(f32), mean_sq.astype(f32)))
    outs = _pointwise_bn(x, kernel, bias, gamma, beta, computed, float(epsilon), use_ffi, bool(deferred))
    if deferred:
        return (*outs[:3], *(jax.lax.stop_gradient(t) for t in outs[3:]))
    return outs[:3]
