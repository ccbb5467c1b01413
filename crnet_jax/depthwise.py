"""Depthwise atrous (dilated) convolution and the separable convolution built on it.

Every implementation computes the same thing as Keras' DepthwiseConv2D with depth
multiplier 1, stride 1, 'same' zero padding and no bias:

    out[b, i, j, c] = sum_{u, v} x[b, i + d*(u - k//2), j + d*(v - k//2), c] * kernel[u, v, c]

Shapes: x (B, H, W, C), kernel (k, k, C) with k odd; out (B, H, W, C).

Implementations (`impl=`):
  "xla"    XLA grouped convolution (`lax.conv_general_dilated`, feature_group_count=C).
           The reference; very slow on CPU with dilation (JAX issues #13800, #23713,
           #26266): 1.4 s (3x3) to 4.2 s (7x7 d5) for one forward at 300x340x8x48.
  "shift"  Pure JAX shift-and-add, runs on every backend. Forward: the k*k shifted slices
           of the zero-padded input, multiplied and summed in one XLA loop fusion.
           `jax.custom_vjp`: the input gradient is the same operation on the cotangent with
           the flipped kernel; the kernel gradient is a loop over (image, band of 8 rows)
           with an inner loop over taps on CPU (cache-resident, one pass over x and g), and
           k*k independent full-size multiply-reductions elsewhere (lax.platform_dependent).
           Never materialises k*k shifted copies.
  "ffi"    C++ CPU kernels called through the XLA FFI (crnet_jax/csrc; see
           depthwise_impl.inc): forward, and one fused backward producing the input and the
           kernel gradient in a single pass. Vectorised over channels (over W when C == 1),
           register-blocked with compile-time taps, AVX-512 / AVX2 / SSE2 picked at run
           time, threaded on XLA's intra-op pool, non-temporal stores for big outputs.
           Built by `pip install`; absent (with a one-time warning) without a compiler.
  "auto"   `default_implementation()`: CPU -> "ffi" if built else "shift"; GPU/TPU ->
           "shift". The GPU choice is not measured (no GPU here): "shift" lowers to a few
           bandwidth-bound fusions and k*k reductions with no dependence on cuDNN having
           a fast dilated depthwise path, which the grouped convolution does. Override
           with the environment variable CRNET_DEPTHWISE_IMPL.

`separable_conv2d(..., impl="ffi")` (the CPU default) runs depthwise + pointwise + bias as
one fused C++ kernel per direction, so the Cin-channel depthwise output never reaches main
memory: on CPU these layers are memory-bound at 300x340x8, so this is worth 1.5-2x over
depthwise(ffi) + einsum. `separable_conv2d_into` adds a separable convolution into a
channel slice of a wider tensor in place (its backward reads that slice of the gradient),
and `separable_conv2d_fanout` runs several convolutions of one input (and a 1 x 1 shortcut
of the raw input) in one pass over it, whose backward accumulates one input gradient in
place: a residual block then needs neither the concatenation of its branches nor XLA passes
to slice and sum full-size gradients. (`crnet_jax.fused_block` runs a whole block in
inference mode as one kernel.) Under a batch-sharded jit (data parallelism over devices or
processes) the FFI calls run per device on the local images and the weight gradients are
psum-ed (jax.experimental.custom_partitioning); under vmap the mapped axis is folded into
the batch, so a vmapped call is still one kernel launch.

All implementations accumulate in float32 and return the dtype of x; gradients have the
dtypes of x and kernel.
"""
from __future__ import annotations

import functools
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from crnet_jax import _ffi

IMPLEMENTATIONS = ("xla", "shift", "ffi")

_ENV_IMPL = "CRNET_DEPTHWISE_IMPL"
_ENV_ISA = "CRNET_DEPTHWISE_ISA"  # ffi only: avx512 | avx2 | baseline (testing/benchmarks)


def _check(x: jax.Array, kernel: jax.Array, dilation: int) -> tuple[int, int]:
    if x.ndim != 4:
        raise ValueError(f"x must be (B, H, W, C), got shape {x.shape}")
    if kernel.ndim != 3 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 != 1:
        raise ValueError(f"kernel must be (k, k, C) with k odd, got shape {kernel.shape}")
    if kernel.shape[2] != x.shape[3]:
        raise ValueError(f"kernel channels {kernel.shape[2]} != input channels {x.shape[3]}")
    d = int(dilation)
    if d < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    return kernel.shape[0], d


def _acc_dtype(dtype) -> jnp.dtype:
    """float32 accumulation for half types, else the dtype itself (float64 stays)."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


# ---------------------------------------------------------------------------------------
# "xla": the reference
# ---------------------------------------------------------------------------------------
def depthwise_conv2d_xla(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
    """Reference: XLA grouped convolution (slow on CPU and GPU with dilation)."""
    k, _, c = kernel.shape
    pad = dilation * (k // 2)
    acc = _acc_dtype(x.dtype)
    y = lax.conv_general_dilated(
        x.astype(acc),
        kernel[:, :, None, :].astype(acc),
        window_strides=(1, 1),
        padding=((pad, pad), (pad, pad)),
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
        precision=lax.Precision.HIGHEST,
    )
    return y.astype(x.dtype)


# ---------------------------------------------------------------------------------------
# "shift": pure JAX shift-and-add with a memory-light custom VJP
# ---------------------------------------------------------------------------------------
def _shift_apply(x: jax.Array, kernel: jax.Array, d: int) -> jax.Array:
    """sum_{u,v} shift(x, u, v) * kernel[u, v] in the accumulation dtype (one fusion)."""
    k = kernel.shape[0]
    _, h, w, _ = x.shape
    p = d * (k // 2)
    acc_t = _acc_dtype(x.dtype)
    xp = jnp.pad(x.astype(acc_t), ((0, 0), (p, p), (p, p), (0, 0)))
    kf = kernel.astype(acc_t)
    out = None
    for u in range(k):
        for v in range(k):
            term = xp[:, u * d : u * d + h, v * d : v * d + w, :] * kf[u, v]
            out = term if out is None else out + term
    return out


def _shift_kgrad_blocked(x: jax.Array, g: jax.Array, k: int, d: int, rows: int = 8) -> jax.Array:
    """CPU: dw[u, v, c] = sum_{b,i,j} xpad[b, i + u d, j + v d, c] * g[b, i, j, c].

    Blocked so the data stay in cache across taps: an outer loop over (image, band of
    `rows` rows) slices a haloed slab of x and the band of g (a few hundred KB), an inner
    loop over the k*k taps reduces slab-slice * g-band to (C,). Memory-light (no k*k stack
    of shifted copies), one pass over x and g from memory, and small to compile (two
    fori_loops: ~0.3 s instead of ~3 s for k*k unrolled reductions at k = 7), and ~4x
    faster than k*k full-size reductions on CPU.
    """
    b, h, w, c = x.shape
    p = d * (k // 2)
    acc_t = _acc_dtype(x.dtype)
    rows = min(rows, h)
    nb = -(-h // rows)
    hp = nb * rows
    xp = jnp.pad(x.astype(acc_t), ((0, 0), (p, p + hp - h), (p, p), (0, 0)))
    gp = jnp.pad(g.astype(acc_t), ((0, 0), (0, hp - h), (0, 0), (0, 0)))

    def outer(o, acc):
        n, ib = o // nb, o % nb
        slab = lax.dynamic_slice(xp, (n, ib * rows, 0, 0), (1, rows + 2 * p, w + 2 * p, c))[0]
        gb = lax.dynamic_slice(gp, (n, ib * rows, 0, 0), (1, rows, w, c))[0]

        def inner(t, acc):
            u, v = t // k, t % k
            sl = lax.dynamic_slice(slab, (u * d, v * d, 0), (rows, w, c))
            return acc.at[t].add(jnp.einsum("hwc,hwc->c", sl, gb, precision=lax.Precision.HIGHEST))

        return lax.fori_loop(0, k * k, inner, acc)

    acc = lax.fori_loop(0, b * nb, outer, jnp.zeros((k * k, c), acc_t))
    return acc.reshape(k, k, c)


def _shift_kgrad_unrolled(x: jax.Array, g: jax.Array, k: int, d: int) -> jax.Array:
    """GPU/TPU: k*k independent full-size multiply-reductions (each one wide parallel
    kernel); no stack of shifted copies is materialised."""
    _, h, w, _ = x.shape
    p = d * (k // 2)
    acc_t = _acc_dtype(x.dtype)
    xp = jnp.pad(x.astype(acc_t), ((0, 0), (p, p), (p, p), (0, 0)))
    g = g.astype(acc_t)
    return jnp.stack([
        jnp.stack([jnp.sum(xp[:, u * d : u * d + h, v * d : v * d + w, :] * g, axis=(0, 1, 2)) for v in range(k)])
        for u in range(k)
    ])


def _shift_kgrad(x: jax.Array, g: jax.Array, k: int, d: int) -> jax.Array:
    """Kernel gradient of the shift implementation; the variant is chosen per platform at
    lowering time (lax.platform_dependent), so one jitted function serves CPU and GPU."""
    return lax.platform_dependent(
        x, g,
        cpu=lambda x, g: _shift_kgrad_blocked(x, g, k, d),
        default=lambda x, g: _shift_kgrad_unrolled(x, g, k, d),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _shift_conv(x: jax.Array, kernel: jax.Array, d: int) -> jax.Array:
    return _shift_apply(x, kernel, d).astype(x.dtype)


def _shift_conv_fwd(x, kernel, d):
    return _shift_conv(x, kernel, d), (x, kernel)


def _shift_conv_bwd(d, res, g):
    x, kernel = res
    k = kernel.shape[0]
    dx = _shift_apply(g, kernel[::-1, ::-1, :], d).astype(x.dtype)
    dw = _shift_kgrad(x, g, k, d).astype(kernel.dtype)
    return dx, dw


_shift_conv.defvjp(_shift_conv_fwd, _shift_conv_bwd)


def depthwise_conv2d_shift(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
    """Pure-JAX shift-and-add with a custom VJP (runs on every backend)."""
    _, d = _check(x, kernel, dilation)
    return _shift_conv(x, kernel, d)


# ---------------------------------------------------------------------------------------
# "ffi": the C++ CPU kernels
# ---------------------------------------------------------------------------------------
def _isa_code(isa: str | None) -> int:
    name = (isa or os.environ.get(_ENV_ISA, "auto")).lower()
    if name not in _ffi.ISA_CODES:
        raise ValueError(f"unknown instruction set {name!r}; choose one of {sorted(_ffi.ISA_CODES)}")
    return _ffi.ISA_CODES[name]


def _fold(axis_size, batched, a):
    """(V, N, ...) or broadcast (N, ...) -> (V*N, ...)."""
    if not batched:
        a = jnp.broadcast_to(a, (axis_size, *a.shape))
    return a.reshape(axis_size * a.shape[1], *a.shape[2:])


def _fold_groups(axis_size, batched, w):
    """Per-group weights (G, ...) under vmap -> (V*G, ...) matching the folded batch."""
    if batched:
        return w.reshape(axis_size * w.shape[1], *w.shape[2:])
    return jnp.tile(w, (axis_size,) + (1,) * (w.ndim - 1)) if w.shape[0] > 1 else w


def _per_element(axis_size, batched, w):
    """Weights (G, ...) -> (V*G, ...) with one group per mapped element (for gradients)."""
    if not batched:
        w = jnp.broadcast_to(w, (axis_size, *w.shape))
    return w.reshape(axis_size * w.shape[1], *w.shape[2:])


def _unfold(axis_size, a):
    return a.reshape(axis_size, a.shape[0] // axis_size, *a.shape[1:])


def _batch_partitioned(raw, arg_kinds: str, out_kinds: str, rule: str, weight_groups: bool = True):
    """Wrap an FFI call so XLA's SPMD partitioner runs it per device on the local batch.

    arg_kinds: per argument, "b" (batch-leading, like x), "w" (weights, replicated) or "v"
    (replicated, never grouped: a per-channel vector whose leading axis is not a group axis).
    out_kinds: per result, "b" (batch-sharded like x) or "r" (summed over the batch: psum
    over the mesh axes of the batch). Without this, a custom call on a batch-sharded
    array (data parallelism over several devices or processes) would be all-gathered
    and computed in full on every device. Weights with several groups (vmap over the
    weights) keep the replicated fallback: correct, just not parallel. weight_groups: the
    weights carry that leading group axis (False: they are plain arrays, never grouped).
    """
    from jax.experimental.custom_partitioning import custom_partitioning
    from jax.sharding import NamedSharding, PartitionSpec

    fn = custom_partitioning(raw)

    def _batch_axes(arg_shapes):
        spec = getattr(arg_shapes[0].sharding, "spec", None)
        axes = spec[0] if spec is not None and len(spec) else None
        grouped = weight_groups and any(k == "w" and a.shape[0] > 1 for k, a in zip(arg_kinds, arg_shapes))
        return None if grouped else axes

    def _shardings(mesh, axes):
        b = NamedSharding(mesh, PartitionSpec(axes))
        r = NamedSharding(mesh, PartitionSpec())
        args = tuple(b if k == "b" else r for k in arg_kinds)
        outs = tuple(b if k == "b" else r for k in out_kinds)
        return args, (outs[0] if len(outs) == 1 else outs)

    def infer(mesh, arg_shapes, result_shape):
        return _shardings(mesh, _batch_axes(arg_shapes))[1]

    def partition(mesh, arg_shapes, result_shape):
        axes = _batch_axes(arg_shapes)
        arg_sh, out_sh = _shardings(mesh, axes)

        def lower(*args):
            outs = raw(*args)
            if axes is None or "r" not in out_kinds:
                return outs
            return tuple(lax.psum(o, axes) if k == "r" else o for o, k in zip(outs, out_kinds))

        return mesh, lower, out_sh, arg_sh

    fn.def_partition(infer_sharding_from_operands=infer, partition=partition, sharding_rule=rule)
    return fn


def _weights_rule(axis_size, ws_batched, ws, per_element: bool):
    """Weights of a vmapped call: one group per mapped element when any weight is batched
    or gradients must come out per element, else the shared weights (tiled if grouped)."""
    if per_element or any(ws_batched):
        return [_per_element(axis_size, wb, w) for w, wb in zip(ws, ws_batched)]
    return [_fold_groups(axis_size, False, w) for w in ws]


@functools.lru_cache(maxsize=None)
def _ffi_ops(d: int, isa: int, threads: int):
    """custom_vmap-wrapped depthwise FFI calls for one (dilation, isa, threads).

    Weights carry a leading group axis G dividing the batch N (image n uses group
    n // (N // G)); under vmap the mapped axis is folded into the batch and the groups,
    so a vmapped call is still one kernel launch.
      fwd(x (N,H,W,C), w (G,k,k,C)) -> y (N,H,W,C)
      bwd(x, w, dy) -> (dx, dw (G,k,k,C))
    All float32.
    """
    attrs = dict(dilation=np.int64(d), isa=np.int64(isa), threads=np.int64(threads))
    f32 = jnp.float32

    def raw_fwd(x, w):
        return jax.ffi.ffi_call("crnet_depthwise_fwd", jax.ShapeDtypeStruct(x.shape, f32))(x, w, **attrs)

    def raw_bwd(x, w, dy):
        shapes = (jax.ShapeDtypeStruct(x.shape, f32), jax.ShapeDtypeStruct(w.shape, f32))
        return tuple(jax.ffi.ffi_call("crnet_depthwise_bwd", shapes)(x, w, dy, **attrs))

    p_fwd = _batch_partitioned(raw_fwd, "bw", "b", "n h w c, g k l c -> n h w c")
    p_bwd = _batch_partitioned(raw_bwd, "bwb", "br", "n h w c, g k l c, n h w c -> n h w c, g k l c")

    @jax.custom_batching.custom_vmap
    def fwd(x, w):
        return p_fwd(x, w)

    @fwd.def_vmap
    def _fwd_rule(axis_size, in_batched, x, w):
        xb, wb = in_batched
        y = fwd(_fold(axis_size, xb, x), _fold_groups(axis_size, wb, w))
        return _unfold(axis_size, y), True

    @jax.custom_batching.custom_vmap
    def bwd(x, w, dy):
        return tuple(p_bwd(x, w, dy))

    @bwd.def_vmap
    def _bwd_rule(axis_size, in_batched, x, w, dy):
        xb, wb, gb = in_batched
        dx, dw = bwd(_fold(axis_size, xb, x), _per_element(axis_size, wb, w), _fold(axis_size, gb, dy))
        return (_unfold(axis_size, dx), _unfold(axis_size, dw)), (True, True)

    return fwd, bwd


def _sep_attrs(d: int, isa: int, threads: int, slope: float | None, **extra) -> dict:
    """The FFI attributes of the separable targets (slope None: no prologue)."""
    return dict(dilation=np.int64(d), isa=np.int64(isa), threads=np.int64(threads),
                preact=np.int64(slope is not None), slope=np.float32(1.0 if slope is None else slope), **extra)


def _sep_grad_shapes(x, a, b, wdw, wpw) -> tuple:
    """Result shapes of the separable backward targets: dx, da, db, dwdw, dwpw, dbias (float32)."""
    return tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in (
        x.shape, a.shape, b.shape, wdw.shape, wpw.shape, (wpw.shape[0], wpw.shape[2])))


@functools.lru_cache(maxsize=None)
def _ffi_sep_ops(d: int, isa: int, threads: int, slope: float | None):
    """custom_vmap-wrapped fused separable FFI calls (see `_ffi_ops` for the group axis).

    slope None: plain separable convolution (a, b ignored, their gradients zero); else the
    kernels read x0 = LeakyReLU(a * x + b, slope) instead of x.
      sep_fwd(x, a (G,C), b (G,C), wdw (G,k,k,C), wpw (G,C,Co), bias (G,Co)) -> (N,H,W,Co)
      sep_bwd(x, a, b, wdw, wpw, dout) -> (dx, da, db, dwdw, dwpw, dbias)
    All float32.
    """
    attrs = _sep_attrs(d, isa, threads, slope)
    f32 = jnp.float32

    def raw_sep_fwd(x, a, b, wdw, wpw, bias):
        out = jax.ShapeDtypeStruct((*x.shape[:3], wpw.shape[2]), f32)
        return jax.ffi.ffi_call("crnet_separable_fwd", out)(x, a, b, wdw, wpw, bias, **attrs)

    def raw_sep_bwd(x, a, b, wdw, wpw, dout):
        call = jax.ffi.ffi_call("crnet_separable_bwd", _sep_grad_shapes(x, a, b, wdw, wpw))
        return tuple(call(x, a, b, wdw, wpw, dout, **attrs, offset=np.int64(0)))

    p_sep_fwd = _batch_partitioned(
        raw_sep_fwd, "bwwwww", "b", "n h w c, g c, g c, g k l c, g c o, g o -> n h w o")
    p_sep_bwd = _batch_partitioned(
        raw_sep_bwd, "bwwwwb", "brrrrr",
        "n h w c, g c, g c, g k l c, g c o, n h w o -> n h w c, g c, g c, g k l c, g c o, g o")

    @jax.custom_batching.custom_vmap
    def sep_fwd(x, *ws):
        return p_sep_fwd(x, *ws)

    @sep_fwd.def_vmap
    def _sep_fwd_rule(axis_size, in_batched, x, *ws):
        xb, *wbs = in_batched
        ws = _weights_rule(axis_size, wbs, ws, per_element=False)
        return _unfold(axis_size, sep_fwd(_fold(axis_size, xb, x), *ws)), True

    @jax.custom_batching.custom_vmap
    def sep_bwd(x, a, b, wdw, wpw, dout):
        return tuple(p_sep_bwd(x, a, b, wdw, wpw, dout))

    @sep_bwd.def_vmap
    def _sep_bwd_rule(axis_size, in_batched, x, a, b, wdw, wpw, dout):
        xb, *wbs, gb = in_batched
        # Weight gradients must come out per mapped element: one group per element.
        ws = _weights_rule(axis_size, wbs, (a, b, wdw, wpw), per_element=True)
        outs = sep_bwd(_fold(axis_size, xb, x), *ws, _fold(axis_size, gb, dout))
        return tuple(_unfold(axis_size, o) for o in outs), (True,) * 6

    return sep_fwd, sep_bwd


@functools.lru_cache(maxsize=None)
def _ffi_stats_op(d: int, isa: int, threads: int, slope: float | None):
    """custom_vmap-wrapped separable forward that also returns, per weight group, the sums
    of its output and of its square over the group's images and pixels (see `_ffi_sep_ops`):
      sep_fwd_stats(x, a, b, wdw, wpw, bias) -> (out (N,H,W,Co), sum (G,Co), sumsq (G,Co))
    All float32.
    """
    attrs = _sep_attrs(d, isa, threads, slope)
    f32 = jnp.float32

    def raw(x, a, b, wdw, wpw, bias):
        co = wpw.shape[2]
        shapes = (jax.ShapeDtypeStruct((*x.shape[:3], co), f32),
                  jax.ShapeDtypeStruct((wpw.shape[0], co), f32), jax.ShapeDtypeStruct((wpw.shape[0], co), f32))
        return tuple(jax.ffi.ffi_call("crnet_separable_fwd_stats", shapes)(x, a, b, wdw, wpw, bias, **attrs))

    p_raw = _batch_partitioned(
        raw, "bwwwww", "brr", "n h w c, g c, g c, g k l c, g c o, g o -> n h w o, g o, g o")

    @jax.custom_batching.custom_vmap
    def sep_fwd_stats(x, *ws):
        return tuple(p_raw(x, *ws))

    @sep_fwd_stats.def_vmap
    def _rule(axis_size, in_batched, x, *ws):
        xb, *wbs = in_batched
        # The sums must come out per mapped element: one group per element.
        ws = _weights_rule(axis_size, wbs, ws, per_element=True)
        outs = sep_fwd_stats(_fold(axis_size, xb, x), *ws)
        return tuple(_unfold(axis_size, o) for o in outs), (True,) * 3

    return sep_fwd_stats


_FANOUT_MAX = 5  # convolutions one crnet_fanout_fwd_stats call takes (crnet_dw::kMaxBranches + 1)


def _fanout_per_conv(x, a, b, ws, dilations, raw, isa, threads, slope):
    """What `_ffi_fanout_op` computes, one kernel call per convolution (its vmap path)."""
    outs = []
    one = jnp.ones((1, x.shape[-1]), jnp.float32)
    for i, (d, is_raw) in enumerate(zip(dilations, raw)):
        wdw, wpw, bias = ws[3 * i : 3 * i + 3]
        pre = (one, one) if is_raw else (a[None], b[None])
        y, s1, s2 = _ffi_stats_op(d, isa, threads, None if is_raw else slope)(
            x, *pre, wdw[None], wpw[None], bias[None])
        outs += [y, s1[0], s2[0]]
    return tuple(outs)


@functools.lru_cache(maxsize=None)
def _ffi_fanout_op(dilations: tuple[int, ...], raw: tuple[int, ...], isa: int, threads: int, slope: float | None):
    """custom_vmap-wrapped `crnet_fanout_fwd_stats`: several convolutions of one input in one
    pass over it, with the sums of each output and of its square over the batch.

      op(x (N,H,W,C), a (C,), b (C,), *(wdw (k,k,C), wpw (C,Co), bias (Co,)) per convolution)
        -> (y (N,H,W,Co), sum (Co,), sumsq (Co,)) per convolution, flat

    Convolutions with raw[i] = 1 are 1 x 1 convolutions of the raw x (their wdw is ignored);
    the others separable convolutions of LeakyReLU(a x + b, slope) (of x if slope is None).
    Under vmap (the sums must come out per element) each convolution runs as its own call.
    All float32.
    """
    n = len(dilations)
    attrs = dict(
        dilations=np.asarray(dilations, np.int64), raw=np.asarray(raw, np.int64),
        preact=np.int64(slope is not None), slope=np.float32(1.0 if slope is None else slope),
        isa=np.int64(isa), threads=np.int64(threads),
    )
    f32 = jnp.float32

    def raw_call(x, a, b, *ws):
        shapes = []
        for i in range(n):
            co = ws[3 * i + 1].shape[1]
            shapes += [jax.ShapeDtypeStruct((*x.shape[:3], co), f32), jax.ShapeDtypeStruct((co,), f32),
                       jax.ShapeDtypeStruct((co,), f32)]
        return tuple(jax.ffi.ffi_call("crnet_fanout_fwd_stats", tuple(shapes))(x, a, b, *ws, **attrs))

    specs, outs = ["n h w c", "c", "c"], []
    for i in range(n):
        specs += [f"u{i} v{i} c", f"c o{i}", f"o{i}"]
        outs += [f"n h w o{i}", f"o{i}", f"o{i}"]
    rule = ", ".join(specs) + " -> " + ", ".join(outs)
    partitioned = _batch_partitioned(raw_call, "bww" + "www" * n, "brr" * n, rule, weight_groups=False)

    @jax.custom_batching.custom_vmap
    def op(x, a, b, *ws):
        return tuple(partitioned(x, a, b, *ws))

    @op.def_vmap
    def _rule(axis_size, in_batched, x, a, b, *ws):
        axes = tuple(0 if batched else None for batched in in_batched)
        outs = jax.vmap(lambda x, a, b, *ws: _fanout_per_conv(x, a, b, ws, dilations, raw, isa, threads, slope),
                        in_axes=axes)(x, a, b, *ws)
        return tuple(outs), (True,) * len(outs)

    return op


@functools.lru_cache(maxsize=None)
def _ffi_slice_ops(d: int, isa: int, threads: int, slope: float | None, offset: int):
    """custom_vmap-wrapped separable FFI calls on a channel slice of a wider tensor, and the
    backward that accumulates its input gradient (see `_ffi_sep_ops` for the weights).

      sep_into(x, a, b, wdw, wpw, bias, acc_scale (G,Co), acc (N,H,W,L)) -> acc with
          channels [offset, offset + Co) scaled by acc_scale and increased by the
          convolution (computed in place: the result aliases acc)
      sep_bwd_slice(x, a, b, wdw, wpw, dout (N,H,W,L)) -> (dx, da, db, dwdw, dwpw, dbias),
          the output gradient read from channels [offset, offset + Co) of dout
      sep_bwd_acc(x, a, b, wdw, wpw, dout, dx_in) -> as sep_bwd_slice with dx_in + dx
          (in place: dx aliases dx_in)
    All float32.
    """
    attrs = _sep_attrs(d, isa, threads, slope, offset=np.int64(offset))
    f32 = jnp.float32

    def raw_into(x, a, b, wdw, wpw, bias, acc_scale, acc):
        out = jax.ShapeDtypeStruct(acc.shape, f32)
        call = jax.ffi.ffi_call("crnet_separable_fwd_into", out, input_output_aliases={7: 0})
        return call(x, a, b, wdw, wpw, bias, acc_scale, acc, **attrs)

    def raw_bwd_slice(x, a, b, wdw, wpw, dout):
        call = jax.ffi.ffi_call("crnet_separable_bwd", _sep_grad_shapes(x, a, b, wdw, wpw))
        return tuple(call(x, a, b, wdw, wpw, dout, **attrs))

    def raw_bwd_acc(x, a, b, wdw, wpw, dout, dx_in):
        call = jax.ffi.ffi_call("crnet_separable_bwd_acc", _sep_grad_shapes(x, a, b, wdw, wpw),
                                input_output_aliases={6: 0})
        return tuple(call(x, a, b, wdw, wpw, dout, dx_in, **attrs))

    grads = "n h w c, g c, g c, g k l c, g c o, g o"
    p_into = _batch_partitioned(raw_into, "bwwwwwwb", "b",
                                "n h w c, g c, g c, g k l c, g c o, g o, g o, n h w m -> n h w m")
    p_bwd_slice = _batch_partitioned(
        raw_bwd_slice, "bwwwwb", "brrrrr", "n h w c, g c, g c, g k l c, g c o, n h w m -> " + grads)
    p_bwd_acc = _batch_partitioned(
        raw_bwd_acc, "bwwwwbb", "brrrrr", "n h w c, g c, g c, g k l c, g c o, n h w m, n h w c -> " + grads)

    @jax.custom_batching.custom_vmap
    def sep_into(x, a, b, wdw, wpw, bias, acc_scale, acc):
        return p_into(x, a, b, wdw, wpw, bias, acc_scale, acc)

    @sep_into.def_vmap
    def _into_rule(axis_size, in_batched, x, a, b, wdw, wpw, bias, acc_scale, acc):
        xb, *wbs, ab = in_batched
        ws = _weights_rule(axis_size, wbs, (a, b, wdw, wpw, bias, acc_scale), per_element=False)
        out = sep_into(_fold(axis_size, xb, x), *ws, _fold(axis_size, ab, acc))
        return _unfold(axis_size, out), True

    @jax.custom_batching.custom_vmap
    def sep_bwd_slice(x, a, b, wdw, wpw, dout):
        return tuple(p_bwd_slice(x, a, b, wdw, wpw, dout))

    @sep_bwd_slice.def_vmap
    def _bwd_slice_rule(axis_size, in_batched, x, a, b, wdw, wpw, dout):
        xb, *wbs, gb = in_batched
        ws = _weights_rule(axis_size, wbs, (a, b, wdw, wpw), per_element=True)
        outs = sep_bwd_slice(_fold(axis_size, xb, x), *ws, _fold(axis_size, gb, dout))
        return tuple(_unfold(axis_size, o) for o in outs), (True,) * 6

    @jax.custom_batching.custom_vmap
    def sep_bwd_acc(x, a, b, wdw, wpw, dout, dx_in):
        return tuple(p_bwd_acc(x, a, b, wdw, wpw, dout, dx_in))

    @sep_bwd_acc.def_vmap
    def _bwd_acc_rule(axis_size, in_batched, x, a, b, wdw, wpw, dout, dx_in):
        xb, *wbs, gb, ib = in_batched
        ws = _weights_rule(axis_size, wbs, (a, b, wdw, wpw), per_element=True)
        outs = sep_bwd_acc(_fold(axis_size, xb, x), *ws, _fold(axis_size, gb, dout), _fold(axis_size, ib, dx_in))
        return tuple(_unfold(axis_size, o) for o in outs), (True,) * 6

    return sep_into, sep_bwd_slice, sep_bwd_acc


@functools.lru_cache(maxsize=None)
def _ffi_into_sums_op(d: int, isa: int, threads: int, slope: float | None, offset: int):
    """custom_vmap-wrapped `crnet_separable_fwd_into_sums` (see `_ffi_slice_ops`):

      op(x, a, b, wdw, wpw, bias, acc_scale, acc (N,H,W,L)) -> (out (N,H,W,L), sum (N,Co), sumsq (N,Co)):
          sep_into's result, and per image the sums over (H, W) of its channels
          [offset, offset + Co) and of their squares (the values written, in float32)

    All float32.
    """
    attrs = _sep_attrs(d, isa, threads, slope, offset=np.int64(offset))
    f32 = jnp.float32

    def raw(x, a, b, wdw, wpw, bias, acc_scale, acc):
        sums = jax.ShapeDtypeStruct((acc.shape[0], wpw.shape[2]), f32)
        call = jax.ffi.ffi_call("crnet_separable_fwd_into_sums", (jax.ShapeDtypeStruct(acc.shape, f32), sums, sums),
                                input_output_aliases={7: 0})
        return tuple(call(x, a, b, wdw, wpw, bias, acc_scale, acc, **attrs))

    partitioned = _batch_partitioned(
        raw, "bwwwwwwb", "bbb", "n h w c, g c, g c, g k l c, g c o, g o, g o, n h w m -> n h w m, n o, n o")

    @jax.custom_batching.custom_vmap
    def op(x, a, b, wdw, wpw, bias, acc_scale, acc):
        return tuple(partitioned(x, a, b, wdw, wpw, bias, acc_scale, acc))

    @op.def_vmap
    def _rule(axis_size, in_batched, x, a, b, wdw, wpw, bias, acc_scale, acc):
        xb, *wbs, ab = in_batched
        ws = _weights_rule(axis_size, wbs, (a, b, wdw, wpw, bias, acc_scale), per_element=False)
        outs = op(_fold(axis_size, xb, x), *ws, _fold(axis_size, ab, acc))
        return tuple(_unfold(axis_size, o) for o in outs), (True,) * 3

    return op


@functools.lru_cache(maxsize=None)
def _ffi_bn_bwd_ops(d: int, isa: int, threads: int, slope: float | None):
    """custom_vmap-wrapped separable backward of a convolution whose output y also feeds a
    BatchNorm's batch moments (see `_ffi_sep_ops` for the weights):

      bwd_bn(x, a, b, wdw, wpw, dout, y (N,H,W,Co), c1 (Co,), c2 (Co,))
          -> sep_bwd(x, a, b, wdw, wpw, dout + c1 + c2 * y), the sum formed by the kernel as
          it reads dout (no pass of its own over the three tensors)
      bwd_bn_acc(..., dx_in) -> as bwd_bn with dx_in + dx (in place: dx aliases dx_in)

    Under vmap with per-element c1, c2 (the usual case: they come from per-element
    moments) the sum is formed by XLA and the plain backward runs. All float32.
    """
    attrs = _sep_attrs(d, isa, threads, slope, offset=np.int64(0))
    f32 = jnp.float32

    def raw_bn(x, a, b, wdw, wpw, dout, y, c1, c2):
        call = jax.ffi.ffi_call("crnet_separable_bwd_bn", _sep_grad_shapes(x, a, b, wdw, wpw))
        return tuple(call(x, a, b, wdw, wpw, dout, y, c1, c2, **attrs))

    def raw_bn_acc(x, a, b, wdw, wpw, dout, y, c1, c2, dx_in):
        call = jax.ffi.ffi_call("crnet_separable_bwd_bn_acc", _sep_grad_shapes(x, a, b, wdw, wpw),
                                input_output_aliases={9: 0})
        return tuple(call(x, a, b, wdw, wpw, dout, y, c1, c2, dx_in, **attrs))

    ins = "n h w c, g c, g c, g k l c, g c o, n h w o, n h w o, o, o"
    grads = "n h w c, g c, g c, g k l c, g c o, g o"
    p_bn = _batch_partitioned(raw_bn, "bwwwwbbvv", "brrrrr", f"{ins} -> {grads}")
    p_bn_acc = _batch_partitioned(raw_bn_acc, "bwwwwbbvvb", "brrrrr", f"{ins}, n h w c -> {grads}")
    sep_bwd = _ffi_sep_ops(d, isa, threads, slope)[1]
    sep_bwd_acc = _ffi_slice_ops(d, isa, threads, slope, 0)[2]

    def summed(x, a, b, wdw, wpw, dout, y, c1, c2, *dx_in):
        g = dout + c1 + c2 * y
        return sep_bwd_acc(x, a, b, wdw, wpw, g, *dx_in) if dx_in else sep_bwd(x, a, b, wdw, wpw, g)

    def rule(op, axis_size, in_batched, args):
        x, a, b, wdw, wpw, dout, y, c1, c2, *dx_in = args
        if in_batched[7] or in_batched[8]:
            axes = tuple(0 if t else None for t in in_batched)
            return tuple(jax.vmap(summed, in_axes=axes)(*args)), (True,) * 6
        xb, ab, bb, wb, pb, gb, yb, _, _, *ib = in_batched
        ws = _weights_rule(axis_size, (ab, bb, wb, pb), (a, b, wdw, wpw), per_element=True)
        rest = [_fold(axis_size, ib[0], dx_in[0])] if dx_in else []
        outs = op(_fold(axis_size, xb, x), *ws, _fold(axis_size, gb, dout), _fold(axis_size, yb, y), c1, c2, *rest)
        return tuple(_unfold(axis_size, o) for o in outs), (True,) * 6

    @jax.custom_batching.custom_vmap
    def bwd_bn(x, a, b, wdw, wpw, dout, y, c1, c2):
        return tuple(p_bn(x, a, b, wdw, wpw, dout, y, c1, c2))

    @bwd_bn.def_vmap
    def _bn_rule(axis_size, in_batched, *args):
        return rule(bwd_bn, axis_size, in_batched, args)

    @jax.custom_batching.custom_vmap
    def bwd_bn_acc(x, a, b, wdw, wpw, dout, y, c1, c2, dx_in):
        return tuple(p_bn_acc(x, a, b, wdw, wpw, dout, y, c1, c2, dx_in))

    @bwd_bn_acc.def_vmap
    def _bn_acc_rule(axis_size, in_batched, *args):
        return rule(bwd_bn_acc, axis_size, in_batched, args)

    return bwd_bn, bwd_bn_acc


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _ffi_conv(x: jax.Array, kernel: jax.Array, d: int, isa: int, threads: int) -> jax.Array:
    fwd = _ffi_ops(d, isa, threads)[0]
    return fwd(x.astype(jnp.float32), kernel.astype(jnp.float32)[None]).astype(x.dtype)


def _ffi_conv_fwd(x, kernel, d, isa, threads):
    return _ffi_conv(x, kernel, d, isa, threads), (x, kernel)


def _ffi_conv_bwd(d, isa, threads, res, g):
    x, kernel = res
    bwd = _ffi_ops(d, isa, threads)[1]
    dx, dw = bwd(x.astype(jnp.float32), kernel.astype(jnp.float32)[None], g.astype(jnp.float32))
    return dx.astype(x.dtype), dw[0].astype(kernel.dtype)


_ffi_conv.defvjp(_ffi_conv_fwd, _ffi_conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _ffi_sep(x, a, b, wdw, wpw, bias, d: int, isa: int, threads: int, slope: float | None):
    sep_fwd = _ffi_sep_ops(d, isa, threads, slope)[0]
    f = jnp.float32
    ws = (a, b, wdw, wpw, bias)
    return sep_fwd(x.astype(f), *(w.astype(f)[None] for w in ws)).astype(x.dtype)


def _ffi_sep_fwd(x, a, b, wdw, wpw, bias, d, isa, threads, slope):
    return _ffi_sep(x, a, b, wdw, wpw, bias, d, isa, threads, slope), (x, a, b, wdw, wpw, bias)


def _ffi_sep_bwd(d, isa, threads, slope, res, g):
    x, a, b, wdw, wpw, bias = res
    sep_bwd = _ffi_sep_ops(d, isa, threads, slope)[1]
    f = jnp.float32
    dx, da, db, dwdw, dwpw, dbias = sep_bwd(
        x.astype(f), *(w.astype(f)[None] for w in (a, b, wdw, wpw)), g.astype(f))
    return (dx.astype(x.dtype), da[0].astype(a.dtype), db[0].astype(b.dtype),
            dwdw[0].astype(wdw.dtype), dwpw[0].astype(wpw.dtype), dbias[0].astype(bias.dtype))


_ffi_sep.defvjp(_ffi_sep_fwd, _ffi_sep_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12, 13))
def _ffi_sep_into(acc, x, a, b, wdw, wpw, bias, acc_scale, d: int, isa: int, threads: int, slope: float | None,
                  offset: int, sums: bool = False):
    """-> out, or with sums (out, sum (B, Co), sumsq (B, Co)): the per-image sums of the
    channels written and of their squares (float32, no gradient flows through them).
    acc_scale (Co,): the slice of acc is scaled by it first; the gradient returned for acc
    is the output's (see `separable_conv2d_into(deferred_scale=)`), acc_scale gets none."""
    f = jnp.float32
    args = (x.astype(f), *(w.astype(f)[None] for w in (a, b, wdw, wpw, bias, acc_scale)), acc.astype(f))
    if sums:
        out, s1, s2 = _ffi_into_sums_op(d, isa, threads, slope, offset)(*args)
        return out.astype(acc.dtype), s1, s2
    return _ffi_slice_ops(d, isa, threads, slope, offset)[0](*args).astype(acc.dtype)


def _ffi_sep_into_fwd(acc, x, a, b, wdw, wpw, bias, acc_scale, d, isa, threads, slope, offset, sums):
    out = _ffi_sep_into(acc, x, a, b, wdw, wpw, bias, acc_scale, d, isa, threads, slope, offset, sums)
    return out, (x, a, b, wdw, wpw, bias, acc_scale)


def _ffi_sep_into_bwd(d, isa, threads, slope, offset, sums, res, g):
    if sums:  # the sums' cotangents are dropped: their consumer differentiates them itself
        g = g[0]
    x, a, b, wdw, wpw, bias, acc_scale = res
    sep_bwd_slice = _ffi_slice_ops(d, isa, threads, slope, offset)[1]
    f = jnp.float32
    dx, da, db, dwdw, dwpw, dbias = sep_bwd_slice(
        x.astype(f), *(w.astype(f)[None] for w in (a, b, wdw, wpw)), g.astype(f))
    return (g, dx.astype(x.dtype), da[0].astype(a.dtype), db[0].astype(b.dtype),
            dwdw[0].astype(wdw.dtype), dwpw[0].astype(wpw.dtype), dbias[0].astype(bias.dtype),
            jnp.zeros_like(acc_scale))


_ffi_sep_into.defvjp(_ffi_sep_into_fwd, _ffi_sep_into_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _ffi_sep_fanout(x, a, b, weights, shortcut, dilations: tuple[int, ...], isa: int, threads: int,
                    slope: float | None, moments: bool, shortcut_grad: bool = True):
    """-> per convolution y, or (y, mean (Co,), mean of squares (Co,)) with moments: the
    output's BatchNorm moments over (B, H, W), summed in the kernel as it writes y; then,
    with a shortcut (kernel (C, L), bias (L,)), the same for its 1 x 1 convolution of the
    raw x. One kernel call reads x once for all of them. shortcut_grad False: the
    shortcut's outputs are not differentiated (the caller stops their gradient): its
    output is not kept and the backward skips it."""
    f = jnp.float32
    convs = [tuple(w.astype(f) for w in conv) for conv in weights]
    raw = [0] * len(convs)
    dils = list(dilations)
    if shortcut is not None:
        convs.append((jnp.ones((1, 1, x.shape[-1]), f), shortcut[0].astype(f), shortcut[1].astype(f)))
        raw.append(1)
        dils.append(1)
    args = (x.astype(f), a.astype(f), b.astype(f), *(w for conv in convs for w in conv))
    if len(convs) <= _FANOUT_MAX:
        res = _ffi_fanout_op(tuple(dils), tuple(raw), isa, threads, slope)(*args)
    else:  # more than the kernel takes at once: one call per convolution
        res = _fanout_per_conv(*args[:3], args[3:], tuple(dils), tuple(raw), isa, threads, slope)
    count = np.float32(np.prod(x.shape[:3]))
    outs = []
    for i in range(len(convs)):
        y, s1, s2 = res[3 * i : 3 * i + 3]
        outs.append((y.astype(x.dtype), s1 / count, s2 / count) if moments else y.astype(x.dtype))
    return tuple(outs)


def _ffi_sep_fanout_fwd(x, a, b, weights, shortcut, dilations, isa, threads, slope, moments, shortcut_grad):
    outs = _ffi_sep_fanout(x, a, b, weights, shortcut, dilations, isa, threads, slope, moments, shortcut_grad)
    kept = outs if shortcut_grad else outs[: len(weights)]
    ys = tuple(o[0] for o in kept) if moments else None
    return outs, (x, a, b, weights, shortcut, ys)


def _ffi_sep_fanout_bwd(dilations, isa, threads, slope, moments, shortcut_grad, res, gs):
    """One input gradient for all the convolutions: the first backward call writes it, the
    others (the shortcut's last) add to it in place, instead of XLA summing separate
    full-size gradients. With moments, their cotangents join each output's:
    d mean / dy = 1 / count and d mean_sq / dy = 2 y / count, added by the kernels as
    they read the output's gradient (`_ffi_bn_bwd_ops`) for the separable convolutions."""
    x, a, b, weights, shortcut, ys = res
    f = jnp.float32
    xf, af, bf = x.astype(f), a.astype(f)[None], b.astype(f)[None]
    count = np.float32(np.prod(x.shape[:3]))

    def cotangent(i):
        if not moments:
            return gs[i].astype(f)
        g, g1, g2 = gs[i]
        return g.astype(f) + g1.astype(f) / count + ys[i].astype(f) * (2.0 * g2.astype(f) / count)

    dx = None
    da = db = 0.0
    dweights = []
    for i, ((wdw, wpw, bias), d) in enumerate(zip(weights, dilations)):
        ws = (wdw.astype(f)[None], wpw.astype(f)[None])
        if moments:
            g, g1, g2 = gs[i]
            bn = (g.astype(f), ys[i].astype(f), g1.astype(f) / count, 2.0 * g2.astype(f) / count)
            bwd_bn, bwd_bn_acc = _ffi_bn_bwd_ops(d, isa, threads, slope)
            outs = bwd_bn(xf, af, bf, *ws, *bn) if dx is None else bwd_bn_acc(xf, af, bf, *ws, *bn, dx)
        elif dx is None:
            outs = _ffi_sep_ops(d, isa, threads, slope)[1](xf, af, bf, *ws, cotangent(i))
        else:
            outs = _ffi_slice_ops(d, isa, threads, slope, 0)[2](xf, af, bf, *ws, cotangent(i), dx)
        dx, da_i, db_i, dwdw, dwpw, dbias = outs
        da, db = da + da_i[0], db + db_i[0]
        dweights.append((dwdw[0].astype(wdw.dtype), dwpw[0].astype(wpw.dtype), dbias[0].astype(bias.dtype)))
    dshortcut = None
    if shortcut is not None and not shortcut_grad:
        dshortcut = (jnp.zeros_like(shortcut[0]), jnp.zeros_like(shortcut[1]))
    elif shortcut is not None:  # a separable call with a 1 x 1 kernel of ones, no prologue
        one = jnp.ones((1, x.shape[-1]), f)
        ws = (jnp.ones((1, 1, 1, x.shape[-1]), f), shortcut[0].astype(f)[None])
        g = cotangent(len(weights))
        if dx is None:
            outs = _ffi_sep_ops(1, isa, threads, None)[1](xf, one, one, *ws, g)
        else:
            outs = _ffi_slice_ops(1, isa, threads, None, 0)[2](xf, one, one, *ws, g, dx)
        dx, _, _, _, dk, dbias = outs
        dshortcut = (dk[0].astype(shortcut[0].dtype), dbias[0].astype(shortcut[1].dtype))
    return dx.astype(x.dtype), jnp.asarray(da).astype(a.dtype), jnp.asarray(db).astype(b.dtype), tuple(dweights), dshortcut


_ffi_sep_fanout.defvjp(_ffi_sep_fanout_fwd, _ffi_sep_fanout_bwd)


def ffi_available() -> bool:
    """True when the C++ FFI kernels were built and registered."""
    return _ffi.available()


def depthwise_conv2d_ffi(
    x: jax.Array, kernel: jax.Array, dilation: int, *, isa: str | None = None, threads: int = 0
) -> jax.Array:
    """C++ CPU kernel through the XLA FFI (float32 compute; other dtypes are cast).

    isa: "avx512" | "avx2" | "baseline" | None (best supported; env CRNET_DEPTHWISE_ISA).
    threads: 0 = the environment variable CRNET_DEPTHWISE_THREADS if set, else the size of
      XLA's intra-op thread pool. Results do not depend on it (bitwise).
    """
    k, d = _check(x, kernel, dilation)
    if k > 15:
        raise ValueError("the ffi implementation supports kernel sizes up to 15")
    if not _ffi.available():
        raise RuntimeError(
            "impl='ffi' needs the compiled extension: " + _ffi.unavailable_reason()
            + ". Reinstall with a C++17 compiler available (pip install .), or use impl='shift'."
        )
    return _ffi_conv(x, kernel, d, _isa_code(isa), int(threads))


# ---------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------
_warned_fallback = False


def default_implementation(backend: str | None = None) -> str:
    """The fastest implementation for `backend` (default: JAX's default backend).

    CRNET_DEPTHWISE_IMPL overrides. CPU: "ffi" when the extension is built, else "shift"
    (with a one-time warning). Other backends: "shift".
    """
    global _warned_fallback
    env = os.environ.get(_ENV_IMPL, "").strip().lower()
    if env and env != "auto":
        if env not in IMPLEMENTATIONS:
            raise ValueError(f"{_ENV_IMPL}={env!r}; choose one of {IMPLEMENTATIONS} or 'auto'")
        return env
    backend = backend or jax.default_backend()
    if backend == "cpu":
        if _ffi.available():
            return "ffi"
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn(
                "crnet_jax: the C++ depthwise kernels are not available ("
                + _ffi.unavailable_reason()
                + "); falling back to the pure-JAX 'shift' implementation, several times slower on CPU. "
                "Reinstall with a C++17 compiler (pip install .) to build them.",
                RuntimeWarning,
                stacklevel=3,
            )
        return "shift"
    return "shift"


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, dilation: int = 1, impl: str = "auto") -> jax.Array:
    """Depthwise k x k convolution with dilation, 'same' zero padding, no bias.

    Args:
      x: (B, H, W, C) input.
      kernel: (k, k, C) depthwise kernel, k odd.
      dilation: atrous rate d >= 1.
      impl: one of IMPLEMENTATIONS, or "auto" for `default_implementation()`.
    Returns:
      (B, H, W, C), dtype of x.
    """
    impl = default_implementation() if impl == "auto" else impl
    if impl == "xla":
        _check(x, kernel, dilation)
        return depthwise_conv2d_xla(x, kernel, int(dilation))
    if impl == "shift":
        return depthwise_conv2d_shift(x, kernel, dilation)
    if impl == "ffi":
        return depthwise_conv2d_ffi(x, kernel, dilation)
    raise ValueError(f"unknown depthwise implementation {impl!r}; choose one of {IMPLEMENTATIONS} or 'auto'")


def separable_conv2d(
    x: jax.Array,
    depthwise_kernel: jax.Array,
    pointwise_kernel: jax.Array,
    bias: jax.Array | None,
    dilation: int = 1,
    impl: str = "auto",
    *,
    prologue: tuple[jax.Array, jax.Array, float] | None = None,
) -> jax.Array:
    """Keras SeparableConv2D: depthwise (k, k, Cin) with dilation, then pointwise (Cin, Cout) + bias.

    Shapes: x (B, H, W, Cin) -> (B, H, W, Cout).

    prologue: optional (scale (Cin,), shift (Cin,), slope): the convolution then reads
      LeakyReLU(scale * x + shift, slope) instead of x, which is a BatchNorm (with its
      statistics folded into scale and shift) + LeakyReLU in front of the convolution.
      Gradients flow to scale and shift (and through them to the statistics).

    With impl "ffi" (the CPU default when built) prologue, depthwise, pointwise and bias
    run fused in one C++ kernel per direction: neither the activated input nor the
    (B, H, W, Cin) depthwise output reaches main memory (the backward recomputes them),
    which matters because these layers are memory bound on CPU. Other impls compose
    the prologue, depthwise_conv2d(impl) and an einsum.
    """
    impl = default_implementation() if impl == "auto" else impl
    cin, cout = pointwise_kernel.shape
    if cin != x.shape[-1]:
        raise ValueError(f"pointwise kernel {pointwise_kernel.shape} does not match {x.shape[-1]} input channels")
    if prologue is not None:
        scale, shift, slope = prologue
        if scale.shape != (cin,) or shift.shape != (cin,):
            raise ValueError(f"prologue scale/shift must have shape ({cin},), got {scale.shape}, {shift.shape}")
    if impl == "ffi":
        k, d = _check(x, depthwise_kernel, dilation)
        if k > 15 or not _ffi.available():
            depthwise_conv2d_ffi(x, depthwise_kernel, dilation)  # raises with the reason
        b = jnp.zeros((cout,), pointwise_kernel.dtype) if bias is None else bias
        if prologue is None:
            one = jnp.ones((cin,), jnp.float32)
            return _ffi_sep(x, one, one, depthwise_kernel, pointwise_kernel, b, d, _isa_code(None), 0, None)
        return _ffi_sep(x, scale, shift, depthwise_kernel, pointwise_kernel, b, d, _isa_code(None), 0, float(slope))
    if prologue is not None:
        acc = _acc_dtype(x.dtype)
        z = x.astype(acc) * scale.astype(acc) + shift.astype(acc)
        x = jnp.where(z >= 0, z, slope * z).astype(x.dtype)
    y = depthwise_conv2d(x, depthwise_kernel, dilation, impl)
    y = jnp.einsum("bhwc,cd->bhwd", y, pointwise_kernel.astype(y.dtype))
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


def _check_prologue(prologue, cin: int) -> None:
    if prologue is not None:
        scale, shift, _ = prologue
        if scale.shape != (cin,) or shift.shape != (cin,):
            raise ValueError(f"prologue scale/shift must have shape ({cin},), got {scale.shape}, {shift.shape}")


def _ffi_ready(x: jax.Array, depthwise_kernel: jax.Array, dilation: int) -> int:
    """Checks shapes and that the kernels are built (raising with the reason); returns d."""
    k, d = _check(x, depthwise_kernel, dilation)
    if k > 15 or not _ffi.available():
        depthwise_conv2d_ffi(x, depthwise_kernel, dilation)  # raises with the reason
    return d


def separable_conv2d_into(
    acc: jax.Array,
    offset: int,
    x: jax.Array,
    depthwise_kernel: jax.Array,
    pointwise_kernel: jax.Array,
    bias: jax.Array | None,
    dilation: int = 1,
    impl: str = "auto",
    *,
    prologue: tuple[jax.Array, jax.Array, float] | None = None,
    sums: bool = False,
    deferred_scale: jax.Array | None = None,
):
    """`acc` with channels [offset, offset + Cout) increased by `separable_conv2d(x, ...)`.

    Shapes: acc (B, H, W, L) with offset + Cout <= L, x (B, H, W, Cin) -> (B, H, W, L), dtype
    of acc. This is how a residual block adds its branches to the shortcut without a
    concatenation: with impl "ffi" the kernel adds its result into the slice in place, and
    its backward reads the output gradient from that slice of the block's gradient instead
    of XLA copying the slice out. Values equal `acc.at[..., offset:offset + Cout].add(y)`.

    sums: also return, per image, the sums over (H, W) of the result's channels
    [offset, offset + Cout) and of their squares, float32 (B, Cout) each, with their
    gradient stopped: `(out, sum, sumsq)`. With impl "ffi" the kernel sums the values as it
    writes them (for a bfloat16 acc, before they are rounded to bfloat16): where this call
    finishes those channels of a block's output, the next BatchNorm's batch moments come
    without a pass over the output (`batch_moments_from_sums`).

    deferred_scale (Cout,), impl "ffi" only: the slice of acc holds values still to be
    scaled by it per channel (a BatchNorm's scale, its shift being in `bias`): the result's
    slice is acc * deferred_scale + the convolution, and the gradient returned for acc is
    the result's own, unscaled, for a caller whose differentiation of acc already stands
    for the scaled tensor (`pointwise_batch_norm(deferred=True)`). The scaling costs no
    pass of its own: the kernel applies it as it adds into the slice.
    """
    impl = default_implementation() if impl == "auto" else impl
    cin, cout = pointwise_kernel.shape
    if cin != x.shape[-1]:
        raise ValueError(f"pointwise kernel {pointwise_kernel.shape} does not match {x.shape[-1]} input channels")
    if acc.ndim != 4 or acc.shape[:3] != x.shape[:3] or not 0 <= offset <= acc.shape[3] - cout:
        raise ValueError(
            f"acc {acc.shape} must be (B, H, W, L) with the image size of x {x.shape} and "
            f"room for {cout} channels at offset {offset}")
    _check_prologue(prologue, cin)
    if deferred_scale is not None and (impl != "ffi" or deferred_scale.shape != (cout,)):
        raise ValueError(f"deferred_scale must have shape ({cout},) and needs impl 'ffi' (got "
                         f"{deferred_scale.shape}, {impl!r})")
    if impl == "ffi":
        d = _ffi_ready(x, depthwise_kernel, dilation)
        b = jnp.zeros((cout,), pointwise_kernel.dtype) if bias is None else bias
        acc_scale = jnp.ones((cout,), jnp.float32) if deferred_scale is None else lax.stop_gradient(deferred_scale)
        if prologue is None:
            one = jnp.ones((cin,), jnp.float32)
            args = (one, one, depthwise_kernel, pointwise_kernel, b, acc_scale, d, _isa_code(None), 0, None)
        else:
            scale, shift, slope = prologue
            args = (scale, shift, depthwise_kernel, pointwise_kernel, b, acc_scale, d, _isa_code(None), 0,
                    float(slope))
        out = _ffi_sep_into(acc, x, *args, int(offset), bool(sums))
        return (out[0], *(lax.stop_gradient(t) for t in out[1:])) if sums else out
    y = separable_conv2d(x, depthwise_kernel, pointwise_kernel, bias, dilation, impl, prologue=prologue)
    out = acc.at[..., offset : offset + cout].add(y.astype(acc.dtype))
    if not sums:
        return out
    part = lax.stop_gradient(out[..., offset : offset + cout].astype(jnp.float32))
    return out, jnp.sum(part, axis=(1, 2)), jnp.sum(jnp.square(part), axis=(1, 2))


def batch_moments(y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(E[y], E[y**2]) over every axis but the last, in float32, shape (C,) each: the batch
    statistics of a BatchNorm over channels."""
    yf, axes = y.astype(jnp.float32), tuple(range(y.ndim - 1))
    return jnp.mean(yf, axes), jnp.mean(jnp.square(yf), axes)


@jax.custom_vjp
def batch_moments_from_sums(y: jax.Array, sums: jax.Array, sums_sq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`batch_moments(y)` from y's per-image sums: sums (B, C) over (H, W) of y and sums_sq of
    y**2 (float32, as `separable_conv2d_into(sums=True)` returns them, scaled per image and
    channel by whatever scaled y since, e.g. a spatial dropout's mask and its square) ->
    (E[y], E[y**2]) over (B, H, W), float32 (C,) each. No pass over y: y is read only by the
    gradient, which is that of `batch_moments(y)` (d mean / dy = 1 / count, d mean_sq / dy =
    2 y / count); sums and sums_sq get none."""
    count = np.float32(np.prod(y.shape[:-1]))
    return jnp.sum(sums, axis=0) / count, jnp.sum(sums_sq, axis=0) / count


def _moments_from_sums_fwd(y, sums, sums_sq):
    return batch_moments_from_sums(y, sums, sums_sq), (y, sums, sums_sq)


def _moments_from_sums_bwd(res, g):
    y, sums, sums_sq = res
    g1, g2 = g
    count = np.float32(np.prod(y.shape[:-1]))
    dy = g1 / count + y.astype(jnp.float32) * (2.0 * g2 / count)
    return dy.astype(y.dtype), jnp.zeros_like(sums), jnp.zeros_like(sums_sq)


batch_moments_from_sums.defvjp(_moments_from_sums_fwd, _moments_from_sums_bwd)


def stop_shortcut_gradient(outs: list, stop: bool) -> list:
    """A fan-out's results with the last one (its shortcut's y or (y, mean, mean_sq)) under
    stop_gradient when `stop` (shortcut_grad=False)."""
    if stop:
        outs[-1] = jax.lax.stop_gradient(outs[-1])
    return outs


def separable_conv2d_fanout(
    x: jax.Array,
    convs: list[tuple[jax.Array, jax.Array, jax.Array | None, int]],
    impl: str = "auto",
    *,
    prologue: tuple[jax.Array, jax.Array, float] | None = None,
    moments: bool = False,
    shortcut: tuple[jax.Array, jax.Array] | None = None,
    shortcut_grad: bool = True,
) -> list:
    """Several separable convolutions of the same input (and prologue):
    `[separable_conv2d(x, dw, pw, bias, d, impl, prologue=prologue) for dw, pw, bias, d in convs]`.

    Same values; with impl "ffi" one kernel call reads x once for all of them (the rows of
    the pre-activated input go through a ring in cache), and the backward produces one
    input gradient, each kernel after the first adding its contribution in place, instead
    of one full-size (B, H, W, Cin) gradient per convolution summed by XLA afterwards.

    shortcut: (kernel (Cin, L), bias (L,)) of a 1 x 1 convolution of the raw x (without
      the prologue: a residual block's shortcut), computed in the same pass; its result
      (y or (y, mean, mean_sq)) is appended to the list.
    shortcut_grad: False stops the gradient of the shortcut's result, for a caller that
      differentiates the shortcut itself (`crnet_jax.pointwise_bn`): the backward then
      neither keeps nor reads it.

    moments: return (y, mean, mean_sq) per convolution instead of y, the mean over (B, H, W)
      of y and of y**2 in float32, shape (Cout,) each (the statistics of a BatchNorm that
      follows; differentiable). For a bfloat16 x they are of the float32 result before it
      is rounded to bfloat16, so they differ slightly from moments of the returned y. With
      impl "ffi" the kernel sums them as it writes y, so no reduction pass over y is needed.
    """
    impl = default_implementation() if impl == "auto" else impl
    if shortcut is not None and shortcut[0].shape[0] != x.shape[-1]:
        raise ValueError(f"shortcut kernel {shortcut[0].shape} does not match {x.shape[-1]} input channels")
    if impl != "ffi":
        ys = [separable_conv2d(x, dw, pw, b, d, impl, prologue=prologue) for dw, pw, b, d in convs]
        if shortcut is not None:
            ys.append((jnp.einsum("bhwc,cl->bhwl", x, shortcut[0]) + shortcut[1]).astype(x.dtype))
        outs = [(y, *batch_moments(y)) for y in ys] if moments else ys
        return stop_shortcut_gradient(outs, shortcut is not None and not shortcut_grad)
    cin = x.shape[-1]
    _check_prologue(prologue, cin)
    weights, dilations = [], []
    for dw, pw, b, dilation in convs:
        if pw.shape[0] != cin:
            raise ValueError(f"pointwise kernel {pw.shape} does not match {cin} input channels")
        dilations.append(_ffi_ready(x, dw, dilation))
        weights.append((dw, pw, jnp.zeros((pw.shape[1],), pw.dtype) if b is None else b))
    if prologue is None:
        one = jnp.ones((cin,), jnp.float32)
        a, b_, slope = one, one, None
    else:
        a, b_, slope = prologue[0], prologue[1], float(prologue[2])
    outs = _ffi_sep_fanout(x, a, b_, tuple(weights), None if shortcut is None else tuple(shortcut), tuple(dilations),
                           _isa_code(None), 0, slope, bool(moments), bool(shortcut_grad))
    return stop_shortcut_gradient(list(outs), shortcut is not None and not shortcut_grad)
