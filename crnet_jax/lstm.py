"""The LSTM RES block of Res-CR-Net: bidirectional ConvLSTM scans over rows and columns.

Keras 2 semantics throughout (the authors' `ConvLSTM2D(1, (3, C), padding='same',
return_sequences=True, recurrent_dropout=0.1)` inside `Bidirectional`, merge 'concat'):

    i = hard_sigmoid(conv(x_t, K_i) + conv(h_i, U_i) + b_i)      hard_sigmoid(z) = clip(0.2 z + 0.5, 0, 1)
    f = hard_sigmoid(conv(x_t, K_f) + conv(h_f, U_f) + b_f)      (b_f initialised to 1)
    c = f * c + i * tanh(conv(x_t, K_c) + conv(h_c, U_c) + b_c)
    o = hard_sigmoid(conv(x_t, K_o) + conv(h_o, U_o) + b_o)
    h = o * tanh(c)

where h_g = h_{t-1} * m_g with recurrent-dropout masks m_g fixed over the sequence (training
only; one mask per gate, as Keras), and every conv is a 'same'-padded cross-correlation.
Keras kernels are (kh, kw, Cin, 4 * filters) with gates in the order i, f, c, o.

The block, for x (B, H, W, Cin):

    y  = LeakyReLU_0.1(Conv1x1_C(x))                          (B, H, W, C), C = num_classes
    e  = y[..., None]                                         (B, H, W, C, 1)
    r  = Bidirectional(ConvLSTM)(e)                           rows: time = H, plane (W, C)
    k  = Bidirectional(ConvLSTM)(e^T)^T                       columns: time = W, plane (H, C)
    out = y + sum_last_axis(r + k)                            (B, H, W, C)

so the output is y plus the sum of four hidden-state sequences (row forward, row backward,
column forward, column backward), each with its own weights.

Two implementations:

* `lstm_res_reference` follows the Keras graph literally (expand, transpose, a Python loop of
  `lax.conv` steps per direction). Slow; it is the oracle for tests.
* `lstm_res_scan` (used by `LSTMResBlock`) runs the four sequences in ONE `lax.scan`:

  - Stacking. The sequences are stacked on a leading axis S = 4 (row fwd, row bwd, col fwd,
    col bwd; the backward ones reversed in time before the scan and re-reversed after), each
    laid out (B, C, P) with the plane axis P last (P = W for rows, H for columns). When H != W
    all are zero-padded to T = P = max(H, W): time padding goes at the end of each (already
    reversed) sequence, so it never reaches a valid step; plane padding is zeroed by a 0/1
    multiplier on the recurrent input, which makes it act as the 'same' zero padding.
  - Banded convolution. The (3, C) 'same' convolution over a (P, C) plane with one channel is
    a band: out[g, j, p] = sum_{a, j'} U[a, j' - j + (C-1)//2, g] in[j', p + a - 1], i.e. 3C
    shifted multiply-adds per gate (`band_weights`, `_band_conv`) that XLA fuses into one
    vectorised loop; no lax.conv, no tiny matmul. Input and recurrent convolutions both run
    inside the step (precomputing the input part for all steps would write and re-read a
    T*S*B*4*C*P tensor, which costs more than the arithmetic on a memory-bound CPU).
  - Custom VJP (`recurrence`). The forward scan keeps only h and c per step; the reverse scan
    recomputes the gates, emits dL/dx per step and accumulates the kernel and bias gradients
    in its carry (batch sums as explicit adds: XLA-CPU reductions over a middle axis and tiny
    batched dots are several times slower than fused multiply-adds).
  - Prefetch. Per-step slices of (T, ...) arrays are read one step ahead into the carry (the
    backward scan also computes z one step ahead), because XLA-CPU fuses a dynamic-slice into
    every consumer loop and those run ~3x slower than loops over a carry buffer. This is also
    why unroll > 1 is slower here (the second unrolled step reads through fused slices); the
    default is 1.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from crnet_jax.config import ModelConfig
from crnet_jax.layers import PointwiseConv, leaky_relu

RECURRENT_DROPOUT = 0.1  # the authors' ConvLSTM2D(recurrent_dropout=0.1)
NUM_GATES = 4  # i, f, c, o (Keras order)
DEFAULT_UNROLL = 1  # >1 defeats the carry prefetch (see _recurrence_scan) and is slower on CPU


# ---------------------------------------------------------------------------------------------
# The cell (Keras ConvLSTM2D cell, generic shapes) and the literal reference.
# ---------------------------------------------------------------------------------------------


def hard_sigmoid(x: jax.Array) -> jax.Array:
    """Keras 2 hard_sigmoid: clip(0.2 x + 0.5, 0, 1)."""
    return jnp.clip(0.2 * x + 0.5, 0.0, 1.0)


def unit_forget_bias(filters: int, dtype=jnp.float32) -> jax.Array:
    """Keras ConvLSTM2D bias initialiser with unit_forget_bias: zeros, ones for the f gate. (4 filters,)."""
    return jnp.zeros((NUM_GATES * filters,), dtype).at[filters : 2 * filters].set(1.0)


class ConvLSTMCell(nnx.Module):
    """One direction of a Keras 2 ConvLSTM2D (activation tanh, recurrent activation
    hard_sigmoid, 'same' padding, stride 1).

    Parameters (Keras layout, gates i, f, c, o along the last axis):
      kernel (kh, kw, Cin, 4 * filters)            glorot_uniform
      recurrent_kernel (kh, kw, filters, 4 * filters)   orthogonal
      bias (4 * filters,)                          zeros, ones for the forget gate
    """

    def __init__(
        self,
        in_channels: int,
        filters: int,
        kernel_size: tuple[int, int],
        *,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kh, kw = kernel_size
        self.filters = filters
        glorot = jax.nn.initializers.glorot_uniform(in_axis=-2, out_axis=-1)
        orthogonal = jax.nn.initializers.orthogonal()
        self.kernel = nnx.Param(glorot(rngs.params(), (kh, kw, in_channels, NUM_GATES * filters), param_dtype))
        self.recurrent_kernel = nnx.Param(orthogonal(rngs.params(), (kh, kw, filters, NUM_GATES * filters), param_dtype))
        self.bias = nnx.Param(unit_forget_bias(filters, param_dtype))

    def params(self) -> dict[str, jax.Array]:
        return {"kernel": self.kernel[...], "recurrent_kernel": self.recurrent_kernel[...], "bias": self.bias[...]}


def _conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """'same' cross-correlation (TF padding convention): (B, R, Q, Cin) x (kh, kw, Cin, N) -> (B, R, Q, N)."""
    return lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )


def convlstm_step(
    params: dict[str, jax.Array],
    carry: tuple[jax.Array, jax.Array],
    x_t: jax.Array,
    rec_masks: jax.Array | None = None,
) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """One Keras ConvLSTM2D step.

    Args:
      params: kernel (kh, kw, Cin, 4F), recurrent_kernel (kh, kw, F, 4F), bias (4F,).
      carry: (h, c), each (B, R, Q, F).
      x_t: (B, R, Q, Cin).
      rec_masks: None or (4, B, R, Q, F) recurrent-dropout multipliers, one per gate i, f, c, o.
    Returns:
      ((h, c), h), h and c (B, R, Q, F).
    """
    h, c = carry
    kx = jnp.split(params["kernel"], NUM_GATES, axis=-1)
    kh = jnp.split(params["recurrent_kernel"], NUM_GATES, axis=-1)
    b = jnp.split(params["bias"], NUM_GATES)
    hs = [h] * NUM_GATES if rec_masks is None else [h * rec_masks[g] for g in range(NUM_GATES)]
    z = [_conv_same(x_t, kx[g]) + b[g] + _conv_same(hs[g], kh[g]) for g in range(NUM_GATES)]
    i, fg, o = hard_sigmoid(z[0]), hard_sigmoid(z[1]), hard_sigmoid(z[3])
    c = fg * c + i * jnp.tanh(z[2])
    h = o * jnp.tanh(c)
    return (h, c), h


def convlstm_loop(
    params: dict[str, jax.Array], x: jax.Array, *, reverse: bool = False, rec_masks: jax.Array | None = None
) -> jax.Array:
    """Keras ConvLSTM2D(return_sequences=True) as a plain Python loop (test oracle).

    x (B, T, R, Q, Cin) -> h sequence (B, T, R, Q, F). With reverse=True the sequence is read
    from the end (Keras go_backwards) and the outputs are returned in reading order.
    """
    bsz, steps, r, q, _ = x.shape
    f = params["bias"].shape[0] // NUM_GATES
    carry = (jnp.zeros((bsz, r, q, f), x.dtype), jnp.zeros((bsz, r, q, f), x.dtype))
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    out = []
    for t in order:
        carry, h = convlstm_step(params, carry, x[:, t], rec_masks)
        out.append(h)
    return jnp.stack(out, axis=1)


def bidirectional_loop(
    fwd: dict[str, jax.Array],
    bwd: dict[str, jax.Array],
    x: jax.Array,
    masks: tuple[jax.Array | None, jax.Array | None] = (None, None),
) -> jax.Array:
    """Keras Bidirectional(ConvLSTM2D, merge_mode='concat', return_sequences=True), loop form.

    x (B, T, R, Q, Cin) -> (B, T, R, Q, 2F): forward outputs, then the backward outputs
    re-reversed to align with the input's time axis.
    """
    yf = convlstm_loop(fwd, x, rec_masks=masks[0])
    yb = convlstm_loop(bwd, x, reverse=True, rec_masks=masks[1])[:, ::-1]
    return jnp.concatenate([yf, yb], axis=-1)


def lstm_res_reference(
    y: jax.Array,
    rows: tuple[dict[str, jax.Array], dict[str, jax.Array]],
    cols: tuple[dict[str, jax.Array], dict[str, jax.Array]],
    masks: jax.Array | None = None,
) -> jax.Array:
    """The recurrent part of the LSTM RES block, literally as the Keras graph (test oracle).

    Args:
      y: (B, H, W, C) the block's LeakyReLU(Conv1x1) output.
      rows, cols: (forward, backward) ConvLSTM parameters of the row and column scans.
      masks: None, or a tuple (row_masks (2, 4, B, W, C), col_masks (2, 4, B, H, C)) of
        recurrent-dropout multipliers per direction and gate.
    Returns:
      y + sum over the last axis of (row scan + column scan): (B, H, W, C).
    """
    e = y[..., None]  # (B, H, W, C, 1)
    rm = (None, None) if masks is None else (masks[0][0][..., None], masks[0][1][..., None])
    cm = (None, None) if masks is None else (masks[1][0][..., None], masks[1][1][..., None])
    o3 = bidirectional_loop(*rows, e, rm)
    o3t = jnp.transpose(bidirectional_loop(*cols, jnp.transpose(e, (0, 2, 1, 3, 4)), cm), (0, 2, 1, 3, 4))
    return y + jnp.sum(o3 + o3t, axis=-1)


# ---------------------------------------------------------------------------------------------
# The fused scan.
# ---------------------------------------------------------------------------------------------


def band_weights(kernel: jax.Array) -> jax.Array:
    """Turn (S, 3, C, 4) kernels of (3, C)-'same' convolutions over a (P, C) plane into bands.

    Returns (S, 3, C_in, 4, C_out) with band[s, a, j', g, j] = kernel[s, a, j' - j + (C-1)//2, g]
    where that column exists and 0 elsewhere, so that
    out[s, g, j, p] = sum_{a, j'} band[s, a, j', g, j] * in[s, j', p + a - 1].
    """
    s, kh, c, g = kernel.shape
    left = (c - 1) // 2
    jin = jnp.arange(c)[:, None]
    jout = jnp.arange(c)[None, :]
    col = jin - jout + left  # (C_in, C_out) kernel column used, or out of range
    valid = (col >= 0) & (col < c)
    taken = kernel[:, :, jnp.clip(col, 0, c - 1), :]  # (S, 3, C_in, C_out, 4)
    taken = jnp.where(valid[None, None, :, :, None], taken, 0.0)
    return jnp.transpose(taken, (0, 1, 2, 4, 3))


def _band_conv(h: jax.Array, band: jax.Array) -> jax.Array:
    """Banded (3, C) 'same' convolution as 3C shifted multiply-adds.

    h: (..., S, B, G, C, P) with G = 1 (one input shared by all gates) or 4 (one per gate);
    band: (S, 3, C, 4, C). Returns (..., S, B, 4, C, P).
    """
    c = h.shape[-2]
    pad = [(0, 0)] * (h.ndim - 1) + [(1, 1)]
    hp = jnp.pad(h, pad)
    p = h.shape[-1]
    out = None
    for a in range(3):
        ha = hp[..., a : a + p]  # in[p + a - 1]
        for j in range(c):
            # (..., S, B, G, 1, P) * (S, 1, 4, C, 1)
            term = ha[..., j : j + 1, :] * band[:, a, j][:, None, :, :, None]
            out = term if out is None else out + term
    return out


def _hard_sigmoid_grad(z: jax.Array) -> jax.Array:
    """d hard_sigmoid / dz: 0.2 inside (-2.5, 2.5), 0 outside."""
    return jnp.where(jnp.abs(z) < 2.5, 0.2, 0.0).astype(z.dtype)


def _band_conv_t(dz: jax.Array, band: jax.Array, per_gate: bool) -> jax.Array:
    """Transpose of `_band_conv` with respect to its input.

    dz: (S, B, 4, C, P); band: (S, 3, C, 4, C). Returns (S, B, 4, C, P) if per_gate (one input
    per gate), else (S, B, 1, C, P) (one input shared by the gates, summed over them):

        out[s, b, g|0, j', q] = sum_{a, (g,) j} band[s, a, j', g, j] dz[s, b, g, j, q - a + 1]

    Written as explicit multiply-adds of shifted slices of dz (no reductions), which XLA fuses
    into one loop.
    """
    c, p = dz.shape[-2], dz.shape[-1]
    dzp = jnp.pad(dz, [(0, 0)] * 4 + [(1, 1)])
    out = None
    for a in range(3):
        da = dzp[..., 2 - a : 2 - a + p]  # dz[q - a + 1]
        for j in range(c):
            if per_gate:  # (S, B, 4, 1, P) * (S, 1, 4, C, 1)
                terms = [da[:, :, :, j : j + 1, :] * jnp.swapaxes(band[:, a, :, :, j], 1, 2)[:, None, :, :, None]]
            else:  # (S, B, 1, 1, P) * (S, 1, 1, C, 1) for each gate
                terms = [da[:, :, g : g + 1, j : j + 1, :] * band[:, a, :, g, j][:, None, None, :, None] for g in range(NUM_GATES)]
            for term in terms:
                out = term if out is None else out + term
    return out


def _sum_gates(v: jax.Array) -> jax.Array:
    """(S, B, G, C, P) -> (S, B, C, P), sum over G as explicit adds (no reduction op)."""
    out = v[:, :, 0]
    for g in range(1, v.shape[2]):
        out = out + v[:, :, g]
    return out


def _gates(z: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """z (..., 4, C, P) pre-activations (i, f, c, o), c (..., C, P) -> (h, c)."""
    i = hard_sigmoid(z[..., 0, :, :])
    f = hard_sigmoid(z[..., 1, :, :])
    o = hard_sigmoid(z[..., 3, :, :])
    c = f * c + i * jnp.tanh(z[..., 2, :, :])
    return o * jnp.tanh(c), c


def _recurrent_input(h: jax.Array, mult: jax.Array | None) -> jax.Array:
    """h (..., S, B, C, P) -> what the recurrent convolution reads, (..., S, B, 1|4, C, P)."""
    h = jnp.expand_dims(h, -3)
    return h if mult is None else h * mult


def _preactivations(x_t, h_prev, kband, bias, uband, mult) -> jax.Array:
    """z = conv(x_t, K) + conv(h_prev [* masks], U) + b: (S, B, 4, C, P) for x_t, h_prev (S, B, C, P)."""
    return (
        _band_conv(x_t[:, :, None], kband)
        + _band_conv(_recurrent_input(h_prev, mult), uband)
        + bias[:, None, :, None, None]
    )


def _shifted(v: jax.Array) -> list[jax.Array]:
    """The three inputs a (3, C) band reads along P: [v[p - 1], v[p], v[p + 1]] (zero outside)."""
    p = v.shape[-1]
    vp = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(1, 1)])
    return [vp[..., a : a + p] for a in range(3)]


def _accumulate(acc: tuple[jax.Array, ...], dz: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
    """acc[a][s, g, j, k, p] += sum_b dz[s, b, g, j, p] * v[s, b, g|0, k, p + a - 1], a = 0, 1, 2.

    acc: 3 arrays (S, 4, C, C, P); dz (S, B, 4, C, P); v (S, B, 1|4, C, P). The sum over the
    batch is written as B explicit multiply-adds: XLA fuses them into one vectorised loop,
    where a reduction over a middle axis (or a tiny batched dot) is several times slower on CPU.
    """
    out = []
    for acc_a, v_a in zip(acc, _shifted(v)):
        for b in range(dz.shape[1]):
            acc_a = acc_a + dz[:, b, :, :, None, :] * v_a[:, b, :, None, :, :]
        out.append(acc_a)
    return tuple(out)


def _acc_to_band(acc: tuple[jax.Array, ...]) -> jax.Array:
    """3 accumulators (S, 4, C_out, C_in, P) -> band gradient (S, 3, C_in, 4, C_out)."""
    return jnp.stack([jnp.transpose(jnp.sum(a, axis=-1), (0, 3, 1, 2)) for a in acc], axis=1)


def _at(a: jax.Array, t: jax.Array) -> jax.Array:
    """a[t] along the leading axis, zeros for t outside [0, len(a))."""
    v = lax.dynamic_index_in_dim(a, jnp.clip(t, 0, a.shape[0] - 1), keepdims=False)
    return jnp.where((t >= 0) & (t < a.shape[0]), v, jnp.zeros_like(v))


# Every per-step slice of a (T, ...) array is read one step ahead into the scan carry ("prefetch")
# instead of being sliced where it is used: on CPU, XLA fuses a dynamic-slice into each consumer
# fusion and those loops run about 3x slower than on a materialised carry buffer.


def _recurrence_scan(unroll, xs, kband, bias, uband, mult) -> tuple[jax.Array, jax.Array]:
    """Forward recurrence; returns hidden and cell states (T, S, B, C, P) in reading order."""

    def step(carry, t):
        h, c, x_t = carry
        h, c = _gates(_preactivations(x_t, h, kband, bias, uband, mult), c)
        return (h, c, _at(xs, t + 1)), (h, c)

    zeros = jnp.zeros(xs.shape[1:], xs.dtype)
    _, (hs, cs) = lax.scan(step, (zeros, zeros, xs[0]), jnp.arange(xs.shape[0]), unroll=unroll)
    return hs, cs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def recurrence(
    unroll: int, xs: jax.Array, kband: jax.Array, bias: jax.Array, uband: jax.Array, mult: jax.Array | None
) -> jax.Array:
    """Hidden states of S independent single-filter ConvLSTM sequences over (P, C) planes.

    Args:
      unroll: `lax.scan` unroll factor.
      xs: (T, S, B, C, P) inputs in reading order.
      kband, uband: (S, 3, C, 4, C) input and recurrent kernels as bands (`band_weights`).
      bias: (S, 4) per sequence and gate.
      mult: None, or (S, B|1, 1|4, C|1, P) multipliers of h_{t-1} (recurrent dropout per gate
        and/or 0/1 plane padding). Treated as a constant (zero cotangent).
    Returns:
      hs (T, S, B, C, P).

    Memory traffic, not arithmetic, bounds this on CPU, so nothing of size T*S*B*4*C*P is ever
    stored: the input convolution runs inside the step, the forward pass keeps only h and c
    (2 T*S*B*C*P floats), and the reverse scan of the custom VJP recomputes the gates, emits
    dL/dx per step and accumulates the kernel and bias gradients in its carry.
    """
    return _recurrence_scan(unroll, xs, kband, bias, uband, mult)[0]


def _recurrence_fwd(unroll, xs, kband, bias, uband, mult):
    hs, cs = _recurrence_scan(unroll, xs, kband, bias, uband, mult)
    return hs, (xs, kband, bias, uband, mult, hs, cs)


def _recurrence_bwd(unroll, res, g):
    xs, kband, bias, uband, mult, hs, cs = res
    steps, s, b, c, p = xs.shape
    per_gate = mult is not None and mult.shape[2] == NUM_GATES

    def load(t: jax.Array) -> tuple[jax.Array, ...]:
        """What step t reads: x_t, h_{t-1}, c_{t-1}, c_t, dL/dh_t."""
        return _at(xs, t), _at(hs, t - 1), _at(cs, t - 1), _at(cs, t), _at(g, t)

    def preact(loaded: tuple[jax.Array, ...]) -> jax.Array:
        return _preactivations(loaded[0], loaded[1], kband, bias, uband, mult)

    # A two-stage pipeline: the iteration for step t uses z_t computed by the previous iteration
    # (so z is a carry buffer, materialised once instead of being recomputed inside each fusion
    # that reads it) and the inputs of step t - 1 loaded by the previous iteration.
    def step(carry, t):
        dh, dc, acc_k, acc_u, acc_b, z, cur, nxt = carry
        x_t, h_prev, c_prev, c_t, g_t = cur
        zi, zf, zc, zo = z[:, :, 0], z[:, :, 1], z[:, :, 2], z[:, :, 3]
        i, f, o, gc = hard_sigmoid(zi), hard_sigmoid(zf), hard_sigmoid(zo), jnp.tanh(zc)
        tc = jnp.tanh(c_t)
        dh = dh + g_t
        dct = dc + dh * o * (1.0 - tc * tc)
        dz = jnp.stack(
            [
                dct * gc * _hard_sigmoid_grad(zi),
                dct * c_prev * _hard_sigmoid_grad(zf),
                dct * i * (1.0 - gc * gc),
                dh * tc * _hard_sigmoid_grad(zo),
            ],
            axis=2,
        )  # (S, B, 4, C, P)
        dx = _band_conv_t(dz, kband, per_gate=False)[:, :, 0]
        dhin = _band_conv_t(dz, uband, per_gate)
        dh_prev = _sum_gates(dhin if mult is None else dhin * mult)
        acc_k = _accumulate(acc_k, dz, x_t[:, :, None])
        acc_u = _accumulate(acc_u, dz, _recurrent_input(h_prev, mult))
        for i_b in range(b):
            acc_b = acc_b + dz[:, i_b]
        return (dh_prev, dct * f, acc_k, acc_u, acc_b, preact(nxt), nxt, load(t - 2)), dx

    last = steps - 1
    zeros = jnp.zeros((s, b, c, p), xs.dtype)
    acc = (jnp.zeros((s, NUM_GATES, c, c, p), xs.dtype),) * 3
    cur = load(jnp.asarray(last))
    init = (zeros, zeros, acc, acc, jnp.zeros((s, NUM_GATES, c, p), xs.dtype), preact(cur), cur, load(jnp.asarray(last - 1)))
    (_, _, acc_k, acc_u, acc_b, *_), dxs = lax.scan(step, init, jnp.arange(steps), reverse=True, unroll=unroll)
    dmult = None if mult is None else jnp.zeros_like(mult)
    return dxs, _acc_to_band(acc_k), jnp.sum(acc_b, axis=(2, 3)), _acc_to_band(acc_u), dmult


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def _to_sequences(y: jax.Array, size: int) -> jax.Array:
    """(B, H, W, C) -> (T, 4, B, C, P) with T = P = size: row fwd, row bwd, col fwd, col bwd,
    each zero-padded at the end of its (reading-order) time axis and of its plane axis."""
    _, h, w, _ = y.shape
    rows = jnp.transpose(y, (1, 0, 3, 2))  # (H, B, C, W): time = H, plane = W
    cols = jnp.transpose(y, (2, 0, 3, 1))  # (W, B, C, H): time = W, plane = H

    def pad(s: jax.Array) -> jax.Array:
        return jnp.pad(s, ((0, size - s.shape[0]), (0, 0), (0, 0), (0, size - s.shape[-1])))

    return jnp.stack([pad(rows), pad(rows[::-1]), pad(cols), pad(cols[::-1])], axis=1)


def _from_sequences(hs: jax.Array, h: int, w: int) -> jax.Array:
    """(T, 4, B, C, P) hidden states in reading order -> (B, H, W, C), the sum of the four,
    each put back on the image grid."""
    rf = hs[:h, 0, :, :, :w]
    rb = hs[:h, 1, :, :, :w][::-1]
    cf = hs[:w, 2, :, :, :h]
    cb = hs[:w, 3, :, :, :h][::-1]
    rows = jnp.transpose(rf + rb, (1, 0, 3, 2))  # (H, B, C, W) -> (B, H, W, C)
    cols = jnp.transpose(cf + cb, (1, 3, 0, 2))  # (W, B, C, H) -> (B, H, W, C)
    return rows + cols


def recurrent_multipliers(
    masks: tuple[jax.Array, jax.Array] | None, h: int, w: int, size: int, dtype=jnp.float32
) -> jax.Array | None:
    """What the recurrent input h_{t-1} is multiplied by in the fused scan, (4, B|1, 4|1, C|1, P),
    or None when nothing is needed (inference with H == W).

    masks: None (inference) or (row_masks (2, 4, B, W, C), col_masks (2, 4, B, H, C)) dropout
    multipliers. Zero columns beyond each sequence's plane size emulate 'same' zero padding.
    """
    if masks is None:
        if h == w:
            return None
        m = jnp.stack([jnp.arange(size) < w] * 2 + [jnp.arange(size) < h] * 2).astype(dtype)  # (4, P)
        return m[:, None, None, None, :]
    row, col = masks
    row = jnp.transpose(row, (0, 2, 1, 4, 3))  # (2, B, 4, C, W)
    col = jnp.transpose(col, (0, 2, 1, 4, 3))  # (2, B, 4, C, H)
    pad = lambda m: jnp.pad(m, ((0, 0),) * 4 + ((0, size - m.shape[-1]),))  # noqa: E731
    return jnp.concatenate([pad(row), pad(col)], axis=0).astype(dtype)


@functools.partial(jax.jit, static_argnames=("unroll", "custom_vjp"))
def lstm_res_scan(
    y: jax.Array,
    kernel: jax.Array,
    recurrent_kernel: jax.Array,
    bias: jax.Array,
    masks: tuple[jax.Array, jax.Array] | None = None,
    *,
    unroll: int = DEFAULT_UNROLL,
    custom_vjp: bool = True,
) -> jax.Array:
    """The recurrent part of the LSTM RES block, four sequences in one `lax.scan`.

    Args:
      y: (B, H, W, C) block activations (LeakyReLU(Conv1x1) output).
      kernel, recurrent_kernel: (4, 3, C, 4) per sequence (row fwd, row bwd, col fwd, col bwd):
        the Keras (3, C, 1, 4) kernels with the channel axis dropped.
      bias: (4, 4) per sequence and gate.
      masks: None (inference) or recurrent-dropout multipliers (row (2, 4, B, W, C), col (2, 4, B, H, C)).
      unroll: `lax.scan` unroll factor.
      custom_vjp: differentiate with `recurrence`'s hand-written VJP (False: JAX's scan autodiff).
    Returns:
      y + sum of the four hidden-state sequences on the image grid, (B, H, W, C), float32
      (float64 for float64 input).
    """
    dtype = jnp.promote_types(y.dtype, jnp.float32)  # float32, or float64 under x64
    y = y.astype(dtype)
    _, h, w, _ = y.shape
    size = max(h, w)
    xs = _to_sequences(y, size)  # (T, S, B, C, P)
    kband = band_weights(kernel.astype(dtype))
    uband = band_weights(recurrent_kernel.astype(dtype))
    mult = recurrent_multipliers(masks, h, w, size, dtype)
    args = (unroll, xs, kband, bias.astype(dtype), uband, mult)
    hs = recurrence(*args) if custom_vjp else _recurrence_scan(*args)[0]
    return y + _from_sequences(hs, h, w)


# ---------------------------------------------------------------------------------------------
# Modules.
# ---------------------------------------------------------------------------------------------


class BidirectionalConvLSTM(nnx.Module):
    """Keras Bidirectional(ConvLSTM2D(filters, kernel, padding='same', return_sequences=True)):
    a forward and a backward cell with separate weights."""

    def __init__(self, in_channels: int, filters: int, kernel_size: tuple[int, int], *, param_dtype, rngs: nnx.Rngs):
        self.forward = ConvLSTMCell(in_channels, filters, kernel_size, param_dtype=param_dtype, rngs=rngs)
        self.backward = ConvLSTMCell(in_channels, filters, kernel_size, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, masks: tuple[jax.Array | None, jax.Array | None] = (None, None)) -> jax.Array:
        """x (B, T, R, Q, Cin) -> (B, T, R, Q, 2F) (loop form; the block uses the fused scan)."""
        return bidirectional_loop(self.forward.params(), self.backward.params(), x, masks)


class LSTMResBlock(nnx.Module):
    """LSTM RES block: Conv1x1(num_classes) -> LeakyReLU -> bidirectional ConvLSTM row and
    column scans (kernel (3, num_classes), one filter), summed and added back.

    Call: (B, H, W, in_features) -> (B, H, W, num_classes), any H x W. Recurrent dropout
    (rate `recurrent_dropout`, masks fixed over each sequence) is active in training mode only
    (`model.train()` / `model.eval()` set `deterministic`). The scans run in float32 whatever
    cfg.dtype; the output has cfg.dtype.
    """

    def __init__(
        self,
        in_features: int,
        cfg: ModelConfig,
        *,
        recurrent_dropout: float = RECURRENT_DROPOUT,
        unroll: int = DEFAULT_UNROLL,
        rngs: nnx.Rngs,
    ):
        nc = cfg.num_classes
        dtypes = {"dtype": jnp.dtype(cfg.dtype), "param_dtype": jnp.dtype(cfg.param_dtype)}
        self.dtype = dtypes["dtype"]
        self.slope = cfg.leaky_slope
        self.recurrent_dropout = recurrent_dropout
        self.unroll = unroll
        self.deterministic = False
        self.conv = PointwiseConv(in_features, nc, impl=cfg.depthwise_impl, rngs=rngs, **dtypes)
        self.rows = BidirectionalConvLSTM(1, 1, (3, nc), param_dtype=dtypes["param_dtype"], rngs=rngs)
        self.cols = BidirectionalConvLSTM(1, 1, (3, nc), param_dtype=dtypes["param_dtype"], rngs=rngs)
        self.rngs = rngs["dropout"].fork()

    def cells(self) -> list[ConvLSTMCell]:
        """The four cells in fused-scan order: row forward, row backward, column forward, column backward."""
        return [self.rows.forward, self.rows.backward, self.cols.forward, self.cols.backward]

    def stacked_params(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """kernel (4, 3, C, 4), recurrent_kernel (4, 3, C, 4), bias (4, 4) in fused-scan order."""
        cells = self.cells()
        k = jnp.stack([cell.kernel[...][:, :, 0, :] for cell in cells])
        u = jnp.stack([cell.recurrent_kernel[...][:, :, 0, :] for cell in cells])
        b = jnp.stack([cell.bias[...] for cell in cells])
        return k, u, b

    def dropout_masks(self, key: jax.Array, batch: int, h: int, w: int) -> tuple[jax.Array, jax.Array]:
        """Recurrent-dropout multipliers (0 or 1/(1-rate)): rows (2, 4, B, W, C), cols (2, 4, B, H, C)."""
        nc = self.rows.forward.kernel.shape[1]
        keep = 1.0 - self.recurrent_dropout
        kr, kc = jax.random.split(key)
        row = jax.random.bernoulli(kr, keep, (2, NUM_GATES, batch, w, nc)) / keep
        col = jax.random.bernoulli(kc, keep, (2, NUM_GATES, batch, h, nc)) / keep
        return row.astype(jnp.float32), col.astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = leaky_relu(self.conv(x), self.slope)
        masks = None
        if not self.deterministic and self.recurrent_dropout > 0.0:
            b, h, w, _ = y.shape
            masks = self.dropout_masks(self.rngs(), b, h, w)
        out = lstm_res_scan(y, *self.stacked_params(), masks, unroll=self.unroll)
        return out.astype(self.dtype)
