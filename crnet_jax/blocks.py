"""Res-CR-Net residual blocks (STEM, CONV RES) and the head.

A residual block has three parallel branches, one per (kernel, dilation) pair; each branch is
SepConv(filters) -> BN -> LeakyReLU -> SepConv(filters). The branch outputs are concatenated in
order (3 * filters channels) and added to the shortcut BN(Conv1x1(x)). There is no activation
after the add. The STEM feeds the branches the raw input; a CONV RES block feeds them
x0 = LeakyReLU(BN(x)) while its shortcut still reads the raw x.

Every BN -> LeakyReLU -> SepConv chain (the CONV RES pre-activation and the middle of each
branch) is computed as SepConv with a prologue: the BatchNorm contributes per-channel
(scale, shift) from its statistics and the convolution kernel applies
LeakyReLU(scale * x + shift) to its input on the fly (`separable_conv2d(prologue=...)`),
so neither the normalised nor the activated tensor is stored: in training only the raw
convolution inputs are kept for the backward pass.

The concatenation is never formed: each branch's second convolution adds its output into
its channel slice of the shortcut's output (`separable_conv2d_into`), and the three first
convolutions run as one fan-out from the block input (`separable_conv2d_fanout`), which in
training also returns their outputs' batch moments for the branches' BatchNorms.

The shortcut: in inference its BatchNorm is folded into the 1x1 kernel (the bias is added by
the branches' kernels); in training it is `pointwise_batch_norm`, whose backward reads only
the block input and the output gradient: the 1 x 1 convolution's output is not kept.
So in training a block keeps for its backward pass only its input and the branches'
16-channel first convolutions (needed anyway by the second convolutions' backward).

BatchNorm moments in training never take a pass of their own: the branches' BatchNorms get
theirs from the fan-out kernel, and their cotangents are added by the first convolutions'
backward kernels as they read the output gradient; a CONV RES block's pre-activation gets
its input's from the previous block, whose second convolutions sum each image's output
channels as they write them (`forward(output_sums=True)`, scaled by the dropout mask in
between: `crnet_jax.model`).

In inference mode (every BatchNorm at its running statistics) the whole block is one C++
kernel call where it can be (`crnet_jax.fused_block`, `ModelConfig.fused_inference`): the
branches' middles never leave the cache.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from crnet_jax.config import ModelConfig
from crnet_jax.depthwise import batch_moments_from_sums, default_implementation
from crnet_jax.fused_block import BranchWeights, fused_block_supported, residual_block_inference_fused
from crnet_jax.layers import (
    PointwiseConv,
    SeparableAtrousConv,
    batch_norm,
    batch_norm_scale_shift,
    leaky_relu,
    separable_fanout,
    update_running_statistics,
)
from crnet_jax.pointwise_bn import pointwise_batch_norm


def _dtypes(cfg: ModelConfig) -> dict:
    return {"dtype": jnp.dtype(cfg.dtype), "param_dtype": jnp.dtype(cfg.param_dtype)}


def _bn(features: int, cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return batch_norm(features, momentum=cfg.bn_momentum, epsilon=cfg.bn_epsilon, rngs=rngs, **_dtypes(cfg))


class Branch(nnx.Module):
    """SepConv(k, d) -> BN -> LeakyReLU -> SepConv(k, d): (B, H, W, Cin) -> (B, H, W, filters)."""

    def __init__(self, in_features: int, kernel_size: int, dilation: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
        sep = dict(kernel_size=kernel_size, dilation=dilation, impl=cfg.depthwise_impl, rngs=rngs, **_dtypes(cfg))
        self.slope = cfg.leaky_slope
        self.conv1 = SeparableAtrousConv(in_features, cfg.filters, **sep)
        self.bn = _bn(cfg.filters, cfg, rngs)
        self.conv2 = SeparableAtrousConv(cfg.filters, cfg.filters, **sep)

    def __call__(self, x: jax.Array, prologue: tuple[jax.Array, jax.Array, float] | None = None) -> jax.Array:
        """x (B, H, W, Cin) -> (B, H, W, filters); prologue: see SeparableAtrousConv."""
        h = self.conv1(x, prologue)
        scale, shift = batch_norm_scale_shift(self.bn, h)
        return self.conv2(h, (scale, shift, self.slope))

    def finish_into(self, h: jax.Array, acc: jax.Array, offset: int, extra_bias: jax.Array | None = None,
                    moments: tuple[jax.Array, jax.Array] | None = None, sums: bool = False,
                    deferred_scale: jax.Array | None = None):
        """The branch after conv1: acc (B, H, W, L) with channels [offset, offset + filters)
        increased by conv2(LeakyReLU(bn(h))) (+ extra_bias (filters,)), h = conv1's output
        (B, H, W, filters); moments: h's batch moments if already known (training). sums:
        (acc, per-image sums (B, filters) of those channels of acc and of their squares).
        deferred_scale: acc's slice still to be scaled (see `separable_conv2d_into`)."""
        scale, shift = batch_norm_scale_shift(self.bn, h, moments)
        return self.conv2.into(acc, offset, h, (scale, shift, self.slope), extra_bias, sums=sums,
                               deferred_scale=deferred_scale)


class ResidualBlock(nnx.Module):
    """STEM (preactivate=False) or CONV RES (preactivate=True) block.

    Call: (B, H, W, Cin) -> (B, H, W, len(kernel_sizes) * filters).
    """

    def __init__(self, in_features: int, cfg: ModelConfig, *, preactivate: bool, rngs: nnx.Rngs):
        out = cfg.block_channels
        self.slope = cfg.leaky_slope
        self.pre_bn = _bn(in_features, cfg, rngs) if preactivate else None
        self.branches = nnx.List(
            [Branch(in_features, k, d, cfg, rngs=rngs) for k, d in zip(cfg.kernel_sizes, cfg.dilations)]
        )
        self.impl = cfg.depthwise_impl
        self.fused_inference = cfg.fused_inference
        self.shortcut_conv = PointwiseConv(in_features, out, impl=cfg.depthwise_impl, rngs=rngs, **_dtypes(cfg))
        self.shortcut_bn = _bn(out, cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """shortcut_bn(shortcut_conv(x)) + concat(branches), computed without the concatenation:
        the branches' first convolutions run as one fan-out from x (one input gradient in
        the backward) and each second convolution adds into its channel slice of the
        shortcut's output (reading its slice of the output gradient in the backward)."""
        return self.forward(x)[0]

    def forward(self, x: jax.Array, input_sums: tuple[jax.Array, jax.Array] | None = None,
                output_sums: bool = False) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """`self(x)` and, with output_sums in training with the C++ kernels, the per-image
        sums over (H, W) of the output and of its square, float32 (B, L) each, summed by the
        branches' kernels as they write their channels (else None): what the next block's
        pre-activation BatchNorm needs for its batch moments, without a pass over the
        output. input_sums: those of x (scaled by whatever scaled x since, e.g. dropout),
        for this block's own pre-activation (CONV RES, training); None: its moments are
        reduced from x."""
        if self._fusable(x):
            return self._fused(x), None
        if not self.shortcut_bn.use_running_average:  # training: the shortcut joins the fan-out
            *hs, shortcut = self.first_convolutions(x, with_shortcut=True, input_sums=input_sums)
            return self._finish(x, hs, shortcut, output_sums and self._sums_in_kernels())
        return self._finish(x, self.first_convolutions(x, input_sums=input_sums), None, False)

    def _sums_in_kernels(self) -> bool:
        """Training with the C++ kernels: the output's per-image sums come with it."""
        impl = default_implementation() if self.impl == "auto" else self.impl
        return impl == "ffi" and self._training()

    def _training(self) -> bool:
        return not all(branch.bn.use_running_average for branch in self.branches)

    def first_convolutions(self, x: jax.Array, with_shortcut: bool = False,
                           input_sums: tuple[jax.Array, jax.Array] | None = None) -> list:
        """The branches' first convolutions of x (of LeakyReLU(pre_bn(x)) in a CONV RES block),
        one fan-out: [h (B, H, W, filters)] per branch, in training [(h, mean, mean_sq)] with
        h's float32 batch moments (filters,), summed by the kernels as they write h.
        with_shortcut (training): the shortcut's 1 x 1 convolution of the raw x joins the
        fan-out (one pass over x for all of them) as the last item, (y, mean, mean_sq),
        values only: `pointwise_batch_norm` differentiates the shortcut itself.
        input_sums: x's per-image sums (see `forward`), for pre_bn's batch moments."""
        prologue = None
        if self.pre_bn is not None:  # x0 = LeakyReLU(pre_bn(x)), folded into each branch's conv1
            moments = None
            if input_sums is not None and not self.pre_bn.use_running_average:
                moments = batch_moments_from_sums(x, *input_sums)
            scale, shift = batch_norm_scale_shift(self.pre_bn, x, moments)
            prologue = (scale, shift, self.slope)
        return separable_fanout([branch.conv1 for branch in self.branches], x, prologue, moments=self._training(),
                                shortcut=self.shortcut_conv if with_shortcut else None, shortcut_grad=False)

    def finish(self, x: jax.Array, hs: list, shortcut: tuple[jax.Array, jax.Array, jax.Array] | None = None
               ) -> jax.Array:
        """The block's output from x and `first_convolutions(x)`: the shortcut (its
        convolution's (y, mean, mean_sq) from the fan-out when given) plus each branch's rest
        (BN -> LeakyReLU -> second convolution) added into its channel slice."""
        return self._finish(x, hs, shortcut, False)[0]

    def _finish(self, x: jax.Array, hs: list, shortcut, sums: bool
                ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """`finish`, and with sums the output's per-image sums (see `forward`): each branch's
        kernel finishes its channel slice and sums it as it writes it."""
        # In training with the C++ kernels the shortcut's BatchNorm scale is applied by the
        # branches' kernels as they add into their slices (its shift joins their bias), so
        # no pass over the (B, H, W, L) output forms it: the branches' slices cover all
        # L = len(branches) * filters channels by construction.
        out, bias, deferred = self._shortcut(x, shortcut, self._sums_in_kernels())
        training = self._training()
        offset = 0
        parts = []
        for branch, h in zip(self.branches, hs):
            h, moments = (h[0], h[1:]) if training else (h, None)
            if branch.bn.use_running_average:
                moments = None
            f = h.shape[-1]
            out = branch.finish_into(h, out, offset, None if bias is None else bias[offset : offset + f], moments,
                                     sums=sums, deferred_scale=None if deferred is None else deferred[offset : offset + f])
            if sums:
                out, s1, s2 = out
                parts.append((s1, s2))
            offset += f
        if not sums:
            return out, None
        return out, (jnp.concatenate([p[0] for p in parts], -1), jnp.concatenate([p[1] for p in parts], -1))

    def _fusable(self, x: jax.Array) -> bool:
        """Inference mode, fused_inference on, the C++ kernels chosen and float32 throughout."""
        bns = [self.shortcut_bn, *(branch.bn for branch in self.branches)]
        if self.pre_bn is not None:
            bns.append(self.pre_bn)
        if not self.fused_inference or not all(bn.use_running_average for bn in bns):
            return False
        impl = default_implementation() if self.impl == "auto" else self.impl
        convs = [self.shortcut_conv, *(c for branch in self.branches for c in (branch.conv1, branch.conv2))]
        if impl != "ffi" or any(jnp.dtype(conv.dtype) != jnp.float32 for conv in convs):
            return False
        return fused_block_supported(x, [b.conv1.kernel_size for b in self.branches],
                                     [b.conv2.pointwise_kernel.shape[1] for b in self.branches],
                                     [b.conv1.dilation for b in self.branches])

    @staticmethod
    def _branch_weights(branch: Branch) -> BranchWeights:
        scale, shift = batch_norm_scale_shift(branch.bn, None)  # running statistics
        c1, c2 = branch.conv1, branch.conv2
        return BranchWeights(c1.depthwise_kernel[...], c1.pointwise_kernel[...], c1.bias[...], scale, shift,
                             c2.depthwise_kernel[...], c2.pointwise_kernel[...], c2.bias[...])

    def _fused(self, x: jax.Array) -> jax.Array:
        """The block in inference mode as one kernel call (`residual_block_inference_fused`)."""
        prologue = None
        if self.pre_bn is not None:
            scale, shift = batch_norm_scale_shift(self.pre_bn, None)
            prologue = (scale, shift, self.slope)
        kernel, bias = self._folded_shortcut()
        return residual_block_inference_fused(
            x, [self._branch_weights(b) for b in self.branches], [b.conv1.dilation for b in self.branches],
            kernel, bias, prologue, self.slope)

    def _folded_shortcut(self) -> tuple[jax.Array, jax.Array]:
        """The shortcut's 1 x 1 kernel (Cin, L) and bias (L,) with its BatchNorm (running
        statistics) folded in, float32."""
        conv = self.shortcut_conv
        scale, shift = batch_norm_scale_shift(self.shortcut_bn, None)  # running statistics
        kernel = conv.kernel[...].astype(jnp.float32) * scale
        return kernel, conv.bias[...].astype(jnp.float32) * scale + shift

    def _shortcut(self, x: jax.Array, computed: tuple[jax.Array, jax.Array, jax.Array] | None = None,
                  defer: bool = False) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
        """shortcut_bn(shortcut_conv(x)) as (values, None, None); in inference mode, where the
        BatchNorm is a fixed affine map, as (x @ folded kernel, folded bias): its scale is
        folded into the 1x1 kernel and the bias is left for the caller to add (the branches'
        kernels add it with their own), so the shortcut is one matrix product and no
        elementwise pass over the (B, H, W, 3 * filters) tensor. In training it is
        `pointwise_batch_norm`: the moments come with the convolution and the backward
        reads only x and the output gradient, so the 1 x 1 convolution's output is
        neither kept for the backward pass nor recomputed in it; `computed`: the
        convolution and its moments from the fan-out. defer (training): (the convolution y,
        the BatchNorm's shift, its scale), the scale and shift left to the branches' kernels
        (`pointwise_batch_norm(deferred=True)`: y's gradient stands for the output's)."""
        if not self.shortcut_bn.use_running_average:
            conv, bn = self.shortcut_conv, self.shortcut_bn
            outs = pointwise_batch_norm(
                x.astype(conv.dtype), conv.kernel[...].astype(conv.dtype), conv.bias[...].astype(conv.dtype),
                bn.scale[...].astype(jnp.float32), bn.bias[...].astype(jnp.float32), bn.epsilon, self.impl,
                computed, deferred=defer)
            update_running_statistics(bn, outs[1], outs[2])
            if defer:
                return outs[0], outs[4], outs[3]
            return outs[0], None, None
        conv = self.shortcut_conv
        kernel, bias = self._folded_shortcut()
        y = jnp.einsum("bhwc,cd->bhwd", x.astype(conv.dtype), kernel.astype(conv.dtype))
        return y, bias, None


def stem_block(in_features: int, cfg: ModelConfig, *, rngs: nnx.Rngs) -> ResidualBlock:
    """The STEM: branches read the raw input."""
    return ResidualBlock(in_features, cfg, preactivate=False, rngs=rngs)


def conv_res_block(in_features: int, cfg: ModelConfig, *, rngs: nnx.Rngs) -> ResidualBlock:
    """A CONV RES block: branches read LeakyReLU(BN(x)), the shortcut reads x."""
    return ResidualBlock(in_features, cfg, preactivate=True, rngs=rngs)


class Head(nnx.Module):
    """Conv1x1(num_classes) -> LeakyReLU(0.1); the softmax is applied by the network.

    Call: (B, H, W, C) -> (B, H, W, num_classes) pre-softmax scores.
    """

    def __init__(self, in_features: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.slope = cfg.leaky_slope
        self.conv = PointwiseConv(in_features, cfg.num_classes, impl=cfg.depthwise_impl, rngs=rngs, **_dtypes(cfg))

    def __call__(self, x: jax.Array) -> jax.Array:
        return leaky_relu(self.conv(x), self.slope)
