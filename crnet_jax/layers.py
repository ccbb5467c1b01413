"""Basic layers of Res-CR-Net with Keras semantics: separable atrous and 1x1 convolutions,
BatchNorm with the authors' settings, spatial dropout, LeakyReLU."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from crnet_jax.depthwise import (
    batch_moments,
    separable_conv2d,
    separable_conv2d_fanout,
    separable_conv2d_into,
    stop_shortcut_gradient,
)
from crnet_jax.pointwise import pointwise_conv


def he_truncated_normal(fan_in: int) -> nnx.Initializer:
    """Keras VarianceScaling(scale=2, mode='fan_in', distribution='truncated_normal') for a given fan in.

    Keras counts the fan in of a depthwise kernel (k, k, Cin, 1) as k*k*Cin, which our (k, k, C)
    layout would not reproduce with the generic rule, so the fan in is passed explicitly.
    """
    base = jax.nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal", in_axis=0, out_axis=1)

    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        # Draw as a (fan_in, n) matrix so that the generic rule sees the right fan in, then reshape.
        size = 1
        for s in shape:
            size *= s
        return base(key, (fan_in, size // fan_in), dtype).reshape(shape)

    return init


def leaky_relu(x: jax.Array, slope: float = 0.1) -> jax.Array:
    """LeakyReLU with the authors' slope 0.1."""
    return jnp.where(x >= 0, x, slope * x)


class SeparableAtrousConv(nnx.Module):
    """Keras SeparableConv2D: depthwise k x k, dilation d, depth multiplier 1, no bias, 'same'
    zero padding; then pointwise 1 x 1 with bias.

    Parameters: depthwise_kernel (k, k, Cin), pointwise_kernel (Cin, Cout), bias (Cout,).
    Call: (B, H, W, Cin) -> (B, H, W, Cout).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        dilation: int,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.dtype = dtype
        self.impl = impl
        k = kernel_size
        self.depthwise_kernel = nnx.Param(
            he_truncated_normal(k * k * in_features)(rngs.params(), (k, k, in_features), param_dtype)
        )
        self.pointwise_kernel = nnx.Param(
            he_truncated_normal(in_features)(rngs.params(), (in_features, out_features), param_dtype)
        )
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype))

    def __call__(self, x: jax.Array, prologue: tuple[jax.Array, jax.Array, float] | None = None) -> jax.Array:
        """x (B, H, W, Cin) -> (B, H, W, Cout). prologue (scale (Cin,), shift (Cin,), slope):
        convolve LeakyReLU(scale * x + shift, slope) instead of x, fused into the kernel
        where the implementation allows (see `separable_conv2d`)."""
        return separable_conv2d(
            x.astype(self.dtype),
            self.depthwise_kernel[...].astype(self.dtype),
            self.pointwise_kernel[...].astype(self.dtype),
            self.bias[...].astype(self.dtype),
            dilation=self.dilation,
            impl=self.impl,
            prologue=prologue,
        )

    def _weights(self) -> tuple[jax.Array, jax.Array, jax.Array, int]:
        return (self.depthwise_kernel[...].astype(self.dtype), self.pointwise_kernel[...].astype(self.dtype),
                self.bias[...].astype(self.dtype), self.dilation)

    def into(self, acc: jax.Array, offset: int, x: jax.Array,
             prologue: tuple[jax.Array, jax.Array, float] | None = None,
             extra_bias: jax.Array | None = None, sums: bool = False,
             deferred_scale: jax.Array | None = None):
        """acc (B, H, W, L) with channels [offset, offset + Cout) increased by self(x, prologue)
        (+ extra_bias (Cout,) if given); in place in the C++ kernels (see
        `separable_conv2d_into`). sums: (out, per-image sums (B, Cout) of those channels of
        out, and of their squares), as there; deferred_scale: as there."""
        dwk, pwk, bias, dilation = self._weights()
        if extra_bias is not None:  # summed in float32 and rounded once to the compute dtype
            bias = (self.bias[...].astype(jnp.float32) + extra_bias.astype(jnp.float32)).astype(self.dtype)
        return separable_conv2d_into(acc, offset, x.astype(self.dtype), dwk, pwk, bias, dilation, impl=self.impl,
                                     prologue=prologue, sums=sums, deferred_scale=deferred_scale)


def separable_fanout(convs: list[SeparableAtrousConv], x: jax.Array,
                     prologue: tuple[jax.Array, jax.Array, float] | None = None, moments: bool = False,
                     shortcut: PointwiseConv | None = None, shortcut_grad: bool = True) -> list:
    """[conv(x, prologue) for conv in convs] (+ [shortcut(x)]: a 1 x 1 convolution of the raw
    x, without the prologue); with the C++ kernels one pass over x computes them all and
    their backward produces one input gradient (see `separable_conv2d_fanout`). moments:
    (y, mean, mean_sq) per convolution, the float32 moments of y over (B, H, W), for the
    BatchNorm that follows. shortcut_grad False: the shortcut's result carries no gradient
    (for a caller that differentiates it itself)."""
    if len({(conv.impl, conv.dtype) for conv in convs}) == 1 and (
            shortcut is None or jnp.dtype(shortcut.dtype) == jnp.dtype(convs[0].dtype)):
        weights = [conv._weights() for conv in convs]
        sc = None
        if shortcut is not None:
            sc = (shortcut.kernel[...].astype(shortcut.dtype), shortcut.bias[...].astype(shortcut.dtype))
        return separable_conv2d_fanout(x.astype(convs[0].dtype), weights, convs[0].impl, prologue=prologue,
                                       moments=moments, shortcut=sc, shortcut_grad=shortcut_grad)
    ys = [conv(x, prologue) for conv in convs]
    if shortcut is not None:
        ys.append(shortcut(x))
    outs = [(y, *batch_moments(y)) for y in ys] if moments else ys
    return stop_shortcut_gradient(outs, shortcut is not None and not shortcut_grad)


class PointwiseConv(nnx.Module):
    """Keras Conv2D with a 1 x 1 kernel and bias. Parameters: kernel (Cin, Cout), bias (Cout,).
    impl: "ffi" (or "auto" where it is the default) takes the backward in one C++ pass
    (`crnet_jax.pointwise`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.impl = impl
        self.kernel = nnx.Param(he_truncated_normal(in_features)(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, H, W, Cin) -> (B, H, W, Cout) in self.dtype."""
        return pointwise_conv(x.astype(self.dtype), self.kernel[...], self.bias[...], self.impl)


def batch_norm(features: int, *, momentum: float, epsilon: float, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """BatchNorm over the channel axis with Keras' momentum convention (0.99) and epsilon (1e-3)."""
    return nnx.BatchNorm(
        features, momentum=momentum, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


def batch_norm_scale_shift(
    bn: nnx.BatchNorm, x: jax.Array | None, moments: tuple[jax.Array, jax.Array] | None = None
) -> tuple[jax.Array, jax.Array]:
    """Per-channel (scale, shift), float32 of shape (C,), such that bn(x) = scale * x + shift.

    What `bn(x)` would do, with the normalisation left to the caller (so it can be fused
    into the next convolution): in training mode (`bn.use_running_average` False) the
    statistics are those of the batch, over all axes but the last (E[x^2] - E[x]^2,
    clipped at 0, in float32, like flax), and the running statistics are updated with
    the layer's momentum; in inference mode the running statistics are used. Gradients
    flow through the batch statistics as in BatchNorm. moments: (E[x], E[x^2]) over all axes
    but the last, float32 (C,), when the caller has them already (training mode only).
    x may be None in inference mode, or when moments are given.
    """
    if bn.use_running_average:
        mean = bn.mean[...].astype(jnp.float32)
        var = bn.var[...].astype(jnp.float32)
    else:
        if moments is None:
            if x is None:
                raise ValueError("batch_norm_scale_shift in training mode needs x or its moments")
            moments = batch_moments(x)
        mean, mean_sq = moments
        var = jnp.maximum(0.0, mean_sq - jnp.square(mean))
        update_running_statistics(bn, mean, var)
    scale = bn.scale[...].astype(jnp.float32) * jax.lax.rsqrt(var + bn.epsilon)
    return scale, bn.bias[...].astype(jnp.float32) - mean * scale


def update_running_statistics(bn: nnx.BatchNorm, mean: jax.Array, var: jax.Array) -> None:
    """bn's running mean and variance moved towards a batch's (C,) statistics with the
    layer's momentum, as flax's BatchNorm does in training (no gradient flows into them)."""
    m = bn.momentum
    bn.mean[...] = jax.lax.stop_gradient(m * bn.mean[...] + (1 - m) * mean).astype(bn.mean.dtype)
    bn.var[...] = jax.lax.stop_gradient(m * bn.var[...] + (1 - m) * var).astype(bn.var.dtype)


def spatial_dropout(rate: float, *, rngs: nnx.Rngs) -> nnx.Dropout:
    """Keras SpatialDropout2D: drops whole channels of a (B, H, W, C) map (one draw per image and channel)."""
    return nnx.Dropout(rate, broadcast_dims=(1, 2), rngs=rngs)
