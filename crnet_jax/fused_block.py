"""A whole residual block in inference mode as one C++ kernel (`crnet_block_infer`).

In inference every BatchNorm of a Res-CR-Net block is a fixed per-channel affine map, so
the block is

    out = x @ shortcut_kernel + shortcut_bias
          + concat_b sep2_b(LeakyReLU(mid_scale_b * sep1_b(x0) + mid_shift_b, mid_slope))

with x0 = x (STEM) or LeakyReLU(scale * x + shift) (CONV RES pre-activation), sep =
depthwise (k_b, d_b) -> pointwise -> bias, and the shortcut's BatchNorm folded into its
1 x 1 kernel. Computed layer by layer, every branch reads the block input and writes and
reads back its 16-channel middle, and adds its output into the 48-channel result: about
1.7 kB of memory traffic per pixel per block at Res-CR-Net's widths. The fused kernel
streams each image through row rings held in the L2 cache (the pre-activated input,
2R + 1 rows with R the widest reach (k / 2) d, and each branch's activated middle) in
column strips, and writes out once per pixel. Each strip reads its columns plus a halo
of 2R on both sides into the ring, and the shortcut reads the row again: at 300 x 340
(4 strips of 85 columns, R = 15) x is read about 2.7 times per pixel, about 0.7 kB of
traffic in all. The first convolutions recompute their outputs on the strip halos: +35%
for the 7 x 7, d5 branch's, about 13% more arithmetic for the block.

Values equal the layer-by-layer computation up to float32 rounding order. Gradients (for
saliency maps and the like on an eval-mode model) go through the layer-by-layer FFI
kernels; under vmap with weights shared the mapped axis is folded into the batch, with
batched weights each element runs the layer-by-layer path.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from crnet_jax import _ffi
from crnet_jax.depthwise import (
    _batch_partitioned,
    _check,
    _fold,
    _isa_code,
    _unfold,
    separable_conv2d,
)

MAX_BRANCHES = 4  # crnet_dw::kMaxBranches


class BranchWeights(NamedTuple):
    """One branch, SepConv -> BN -> LeakyReLU -> SepConv, with the BatchNorm as (scale, shift).

    Shapes: depthwise1 (k, k, C), pointwise1 (C, F), bias1 (F,), mid_scale (F,),
    mid_shift (F,), depthwise2 (k, k, F), pointwise2 (F, F), bias2 (F,).
    """

    depthwise1: jax.Array
    pointwise1: jax.Array
    bias1: jax.Array
    mid_scale: jax.Array
    mid_shift: jax.Array
    depthwise2: jax.Array
    pointwise2: jax.Array
    bias2: jax.Array


class _Static(NamedTuple):
    dilations: tuple[int, ...]
    pre_slope: float | None  # None: no pre-activation (STEM)
    mid_slope: float
    isa: int
    threads: int


def fused_block_supported(x: jax.Array, kernel_sizes: Sequence[int], widths: Sequence[int],
                          dilations: Sequence[int]) -> bool:
    """True when `residual_block_inference_fused` runs a block of these shapes here: the
    C++ kernels are built, x is float32 (B, H, W, C), and 1 to 4 branches of odd kernels up
    to 15 wide with dilations >= 1 and equal widths (output channels)."""
    if not _ffi.available() or x.ndim != 4 or x.dtype != jnp.float32:
        return False
    if not 1 <= len(kernel_sizes) <= MAX_BRANCHES or not len(kernel_sizes) == len(widths) == len(dilations):
        return False
    return (len(set(widths)) == 1 and all(k % 2 == 1 and 1 <= k <= 15 for k in kernel_sizes)
            and all(int(d) >= 1 for d in dilations))


def residual_block_inference_reference(
    x: jax.Array,
    branches: Sequence[BranchWeights],
    dilations: Sequence[int],
    shortcut_kernel: jax.Array,
    shortcut_bias: jax.Array,
    prologue: tuple[jax.Array, jax.Array, float] | None = None,
    mid_slope: float = 0.1,
    impl: str = "auto",
) -> jax.Array:
    """The block layer by layer (what the fused kernel computes), float32.

    x (B, H, W, C) -> (B, H, W, len(branches) * F); shortcut_kernel (C, L), shortcut_bias
    (L,); prologue (scale (C,), shift (C,), slope) on the branches' input or None.
    """
    xf = x.astype(jnp.float32)
    out = jnp.einsum("bhwc,cl->bhwl", xf, shortcut_kernel.astype(jnp.float32)) + shortcut_bias.astype(jnp.float32)
    ys = []
    for br, d in zip(branches, dilations):
        h = separable_conv2d(xf, br.depthwise1, br.pointwise1, br.bias1, int(d), impl, prologue=prologue)
        ys.append(separable_conv2d(h, br.depthwise2, br.pointwise2, br.bias2, int(d), impl,
                                   prologue=(br.mid_scale, br.mid_shift, mid_slope)))
    return out + jnp.concatenate(ys, axis=-1)


def _unflatten(static: _Static, arrays):
    pre_a, pre_b, sk, sb, *flat = arrays
    branches = [BranchWeights(*flat[8 * i : 8 * i + 8]) for i in range(len(static.dilations))]
    prologue = None if static.pre_slope is None else (pre_a, pre_b, static.pre_slope)
    return branches, sk, sb, prologue


def _reference_flat(static: _Static, x, arrays):
    branches, sk, sb, prologue = _unflatten(static, arrays)
    return residual_block_inference_reference(x, branches, static.dilations, sk, sb, prologue, static.mid_slope,
                                              impl="ffi")


@functools.lru_cache(maxsize=None)
def _block_op(static: _Static):
    """custom_vmap-wrapped, batch-partitioned `crnet_block_infer` call for one static config:
    op(x (N,H,W,C), pre_a, pre_b, wsc, bsc, *8 arrays per branch) -> (N,H,W,L)."""
    nb = len(static.dilations)
    attrs = dict(
        dilations=np.asarray(static.dilations, np.int64),
        preact=np.int64(static.pre_slope is not None),
        slope=np.float32(1.0 if static.pre_slope is None else static.pre_slope),
        mid_slope=np.float32(static.mid_slope),
        isa=np.int64(static.isa),
        threads=np.int64(static.threads),
    )

    def raw(x, *arrays):
        shape = jax.ShapeDtypeStruct((*x.shape[:3], arrays[2].shape[1]), jnp.float32)
        return jax.ffi.ffi_call("crnet_block_infer", shape)(x, *arrays, **attrs)

    specs = ["n h w c", "c", "c", "c l", "l"]
    for i in range(nb):
        specs += [f"u{i} v{i} c", "c f", "f", "f", "f", f"p{i} q{i} f", "f g", "g"]
    rule = ", ".join(specs) + " -> n h w l"
    partitioned = _batch_partitioned(raw, "b" + "w" * (len(specs) - 1), "b", rule, weight_groups=False)

    @jax.custom_batching.custom_vmap
    def op(x, *arrays):
        return partitioned(x, *arrays)

    @op.def_vmap
    def _rule(axis_size, in_batched, x, *arrays):
        xb, *wbs = in_batched
        if not any(wbs):
            return _unfold(axis_size, op(_fold(axis_size, xb, x), *arrays)), True
        axes = tuple(0 if b else None for b in in_batched)
        return jax.vmap(functools.partial(_reference_flat, static), in_axes=(axes[0], axes[1:]))(x, arrays), True

    return op


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(static: _Static, x, arrays):
    return _block_op(static)(x, *arrays)


def _fused_fwd(static, x, arrays):
    return _fused(static, x, arrays), (x, arrays)


def _fused_bwd(static, res, g):
    x, arrays = res
    _, vjp = jax.vjp(functools.partial(_reference_flat, static), x, arrays)
    return vjp(g)


_fused.defvjp(_fused_fwd, _fused_bwd)


def residual_block_inference_fused(
    x: jax.Array,
    branches: Sequence[BranchWeights],
    dilations: Sequence[int],
    shortcut_kernel: jax.Array,
    shortcut_bias: jax.Array,
    prologue: tuple[jax.Array, jax.Array, float] | None = None,
    mid_slope: float = 0.1,
    *,
    isa: str | None = None,
    threads: int = 0,
) -> jax.Array:
    """`residual_block_inference_reference` as one C++ kernel call (float32).

    x (B, H, W, C) -> (B, H, W, L), L = len(branches) * F. Raises ValueError for shapes it
    cannot take (see `fused_block_supported`) and RuntimeError when the kernels are not
    built. isa / threads as in `depthwise_conv2d_ffi`.
    """
    if not _ffi.available():
        raise RuntimeError(f"the fused block needs the C++ kernels: {_ffi.unavailable_reason()}")
    if x.ndim != 4:
        raise ValueError(f"x must be (B, H, W, C), got shape {x.shape}")
    c = x.shape[-1]
    if not 1 <= len(branches) <= MAX_BRANCHES or len(dilations) != len(branches):
        raise ValueError(f"the fused block takes 1 to {MAX_BRANCHES} branches, one dilation each; got "
                         f"{len(branches)} branches and {len(dilations)} dilations")
    f = branches[0].pointwise1.shape[1]
    for i, (br, d) in enumerate(zip(branches, dilations)):
        k, _ = _check(x, br.depthwise1, d)
        want = {"depthwise1": (k, k, c), "pointwise1": (c, f), "bias1": (f,), "mid_scale": (f,), "mid_shift": (f,),
                "depthwise2": (k, k, f), "pointwise2": (f, f), "bias2": (f,)}
        for name, shape in want.items():
            if getattr(br, name).shape != shape:
                raise ValueError(f"branch {i}: {name} has shape {getattr(br, name).shape}, expected {shape}")
        if k > 15:
            raise ValueError(f"branch {i}: kernel size {k} > 15 is not supported by the C++ kernels")
    L = f * len(branches)
    if shortcut_kernel.shape != (c, L) or shortcut_bias.shape != (L,):
        raise ValueError(f"shortcut kernel/bias must be ({c}, {L}) / ({L},), got {shortcut_kernel.shape} / "
                         f"{shortcut_bias.shape}")
    f32 = jnp.float32
    if prologue is None:
        pre_a = pre_b = jnp.ones((c,), f32)
        pre_slope = None
    else:
        pre_a, pre_b, pre_slope = prologue[0], prologue[1], float(prologue[2])
        if pre_a.shape != (c,) or pre_b.shape != (c,):
            raise ValueError(f"prologue scale/shift must have shape ({c},), got {pre_a.shape}, {pre_b.shape}")
    static = _Static(tuple(int(d) for d in dilations), pre_slope, float(mid_slope), _isa_code(isa), int(threads))
    arrays = [pre_a, pre_b, shortcut_kernel, shortcut_bias]
    for br in branches:
        arrays += list(br)
    arrays = tuple(a.astype(f32) for a in arrays)
    return _fused(static, x.astype(f32), arrays).astype(x.dtype)
