"""Depthwise atrous convolution: every implementation against the XLA grouped-conv reference,
in value and in both gradients, plus the fused separable convolution, vmap, dtypes, selection
and the benchmark's smoke run."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crnet_jax import _ffi
from crnet_jax import depthwise as dw
from isa_helpers import require_isa, use_isa

REPO = pathlib.Path(__file__).resolve().parents[1]

needs_ffi = pytest.mark.skipif(
    not _ffi.available(), reason=f"C++ FFI extension not built: {_ffi.unavailable_reason()}"
)


# (impl, isa): the pure-JAX fallback, and the C++ kernels on every instruction set this CPU runs.
IMPLS = [pytest.param(("shift", None), id="shift")] + [
    pytest.param(("ffi", isa), id=f"ffi-{isa}", marks=needs_ffi) for isa in ["baseline", "avx2", "avx512"]
]


def _conv(impl_isa, x, w, d):
    impl, isa = impl_isa
    if impl == "ffi":
        require_isa(isa)
        return dw.depthwise_conv2d_ffi(x, w, d, isa=isa)
    return dw.depthwise_conv2d(x, w, d, impl)


def _ref(x, w, d):
    return dw.depthwise_conv2d(x.astype(jnp.float32), w.astype(jnp.float32), d, "xla")


def _rand(rng: np.random.Generator, shape, dtype=jnp.float32):
    """Fresh standard-normal input (NumPy: no per-shape compilation as with jax.random)."""
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype)


def _value_and_vjp(f, args, ct):
    """(f(*args), *gradients of <f(*args), ct> with respect to every argument)."""
    y, vjp = jax.vjp(f, *args)
    return (y,) + vjp(ct)


def _close(actual, expected, tol, name=""):
    """|a - e| <= tol * (max |e| + 1) elementwise, compared in float32."""
    a = np.asarray(jnp.asarray(actual, jnp.float32))
    e = np.asarray(jnp.asarray(expected, jnp.float32))
    chex.assert_equal_shape([a, e])
    scale = float(np.max(np.abs(e))) + 1.0 if e.size else 1.0
    chex.assert_trees_all_close(a, e, atol=tol * scale, rtol=0.0, custom_message=name)


def _value_and_grads(fn, x, w, d, ct):
    y, vjp = jax.vjp(lambda x_, w_: fn(x_, w_, d), x, w)
    gx, gw = vjp(ct.astype(y.dtype))
    return y, gx, gw


_xla_value_and_grads = jax.jit(lambda x, w, d, ct: _value_and_grads(_ref, x, w, d, ct), static_argnums=2)


def _ref_value_and_grads(x, w, d, ct):
    """Float64 NumPy reference: y, dx (as the scatter-transpose of the forward, not the
    flipped-kernel trick the implementations use) and dw. Anchored to the XLA grouped
    convolution by test_numpy_reference_matches_xla; compiles nothing, so the test run
    stays short."""
    x, w, ct = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (x, w, ct))
    b, h, wd, c = x.shape
    k = w.shape[0]
    p = d * (k // 2)
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    y = np.zeros_like(x)
    dxp = np.zeros_like(xp)
    dw_ = np.zeros_like(w)
    for u in range(k):
        for v in range(k):
            sl = (slice(None), slice(u * d, u * d + h), slice(v * d, v * d + wd), slice(None))
            y += xp[sl] * w[u, v]
            dxp[sl] += ct * w[u, v]
            dw_[u, v] = np.sum(xp[sl] * ct, axis=(0, 1, 2))
    return y, dxp[:, p : p + h, p : p + wd, :], dw_


# (B, H, W, C, k, d): odd and even sizes, images smaller than the dilated kernel reach
# (r*d = 1, 6, 15), batch 1 and 3, channels 1, 16, 48 and a few awkward ones.
CASES = [
    (1, 9, 10, 16, 3, 1),
    (3, 8, 7, 48, 3, 1),
    (3, 11, 12, 1, 3, 1),
    (1, 2, 1, 16, 3, 1),
    (1, 17, 20, 16, 5, 3),
    (3, 10, 9, 1, 5, 3),
    (1, 5, 4, 48, 5, 3),
    (1, 34, 37, 48, 7, 5),
    (3, 12, 13, 16, 7, 5),
    (1, 9, 40, 1, 7, 5),
    (3, 6, 31, 1, 7, 5),
    (1, 7, 6, 20, 7, 5),
    (2, 9, 11, 3, 3, 2),
    (2, 7, 8, 33, 5, 1),
]


# The pure-JAX version compiles slowly (~0.5 s per case): a representative subset.
SHIFT_CASES = [CASES[i] for i in (1, 3, 5, 7, 11, 12)]
PAIRS = [pytest.param(impl.values[0], case, id=f"{impl.id}-" + "B{}H{}W{}C{}k{}d{}".format(*case), marks=impl.marks)
         for impl in IMPLS for case in (SHIFT_CASES if impl.id == "shift" else CASES)]


@pytest.mark.parametrize("impl,case", PAIRS)
def test_matches_reference_f32(impl, case):
    b, h, w_, c, k, d = case
    kx = kw = kc = np.random.default_rng(hash(case) % 2**31)
    x, w, ct = _rand(kx, (b, h, w_, c)), _rand(kw, (k, k, c)), _rand(kc, (b, h, w_, c))
    ry, rgx, rgw = _ref_value_and_grads(x, w, d, ct)
    y, gx, gw = jax.jit(lambda x, w, ct: _value_and_grads(lambda *a: _conv(impl, *a), x, w, d, ct))(x, w, ct)
    assert y.dtype == jnp.float32 and gx.dtype == jnp.float32 and gw.dtype == jnp.float32
    _close(y, ry, 1e-5, "y")
    _close(gx, rgx, 1e-5, "dx")
    _close(gw, rgw, 1e-5, "dw")


@pytest.mark.parametrize("case", [CASES[1], CASES[7], CASES[9]], ids=lambda c: "B{}H{}W{}C{}k{}d{}".format(*c))
def test_numpy_reference_matches_xla(case):
    b, h, w_, c, k, d = case
    kx = kw = kc = np.random.default_rng(1)
    x, w, ct = _rand(kx, (b, h, w_, c)), _rand(kw, (k, k, c)), _rand(kc, (b, h, w_, c))
    for got, want in zip(_ref_value_and_grads(x, w, d, ct), _xla_value_and_grads(x, w, d, ct)):
        _close(got, want, 1e-5)


@pytest.mark.parametrize("impl", [pytest.param(("shift", None), id="shift"), pytest.param(("ffi", None), id="ffi", marks=needs_ffi)])
@pytest.mark.parametrize("c,k,d", [(16, 3, 1), (48, 7, 5), (1, 5, 3)])
def test_bfloat16(impl, c, k, d):
    if impl[0] == "shift" and c == 1:
        pytest.skip("covered by the other shift cases (keeps the default run short)")
    kx = kw = kc = np.random.default_rng(c * 100 + k)
    x, w, ct = (_rand(kx, (2, 13, 14, c), jnp.bfloat16), _rand(kw, (k, k, c), jnp.bfloat16),
                _rand(kc, (2, 13, 14, c), jnp.bfloat16))
    ry, rgx, rgw = _ref_value_and_grads(x, w, d, ct)
    fn = (lambda x, w, d: dw.depthwise_conv2d(x, w, d, impl[0]))
    y, gx, gw = jax.jit(lambda x, w, ct: _value_and_grads(fn, x, w, d, ct))(x, w, ct)
    assert y.dtype == jnp.bfloat16 and gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    # inputs are exact in bf16, accumulation is float32: only the final rounding differs
    _close(y, ry, 1e-2, "y")
    _close(gx, rgx, 1e-2, "dx")
    _close(gw, rgw, 1e-2, "dw")


@pytest.mark.parametrize("impl", [pytest.param("shift"), pytest.param("ffi", marks=needs_ffi)])
def test_vmap_over_input_and_kernel(impl):
    k, d, c = (5, 3, 16) if impl == "ffi" else (3, 1, 16)
    kx = kw = kc = np.random.default_rng(7)
    x = _rand(kx, (3, 2, 11, 10, c))  # vmapped axis of 3 over a batch of 2
    ws = _rand(kw, (3, k, k, c))
    ct = _rand(kc, x.shape)

    def loss(x, w, ct, fn):
        return jnp.sum(fn(x, w, d) * ct)

    fn = lambda x, w, d: dw.depthwise_conv2d(x, w, d, impl)
    # shared kernel
    got = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None, 0, None), out_axes=0), static_argnums=3)(x, ws[0], ct, fn)
    ref_grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=3)
    want = [ref_grad(x[i], ws[0], ct[i], _ref) for i in range(3)]
    for i in range(3):
        _close(got[0][i], want[i][0], 1e-5, "dx shared")
        _close(got[1][i], want[i][1], 1e-5, "dw shared")
    # per-example kernels, value and gradients
    y = jax.jit(jax.vmap(lambda x, w: fn(x, w, d)))(x, ws)
    got = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, 0, 0, None)), static_argnums=3)(x, ws, ct, fn)
    for i in range(3):
        _close(y[i], _ref(x[i], ws[i], d), 1e-5, "y per-example")
        want = ref_grad(x[i], ws[i], ct[i], _ref)
        _close(got[0][i], want[0], 1e-5, "dx per-example")
        _close(got[1][i], want[1], 1e-5, "dw per-example")
    # kernel mapped, input shared
    y = jax.jit(jax.vmap(lambda w: fn(x[0], w, d)))(ws)
    for i in range(3):
        _close(y[i], _ref(x[0], ws[i], d), 1e-5, "y kernel-only")


# ---------------------------------------------------------------------------------------
# Separable convolution (fused C++ kernel for impl="ffi")
# ---------------------------------------------------------------------------------------
def _sep_ref(x, wd, wp, b, d):
    return dw.separable_conv2d(x, wd, wp, b, d, "xla")


def _np_sep(x, wd, wp, b, d, ct):
    """Float64 NumPy separable convolution: (y, dx, d_depthwise, d_pointwise, d_bias) for cotangent ct."""
    wp64 = np.asarray(wp, np.float64)
    ydw, _, _ = _ref_value_and_grads(x, wd, d, np.zeros(np.shape(x), np.float32))
    ct = np.asarray(jnp.asarray(ct, jnp.float32), np.float64)
    y = ydw @ wp64 + (0.0 if b is None else np.asarray(b, np.float64))
    g = ct @ wp64.T
    _, dx, dwd = _ref_value_and_grads(x, wd, d, g)
    dwp = np.einsum("bhwc,bhwo->co", ydw, ct)
    return y, dx, dwd, dwp, ct.sum(axis=(0, 1, 2))

SEP_CASES = [(2, 12, 11, 48, 16, 7, 5, True), (3, 8, 9, 1, 16, 5, 3, False), (1, 5, 6, 20, 12, 3, 2, True),
             (1, 9, 10, 16, 16, 3, 1, True), (2, 33, 30, 16, 16, 7, 5, True)]


@pytest.mark.parametrize(
    "impl,b,h,w_,cin,cout,k,d,bias",
    [pytest.param("ffi", *c, marks=needs_ffi) for c in SEP_CASES] + [pytest.param("shift", *SEP_CASES[i]) for i in (0, 1)],
)
def test_separable_matches_reference(impl, b, h, w_, cin, cout, k, d, bias):
    keys = np.random.default_rng(b + h + cin + k)
    x = _rand(keys, (b, h, w_, cin))
    wd, wp = _rand(keys, (k, k, cin)), _rand(keys, (cin, cout)) / np.sqrt(cin)
    bb = _rand(keys, (cout,)) if bias else None
    ct = _rand(keys, (b, h, w_, cout))
    args = (x, wd, wp) + ((bb,) if bias else ())

    def f(*a):
        return dw.separable_conv2d(a[0], a[1], a[2], a[3] if bias else None, d, impl=impl)

    want = _np_sep(x, wd, wp, bb, d, ct)[: len(args) + 1]
    got = jax.jit(lambda *a: _value_and_vjp(f, a, ct))(*args)
    for name, g_, w_ref in zip(["y", "dx", "d_depthwise", "d_pointwise", "d_bias"], got, want):
        _close(g_, w_ref, 1e-5, name)


@needs_ffi
def test_separable_vmap_and_bf16():
    k, d, cin, cout = 3, 1, 16, 16
    keys = np.random.default_rng(3)
    x = _rand(keys, (2, 2, 9, 8, cin))
    wd, wp, bb = _rand(keys, (2, k, k, cin)), _rand(keys, (2, cin, cout)) / 4, _rand(keys, (2, cout))

    def loss(x, wd, wp, bb, impl):
        return jnp.sum(jnp.sin(dw.separable_conv2d(x, wd, wp, bb, d, impl)))

    got = jax.jit(jax.vmap(jax.grad(lambda *a: loss(*a, "ffi"), argnums=(0, 1, 2, 3))))(x, wd, wp, bb)
    for i in range(2):
        y = _np_sep(x[i], wd[i], wp[i], bb[i], d, np.zeros((2, 9, 8, cout), np.float32))[0]
        want = _np_sep(x[i], wd[i], wp[i], bb[i], d, np.cos(y).astype(np.float32))[1:]
        for g_, w_ in zip(got, want):
            _close(g_[i], w_, 1e-5)
    # shared weights under vmap
    got = jax.jit(jax.vmap(lambda x: dw.separable_conv2d(x, wd[0], wp[0], bb[0], d, "ffi")))(x)
    for i in range(2):
        _close(got[i], _np_sep(x[i], wd[0], wp[0], bb[0], d, np.zeros((2, 9, 8, cout), np.float32))[0], 1e-5)
    # bfloat16 in, bfloat16 out, float32 inside
    xb = x[0].astype(jnp.bfloat16)
    yb = dw.separable_conv2d(xb, wd[0].astype(jnp.bfloat16), wp[0].astype(jnp.bfloat16), bb[0].astype(jnp.bfloat16), d, "ffi")
    assert yb.dtype == jnp.bfloat16
    r = lambda a: np.asarray(a.astype(jnp.bfloat16).astype(jnp.float32))  # noqa: E731
    _close(yb, _np_sep(r(xb), r(wd[0]), r(wp[0]), r(bb[0]), d, np.zeros((2, 9, 8, cout), np.float32))[0], 1e-2)


def _np_preact_sep(x, a, b, wd, wp, bias, d, slope, ct):
    """Float64 NumPy reference of separable_conv2d(prologue=(a, b, slope)) for cotangent ct:
    (y, dx, da, db, d_depthwise, d_pointwise, d_bias), by the chain rule through
    x0 = LeakyReLU(a x + b) and _np_sep."""
    x64 = np.asarray(x, np.float64)
    z = x64 * np.asarray(a, np.float64) + np.asarray(b, np.float64)
    x0 = np.where(z >= 0, z, slope * z)
    y, dx0, dwd, dwp, dbias = _np_sep(x0.astype(np.float32), wd, wp, bias, d, ct)
    dz = dx0 * np.where(z >= 0, 1.0, slope)
    return y, dz * np.asarray(a, np.float64), (dz * x64).sum(axis=(0, 1, 2)), dz.sum(axis=(0, 1, 2)), dwd, dwp, dbias


# The first and third cases and the last five cover every (k, d) x (C, Co) instance the
# kernels specialise at compile time ((48, 16) and (16, 16) for the network's (3, 1),
# (5, 3), (7, 5)), at widths that take both the register-blocked and the border paths.
PREACT_CASES = [(2, 12, 11, 48, 16, 7, 5), (3, 8, 9, 1, 16, 5, 3), (1, 9, 10, 16, 16, 3, 1), (2, 10, 7, 20, 12, 3, 2),
                (1, 11, 40, 48, 16, 3, 1), (2, 14, 29, 48, 16, 5, 3), (1, 13, 47, 16, 16, 5, 3),
                (1, 35, 50, 16, 16, 7, 5), (1, 33, 52, 48, 16, 7, 5)]


@pytest.mark.parametrize(
    "impl,b,h,w_,cin,cout,k,d",
    [pytest.param("ffi", *c, marks=needs_ffi) for c in PREACT_CASES]
    + [pytest.param(i, *PREACT_CASES[0]) for i in ("shift", "xla")],
)
def test_separable_prologue_matches_reference(impl, b, h, w_, cin, cout, k, d):
    """SepConv(LeakyReLU(a x + b)) with the prologue fused: value and all six gradients
    (x, a, b, depthwise, pointwise, bias) against float64 NumPy; both signs of a x + b occur."""
    keys = np.random.default_rng(b * h + cin + k)
    x = _rand(keys, (b, h, w_, cin))
    a = 1.0 + 0.5 * _rand(keys, (cin,))
    sh = 0.3 * _rand(keys, (cin,))
    wd, wp, bb = _rand(keys, (k, k, cin)), _rand(keys, (cin, cout)) / np.sqrt(cin), _rand(keys, (cout,))
    ct = _rand(keys, (b, h, w_, cout))
    slope = 0.1

    def f(x, a, sh, wd, wp, bb):
        return dw.separable_conv2d(x, wd, wp, bb, d, impl, prologue=(a, sh, slope))

    got = jax.jit(lambda *args: _value_and_vjp(f, args, ct))(x, a, sh, wd, wp, bb)
    want = _np_preact_sep(x, a, sh, wd, wp, bb, d, slope, ct)
    for name, g_, w_ref in zip(["y", "dx", "da", "db", "d_depthwise", "d_pointwise", "d_bias"], got, want):
        _close(g_, w_ref, 2e-5, name)


@needs_ffi
@pytest.mark.parametrize("isa", ["baseline", "avx2"])
@pytest.mark.parametrize("case", [PREACT_CASES[-1], PREACT_CASES[-3]], ids=["48-7x7d5", "16-5x5d3"])
def test_separable_prologue_other_instruction_sets(isa, case, monkeypatch):
    """The separable kernels compiled for the narrower instruction sets (8 and 4 float lanes
    per vector) against the same reference, on channel-specialised cases."""
    use_isa(isa, monkeypatch)
    test_separable_prologue_matches_reference("ffi", *case)


@needs_ffi
def test_separable_prologue_vmap_and_bad_shapes():
    k, d, cin, cout = 5, 3, 16, 8
    keys = np.random.default_rng(5)
    x = _rand(keys, (2, 2, 9, 8, cin))
    a, sh = _rand(keys, (2, cin)), _rand(keys, (2, cin))
    wd, wp, bb = _rand(keys, (k, k, cin)), _rand(keys, (cin, cout)) / 4, _rand(keys, (cout,))
    got = jax.jit(jax.vmap(lambda x, a, s: dw.separable_conv2d(x, wd, wp, bb, d, "ffi", prologue=(a, s, 0.2))))(x, a, sh)
    for i in range(2):
        want = _np_preact_sep(x[i], a[i], sh[i], wd, wp, bb, d, 0.2, np.zeros((2, 9, 8, cout), np.float32))[0]
        _close(got[i], want, 1e-5)
    with pytest.raises(ValueError, match="prologue scale/shift"):
        dw.separable_conv2d(x[0], wd, wp, bb, d, "ffi", prologue=(a[0, :3], sh[0], 0.1))


# Channel-slice outputs and shared-input gradients (how a residual block calls the kernels)
# cases: (B, H, W, Cin, Cout, (k, d) per convolution, L (acc channels), offsets, prologue, bias)
SLICE_CASES = [
    (2, 12, 11, 48, 16, ((3, 1), (5, 3), (7, 5)), 48, (0, 16, 32), True, True),
    (1, 9, 13, 16, 16, ((7, 5), (3, 1)), 37, (19, 2), True, False),
    (2, 8, 9, 1, 12, ((5, 3), (3, 1)), 30, (0, 13), False, True),
    # the CONV RES shortcut: a 1 x 1 convolution 48 -> 48 (the kernels' k = 1 specialisation)
    # (W = 37: the vectorised blocks of 16 pixels and both tails)
    (2, 10, 37, 48, 48, ((1, 1),), 48, (0,), False, True),
]


@pytest.mark.parametrize("impl", [pytest.param("ffi", marks=needs_ffi), "shift"])
@pytest.mark.parametrize("case", SLICE_CASES, ids=["block", "odd-offsets", "stem-like", "shortcut"])
def test_separable_fanout_and_into_match_composition(impl, case):
    """separable_conv2d_fanout (several convolutions of one input) feeding
    separable_conv2d_into (each result added into a channel slice of acc): value and every
    gradient against the XLA composition (separate convolutions, concatenation-free
    `.at[].add`), offsets that are and are not multiples of the vector width."""
    b, h, w_, cin, cout, kds, width, offsets, pre, has_bias = case
    keys = np.random.default_rng(b * h + cin + width)
    x, acc = _rand(keys, (b, h, w_, cin)), _rand(keys, (b, h, w_, width))
    a, sh = 1.0 + 0.5 * _rand(keys, (cin,)), 0.3 * _rand(keys, (cin,))
    conv1 = [(_rand(keys, (k, k, cin)), _rand(keys, (cin, cout)) / np.sqrt(cin),
              _rand(keys, (cout,)) if has_bias else None) for k, _ in kds]
    conv2 = [(_rand(keys, (k, k, cout)), _rand(keys, (cout, cout)) / np.sqrt(cout), _rand(keys, (cout,)))
             for k, _ in kds]
    a2, sh2 = 1.0 + 0.5 * _rand(keys, (cout,)), 0.3 * _rand(keys, (cout,))
    ct = _rand(keys, (b, h, w_, width))

    def f(impl, x, a, sh, acc, conv1, conv2, a2, sh2):
        prologue = (a, sh, 0.1) if pre else None
        hs = dw.separable_conv2d_fanout(x, [(*c, d) for c, (_, d) in zip(conv1, kds)], impl, prologue=prologue)
        out = acc
        for hh, c, (_, d), off in zip(hs, conv2, kds, offsets):
            out = dw.separable_conv2d_into(out, off, hh, *c, d, impl, prologue=(a2, sh2, 0.1))
        return out

    args = (x, a, sh, acc, conv1, conv2, a2, sh2)
    got = jax.jit(lambda *args: _value_and_vjp(lambda *a: f(impl, *a), args, ct))(*args)
    want = jax.jit(lambda *args: _value_and_vjp(lambda *a: f("xla", *a), args, ct))(*args)
    names = ["out", "dx", "da", "dshift", "dacc", "dconv1", "dconv2", "da2", "dshift2"]
    for name, g_, w_ in zip(names, got, want):
        for gl, wl in zip(jax.tree.leaves(g_), jax.tree.leaves(w_)):
            _close(gl, wl, 2e-5, name)


@pytest.mark.parametrize("impl", [pytest.param("ffi", marks=needs_ffi), "shift"])
@pytest.mark.parametrize("case", [SLICE_CASES[0], SLICE_CASES[2], SLICE_CASES[3]], ids=["block", "stem-like", "shortcut"])
def test_separable_fanout_moments(impl, case):
    """moments=True: each output with its mean and mean of squares over (B, H, W), which the
    kernels sum as they write; values, and gradients of a loss that uses the moments (as a
    BatchNorm does), against the XLA composition. Also compared with NumPy directly."""
    b, h, w_, cin, cout, kds, _, _, pre, _ = case
    keys = np.random.default_rng(7 + cin)
    x = _rand(keys, (b, h, w_, cin))
    a, sh = 1.0 + 0.5 * _rand(keys, (cin,)), 0.3 * _rand(keys, (cin,))
    convs = [(_rand(keys, (k, k, cin)), _rand(keys, (cin, cout)) / np.sqrt(cin), _rand(keys, (cout,))) for k, _ in kds]
    ct, u, v = _rand(keys, (b, h, w_, cout)), _rand(keys, (cout,)), _rand(keys, (cout,))

    def f(impl, x, a, sh, convs):
        outs = dw.separable_conv2d_fanout(x, [(*c, d) for c, (_, d) in zip(convs, kds)], impl,
                                          prologue=(a, sh, 0.1) if pre else None, moments=True)
        # the moments' cotangents (u, v) reach y as u / count + 2 y v / count
        loss = sum(jnp.sum(y * ct) + 50.0 * (jnp.dot(m, u) + jnp.dot(q, v)) for y, m, q in outs)
        return loss, outs

    got_loss, got_outs = jax.jit(lambda *a: f(impl, *a))(x, a, sh, convs)
    want_loss, want_outs = f("xla", x, a, sh, convs)
    _close(got_loss, want_loss, 2e-5, "loss")
    for (y, m, q), (wy, wm, wq) in zip(got_outs, want_outs):
        _close(y, wy, 2e-5, "y")
        assert m.shape == q.shape == (cout,) and m.dtype == q.dtype == jnp.float32
        y64 = np.asarray(wy, np.float64)
        _close(m, y64.mean(axis=(0, 1, 2)), 2e-5, "mean")
        _close(q, (y64 ** 2).mean(axis=(0, 1, 2)), 2e-5, "mean_sq")
    grad = jax.jit(jax.grad(lambda *a: f(impl, *a)[0], argnums=(0, 1, 2, 3)))
    got = grad(x, a, sh, convs)
    want = jax.jit(jax.grad(lambda *a: f("xla", *a)[0], argnums=(0, 1, 2, 3)))(x, a, sh, convs)
    for gl, wl in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        _close(gl, wl, 2e-5, "grad")
    if impl == "ffi":  # the moments' cotangents are added by the backward kernels as they read dout
        hlo = grad.lower(x, a, sh, convs).as_text()
        assert hlo.count("crnet_separable_bwd_bn") == len(kds), hlo.count("crnet_separable_bwd_bn")


@needs_ffi
@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("case", [
    (2, 11, 300, 48, 16, 7, 5, True),   # a CONV RES block's widest first convolution; column strips
    (1, 9, 13, 16, 16, 3, 1, True),
    (2, 8, 9, 1, 12, 5, 3, False),      # the STEM's (one channel in, no prologue; Co not a vector multiple)
], ids=["48-16-k7d5", "16-16-k3d1", "1-12-k5d3"])
def test_separable_backward_adds_moments_cotangent(isa, case):
    """crnet_separable_bwd_bn[_acc]: the backward of a convolution whose output y feeds
    BatchNorm moments reads its output gradient as dout + c1 + c2 * y; equal to the plain
    backward given that sum, written or accumulated into dx, directly, under vmap with
    shared c1, c2 (folded into the batch) and with per-element ones (the sum formed by XLA)."""
    require_isa(isa)
    b, h, w_, cin, cout, k, d, pre = case
    keys = np.random.default_rng(11 + cin + k)
    x = _rand(keys, (b, h, w_, cin))
    a, sh = (1.0 + 0.5 * _rand(keys, (1, cin)), 0.3 * _rand(keys, (1, cin)))
    wdw, wpw = _rand(keys, (1, k, k, cin)), _rand(keys, (1, cin, cout)) / np.sqrt(cin)
    dout, y, dx_in = _rand(keys, (b, h, w_, cout)), _rand(keys, (b, h, w_, cout)), _rand(keys, (b, h, w_, cin))
    c1, c2 = _rand(keys, (cout,)), _rand(keys, (cout,))
    code = dw._isa_code(isa)
    slope = 0.1 if pre else None
    bwd_bn, bwd_bn_acc = dw._ffi_bn_bwd_ops(d, code, 0, slope)
    plain = dw._ffi_sep_ops(d, code, 0, slope)[1]
    plain_acc = dw._ffi_slice_ops(d, code, 0, slope, 0)[2]
    g = dout + c1 + c2 * y
    got = jax.jit(bwd_bn)(x, a, sh, wdw, wpw, dout, y, c1, c2)
    want = jax.jit(plain)(x, a, sh, wdw, wpw, g)
    for name, gl, wl in zip(["dx", "da", "db", "dwdw", "dwpw", "dbias"], got, want):
        _close(gl, wl, 1e-5, name)
    got = jax.jit(bwd_bn_acc)(x, a, sh, wdw, wpw, dout, y, c1, c2, dx_in)
    want = jax.jit(plain_acc)(x, a, sh, wdw, wpw, g, dx_in)
    for name, gl, wl in zip(["dx (acc)", "da", "db", "dwdw", "dwpw", "dbias"], got, want):
        _close(gl, wl, 1e-5, name)
    xs, ds, ys = jnp.stack([x, -x]), jnp.stack([dout, 0.5 * dout]), jnp.stack([y, 2.0 * y])
    cs = (jnp.stack([c1, c2]), jnp.stack([c2, c1]))
    for c_axes, (u, v) in (((None, None), (c1, c2)), ((0, 0), cs)):
        axes = (0, None, None, None, None, 0, 0, *c_axes)
        got = jax.jit(jax.vmap(bwd_bn, in_axes=axes))(xs, a, sh, wdw, wpw, ds, ys, u, v)
        want = jax.vmap(lambda x, dout, y, u, v: plain(x, a, sh, wdw, wpw, dout + u + v * y),
                        in_axes=(0, 0, 0, *c_axes))(xs, ds, ys, u, v)
        for name, gl, wl in zip(["dx", "da", "db", "dwdw", "dwpw", "dbias"], got, want):
            assert gl.shape == wl.shape, name
            _close(gl, wl, 1e-5, f"vmap {c_axes} {name}")


# (B, H, W, Cin, (k, d) per separable convolution, prologue): a CONV RES block's fan-out,
# the STEM's (one channel, no prologue), and more convolutions than one kernel call takes
# (the per-convolution path); W wide enough for column strips in the block case.
SHORTCUT_CASES = [
    (2, 14, 300, 48, ((3, 1), (5, 3), (7, 5)), True),
    (2, 9, 13, 1, ((3, 1), (5, 3), (7, 5)), False),
    (1, 8, 11, 16, ((3, 1), (5, 3), (7, 5), (3, 2), (5, 1)), True),
]


@pytest.mark.parametrize("impl", [pytest.param("ffi", marks=needs_ffi), "shift"])
@pytest.mark.parametrize("case", SHORTCUT_CASES, ids=["conv-res", "stem", "six-convolutions"])
def test_separable_fanout_with_shortcut(impl, case):
    """shortcut=: a 1 x 1 convolution of the raw input (no prologue) in the same pass as the
    separable convolutions of the pre-activated input (one crnet_fanout_fwd_stats call with
    the C++ kernels), with moments: values, moments and every gradient (the shortcut's input
    gradient accumulated into the branches') against the XLA composition; and under vmap,
    where the moments must come out per element."""
    b, h, w_, cin, kds, pre = case
    keys = np.random.default_rng(3 + cin + len(kds))
    x = _rand(keys, (b, h, w_, cin))
    a, sh = 1.0 + 0.5 * _rand(keys, (cin,)), 0.3 * _rand(keys, (cin,))
    convs = [(_rand(keys, (k, k, cin)), _rand(keys, (cin, 16)) / np.sqrt(cin), _rand(keys, (16,))) for k, _ in kds]
    sc = (_rand(keys, (cin, 48)) / np.sqrt(cin), _rand(keys, (48,)))
    cts = [_rand(keys, (b, h, w_, 16)) for _ in kds] + [_rand(keys, (b, h, w_, 48))]
    u = _rand(keys, (48,))

    def f(impl, x, a, sh, convs, sc):
        outs = dw.separable_conv2d_fanout(x, [(*c, d) for c, (_, d) in zip(convs, kds)], impl,
                                          prologue=(a, sh, 0.1) if pre else None, moments=True, shortcut=sc)
        assert len(outs) == len(kds) + 1
        loss = sum(jnp.sum(y * ct) + 50.0 * (jnp.dot(m, u[: m.shape[0]]) - jnp.dot(q, u[: q.shape[0]]))
                   for (y, m, q), ct in zip(outs, cts))
        return loss, outs

    args = (x, a, sh, convs, sc)
    got = jax.jit(lambda *a: f(impl, *a))(*args)
    want = f("xla", *args)
    for gl, wl in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        _close(gl, wl, 2e-5, "values and moments")
    argnums = (0, 1, 2, 3, 4) if pre else (0, 3, 4)
    got = jax.jit(jax.grad(lambda *a: f(impl, *a)[0], argnums))(*args)
    want = jax.jit(jax.grad(lambda *a: f("xla", *a)[0], argnums))(*args)
    for gl, wl in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        _close(gl, wl, 5e-5, "gradients")
    if impl == "ffi" and len(kds) <= 4:
        hlo = jax.jit(lambda *a: f(impl, *a)).lower(*args).as_text()
        assert hlo.count("crnet_fanout_fwd_stats") == 1 and "crnet_separable_fwd_stats" not in hlo
    xs = jnp.stack([x, 0.5 * x])  # vmap: per-element moments
    got = jax.jit(jax.vmap(lambda x: f(impl, x, a, sh, convs, sc)[1]))(xs)
    want = jax.vmap(lambda x: f("xla", x, a, sh, convs, sc)[1])(xs)
    for gl, wl in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        _close(gl, wl, 2e-5, "vmap")


@pytest.mark.parametrize("impl", [pytest.param("ffi", marks=needs_ffi), "shift"])
def test_separable_fanout_shortcut_without_gradient(impl):
    """shortcut_grad=False (a caller that differentiates the shortcut itself): the same
    values, the shortcut's results carry no gradient, every other gradient is unchanged,
    and the backward neither keeps the shortcut's output nor computes its weights' gradient."""
    b, h, w_, cin, kds, pre = SHORTCUT_CASES[0]
    keys = np.random.default_rng(29)
    x = _rand(keys, (b, h, w_, cin))
    pro = (1.0 + 0.5 * _rand(keys, (cin,)), 0.3 * _rand(keys, (cin,)), 0.1)
    convs = [(_rand(keys, (k, k, cin)), _rand(keys, (cin, 16)) / np.sqrt(cin), _rand(keys, (16,)), d) for k, d in kds]
    sc = (_rand(keys, (cin, 40)) / np.sqrt(cin), _rand(keys, (40,)))  # 40 wide: its output is told apart
    cts = [_rand(keys, (b, h, w_, 16)) for _ in kds] + [_rand(keys, (b, h, w_, 40))]

    def f(x, sc, grad):
        outs = dw.separable_conv2d_fanout(x, convs, impl, prologue=pro, moments=True, shortcut=sc,
                                          shortcut_grad=grad)
        return sum(jnp.sum(y * ct) + jnp.sum(m) + jnp.sum(q) for (y, m, q), ct in zip(outs, cts)), outs

    got, want = jax.jit(lambda x: f(x, sc, False))(x), f(x, sc, True)
    for gl, wl in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        _close(gl, wl, 1e-6, "values")
    dx, dsc = jax.jit(jax.grad(lambda x, sc: f(x, sc, False)[0], (0, 1)))(x, sc)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in dsc)
    # without the shortcut's share: the gradient of the branches' terms alone
    want_dx = jax.grad(lambda x: sum(jnp.sum(y * ct) + jnp.sum(m) + jnp.sum(q) for (y, m, q), ct in zip(
        dw.separable_conv2d_fanout(x, convs, "xla", prologue=pro, moments=True), cts)))(x)
    _close(dx, want_dx, 2e-5, "dx")
    _, vjp = jax.vjp(lambda x: f(x, sc, False)[0], x)
    kept = [leaf.shape for leaf in jax.tree.leaves(vjp) if getattr(leaf, "ndim", 0) == 4]
    assert (b, h, w_, 40) not in kept, f"the shortcut's output is kept: {kept}"


@needs_ffi
def test_separable_fanout_with_shortcut_sharded():
    """Batch-sharded: every device runs the fan-out on its images and the moments' sums are
    added over devices (psum), so they are the whole batch's."""
    n = min(jax.device_count(), 4)
    if n < 2:
        pytest.skip("needs several devices (conftest sets --xla_force_host_platform_device_count=4)")
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    data = NamedSharding(mesh, P("data"))
    keys = np.random.default_rng(17)
    x = _rand(keys, (2 * n, 10, 12, 16))
    convs = [(_rand(keys, (k, k, 16)), _rand(keys, (16, 8)) / 4, _rand(keys, (8,)), d) for k, d in ((3, 1), (5, 3))]
    pro = (1.0 + 0.5 * _rand(keys, (16,)), 0.3 * _rand(keys, (16,)), 0.1)
    sc = (_rand(keys, (16, 24)) / 4, _rand(keys, (24,)))

    def f(impl, x):
        return dw.separable_conv2d_fanout(x, convs, impl, prologue=pro, moments=True, shortcut=sc)

    fs = jax.jit(lambda x: f("ffi", x), in_shardings=data)
    got = fs(jax.device_put(x, data))
    for gl, wl in zip(jax.tree.leaves(got), jax.tree.leaves(f("xla", x))):
        _close(gl, wl, 2e-5)
    hlo = fs.lower(jax.device_put(x, data)).compile().as_text()
    assert "all-gather(" not in hlo and "all-reduce(" in hlo
    # the backward (the moments' cotangents added by the kernels) per device, weight
    # gradients summed over devices
    cts = [_rand(keys, (2 * n, 10, 12, c)) for c in (8, 8, 24)]

    def loss(impl, x, convs):
        outs = dw.separable_conv2d_fanout(x, convs, impl, prologue=pro, moments=True, shortcut=sc)
        return sum(jnp.sum(y * ct) + 3.0 * jnp.sum(m * m) - jnp.sum(q) for (y, m, q), ct in zip(outs, cts))

    grad = jax.jit(jax.grad(lambda x, w: loss("ffi", x, [(*c, d) for c, d in zip(w, (1, 3))]), (0, 1)),
                   in_shardings=(data, None))
    ws = [c[:3] for c in convs]
    got = grad(jax.device_put(x, data), ws)
    want = jax.grad(lambda x, w: loss("xla", x, [(*c, d) for c, d in zip(w, (1, 3))]), (0, 1))(x, ws)
    for gl, wl in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        _close(gl, wl, 5e-5, "gradients")
    hlo = grad.lower(jax.device_put(x, data), ws).compile().as_text()
    assert "all-gather(" not in hlo and "crnet_separable_bwd_bn" in hlo


@needs_ffi
@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_separable_fanout_and_into_other_instruction_sets(isa, monkeypatch):
    """The slice and accumulation paths compiled for 8 and 4 float lanes per vector."""
    use_isa(isa, monkeypatch)
    for case in SLICE_CASES:
        test_separable_fanout_and_into_match_composition("ffi", case)
        test_separable_into_sums("ffi", case)


@needs_ffi
def test_separable_into_vmap_sharded_and_bad_shapes():
    """The slice kernels under vmap (folded into the batch) and under a batch-sharded jit
    (run per device, weight gradients summed), and the argument checks."""
    k, d, cin, cout, width = 5, 3, 16, 8, 20
    keys = np.random.default_rng(21)
    x, acc = _rand(keys, (2, 2, 9, 8, cin)), _rand(keys, (2, 2, 9, 8, width))
    wd, wp, bb = _rand(keys, (k, k, cin)), _rand(keys, (cin, cout)) / 4, _rand(keys, (cout,))

    def f(impl, x, acc):
        (h,) = dw.separable_conv2d_fanout(x, [(wd, wp, bb, d)], impl)
        return dw.separable_conv2d_into(acc, 5, h[..., :cin // 2].repeat(2, -1), wd, wp, bb, d, impl)

    got = jax.jit(jax.vmap(lambda x, acc: f("ffi", x, acc)))(x, acc)
    want = jax.vmap(lambda x, acc: f("xla", x, acc))(x, acc)
    _close(got, want, 1e-5)

    n = min(jax.device_count(), 4)
    if n >= 2:
        from jax.sharding import NamedSharding, PartitionSpec as P

        mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        data = NamedSharding(mesh, P("data"))
        xs, accs = _rand(keys, (2 * n, 9, 8, cin)), _rand(keys, (2 * n, 9, 8, width))

        def loss(impl, x, acc, wd, wp, bb):
            out = dw.separable_conv2d_into(acc, 3, x[..., :cin], wd, wp, bb, d, impl, prologue=(wp[:, 0], wp[:, 1], 0.1))
            # two convolutions of one input: the second's input gradient accumulates in place
            (h, hm, _), (g, gm, gq) = dw.separable_conv2d_fanout(
                out[..., :cin], [(wd, wp, bb, d), (wd[1:4, 1:4], wp, bb, 1)], impl, moments=True)
            return jnp.sum(jnp.sin(out)) + jnp.sum(h ** 2) + jnp.sum(g * jnp.cos(h)) + jnp.sum(gm * gq * hm)

        grad = lambda impl: jax.value_and_grad(lambda *a: loss(impl, *a), argnums=(0, 1, 2, 3, 4))  # noqa: E731
        fs = jax.jit(grad("ffi"), in_shardings=(data, data, None, None, None))
        got = fs(jax.device_put(xs, data), jax.device_put(accs, data), wd, wp, bb)
        want = jax.jit(grad("xla"))(xs, accs, wd, wp, bb)
        for gl, wl in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            _close(gl, wl, 1e-5)
        hlo = fs.lower(jax.device_put(xs, data), jax.device_put(accs, data), wd, wp, bb).compile().as_text()
        assert "all-gather(" not in hlo

    with pytest.raises(ValueError, match="room for 8 channels at offset 13"):
        dw.separable_conv2d_into(acc[0], 13, x[0], wd, wp, bb, d, "ffi")
    with pytest.raises(ValueError, match="does not match 16 input channels"):
        dw.separable_conv2d_fanout(x[0], [(wd, wp[:3], bb, d)], "ffi")


@pytest.mark.parametrize("impl", [pytest.param("ffi", marks=needs_ffi), "shift"])
@pytest.mark.parametrize("case", SLICE_CASES, ids=["block", "odd-offsets", "stem-like", "shortcut"])
def test_separable_into_sums(impl, case):
    """sums=True: the same result, and per image the sums over (H, W) of the slice's channels
    as written (acc + the convolution) and of their squares, against NumPy in float64;
    gradients unchanged and none through the sums; under vmap (per mapped element and image)."""
    b, h, w_, cin, cout, kds, width, offsets, pre, _ = case
    keys = np.random.default_rng(23 + cin)
    x, acc = _rand(keys, (b, h, w_, cin)), _rand(keys, (b, h, w_, width))
    (k, d), off = kds[0], offsets[0]
    wd, wp, bb = _rand(keys, (k, k, cin)), _rand(keys, (cin, cout)) / np.sqrt(cin), _rand(keys, (cout,))
    pro = (1.0 + 0.5 * _rand(keys, (cin,)), 0.3 * _rand(keys, (cin,)), 0.1) if pre else None

    def f(impl, x, acc, sums):
        return dw.separable_conv2d_into(acc, off, x, wd, wp, bb, d, impl, prologue=pro, sums=sums)

    out, s1, s2 = jax.jit(lambda x, acc: f(impl, x, acc, True))(x, acc)
    _close(out, f("xla", x, acc, False), 2e-5, "out")
    part = np.asarray(out, np.float64)[..., off : off + cout]
    assert s1.shape == s2.shape == (b, cout) and s1.dtype == jnp.float32
    _close(s1, part.sum(axis=(1, 2)), 2e-5, "sum")
    _close(s2, (part ** 2).sum(axis=(1, 2)), 2e-5, "sum of squares")
    ct = _rand(keys, (b, h, w_, width))

    def loss(x, acc, sums):
        r = f(impl, x, acc, sums)
        return jnp.sum((r[0] if sums else r) * ct) + (jnp.sum(r[1]) + jnp.sum(r[2]) if sums else 0.0)

    got = jax.jit(jax.grad(lambda x, acc: loss(x, acc, True), (0, 1)))(x, acc)
    want = jax.jit(jax.grad(lambda x, acc: loss(x, acc, False), (0, 1)))(x, acc)
    for gl, wl in zip(got, want):
        _close(gl, wl, 1e-5, "gradients")
    xs, accs = jnp.stack([x, -0.5 * x]), jnp.stack([acc, acc + 1.0])
    vout, v1, v2 = jax.jit(jax.vmap(lambda x, acc: f(impl, x, acc, True)))(xs, accs)
    for i in range(2):
        o, t1, t2 = f(impl, xs[i], accs[i], True)
        _close(vout[i], o, 2e-5, "vmap out")
        _close(v1[i], t1, 2e-5, "vmap sum")
        _close(v2[i], t2, 2e-5, "vmap sum of squares")


@needs_ffi
def test_separable_into_deferred_scale():
    """deferred_scale: the slice of acc is scaled per channel before the convolution is
    added (other channels untouched), with and without sums; the gradient returned for acc
    is the result's own (the caller's differentiation stands for the scaled acc), the other
    gradients unchanged; refused for other implementations or a wrong shape."""
    b, h, w_, cin, cout, kds, width, offsets, pre, _ = SLICE_CASES[1]
    keys = np.random.default_rng(37)
    x, acc = _rand(keys, (b, h, w_, cin)), _rand(keys, (b, h, w_, width))
    (k, d), off = kds[0], offsets[0]
    wd, wp, bb = _rand(keys, (k, k, cin)), _rand(keys, (cin, cout)) / np.sqrt(cin), _rand(keys, (cout,))
    pro = (1.0 + 0.5 * _rand(keys, (cin,)), 0.3 * _rand(keys, (cin,)), 0.1)
    s = 1.0 + 0.5 * _rand(keys, (cout,))
    scaled = acc.at[..., off : off + cout].multiply(s)

    def f(acc, x, deferred, sums=False):
        return dw.separable_conv2d_into(acc, off, x, wd, wp, bb, d, "ffi", prologue=pro, sums=sums,
                                        deferred_scale=s if deferred else None)

    want = f(scaled, x, False)
    _close(jax.jit(lambda a, x: f(a, x, True))(acc, x), want, 2e-5, "value")
    out, s1, _ = jax.jit(lambda a, x: f(a, x, True, True))(acc, x)
    _close(out, want, 2e-5, "value with sums")
    _close(s1, np.asarray(want, np.float64)[..., off : off + cout].sum(axis=(1, 2)), 2e-5, "sums")
    ct = _rand(keys, (b, h, w_, width))
    got = jax.grad(lambda a, x: jnp.sum(f(a, x, True) * ct), (0, 1))(acc, x)
    want = jax.grad(lambda a, x: jnp.sum(f(a, x, False) * ct), (0, 1))(scaled, x)
    _close(got[0], want[0], 1e-6, "d acc")
    _close(got[1], want[1], 1e-5, "dx")
    with pytest.raises(ValueError, match="deferred_scale"):
        dw.separable_conv2d_into(acc, off, x, wd, wp, bb, d, "xla", prologue=pro, deferred_scale=s)
    with pytest.raises(ValueError, match="deferred_scale"):
        dw.separable_conv2d_into(acc, off, x, wd, wp, bb, d, "ffi", prologue=pro, deferred_scale=s[:3])


def test_batch_moments_from_sums():
    """Moments from per-image sums (scaled per image and channel, as by a dropout mask):
    the values and the gradient with respect to y of `batch_moments(y)`."""
    keys = np.random.default_rng(31)
    y = _rand(keys, (3, 5, 7, 6))
    m = jnp.asarray(keys.choice([0.0, 1.25], size=(3, 6)).astype(np.float32))
    ym = y * m[:, None, None, :]
    s1 = jnp.sum(y, axis=(1, 2)) * m
    s2 = jnp.sum(y * y, axis=(1, 2)) * m * m
    u, v = _rand(keys, (6,)), _rand(keys, (6,))

    def loss(moments):
        mean, mean_sq = moments
        return jnp.dot(mean, u) + jnp.dot(mean_sq, v) + jnp.sum(mean_sq * mean)

    got = dw.batch_moments_from_sums(ym, s1, s2)
    want = dw.batch_moments(ym)
    for gl, wl in zip(got, want):
        _close(gl, wl, 1e-6, "moments")
    g_got = jax.grad(lambda t: loss(dw.batch_moments_from_sums(t, s1, s2)))(ym)
    g_want = jax.grad(lambda t: loss(dw.batch_moments(t)))(ym)
    _close(g_got, g_want, 1e-6, "gradient")


@needs_ffi
def test_separable_fanout_and_into_gradients_under_vmap():
    """Per-example gradients (vmap of grad) through a two-convolution fanout with moments
    and the slice kernels: the backward calls (the slice read, the accumulated input
    gradient, the moments' sums) under vmap, with one kernel mapped per example and the
    rest shared, against the XLA composition."""
    cin, cout, width, kds = 8, 8, 19, ((3, 1), (5, 3))
    keys = np.random.default_rng(5)
    x, acc = _rand(keys, (3, 2, 9, 10, cin)), _rand(keys, (3, 2, 9, 10, width))
    wd0 = _rand(keys, (3, 3, 3, cin))  # mapped: one depthwise kernel per example
    rest = [(_rand(keys, (5, 5, cin)), _rand(keys, (cin, cout)) / 3, _rand(keys, (cout,))),
            (_rand(keys, (cin, cout)) / 3, _rand(keys, (cout,)))]
    a, sh = 1.0 + 0.5 * _rand(keys, (cin,)), 0.3 * _rand(keys, (cin,))
    ct = _rand(keys, (3, 2, 9, 10, width))

    def loss(impl, x, acc, wd0, rest, a, sh, ct):
        (wd1, wp1, b1), (wp0, b0) = rest
        convs = [(wd0, wp0, b0, kds[0][1]), (wd1, wp1, b1, kds[1][1])]
        outs = dw.separable_conv2d_fanout(x, convs, impl, prologue=(a, sh, 0.1), moments=True)
        out = acc
        for (y, m, q), off in zip(outs, (1, 11)):
            scale = jax.lax.rsqrt(q - m * m + 1e-3)  # a BatchNorm on the moments
            out = dw.separable_conv2d_into(out, off, y, wd1[..., :cout], wp1[:cout], b1, 3, impl,
                                           prologue=(scale, -m * scale, 0.1))
        return jnp.sum(out * ct)

    argnums = (0, 1, 2, 3, 4, 5)
    in_axes = (0, 0, 0, None, None, None, 0)
    got = jax.jit(jax.vmap(jax.grad(lambda *a: loss("ffi", *a), argnums), in_axes))(x, acc, wd0, rest, a, sh, ct)
    want = jax.jit(jax.vmap(jax.grad(lambda *a: loss("xla", *a), argnums), in_axes))(x, acc, wd0, rest, a, sh, ct)
    for name, g_, w_ in zip(["dx", "dacc", "dwd0", "drest", "da", "dshift"], got, want):
        for gl, wl in zip(jax.tree.leaves(g_), jax.tree.leaves(w_)):
            assert gl.shape == wl.shape and gl.shape[0] == 3, name  # per-example gradients
            _close(gl, wl, 5e-5, name)


# ---------------------------------------------------------------------------------------
# Threads, determinism, selection, errors
# ---------------------------------------------------------------------------------------
@needs_ffi
def test_streaming_stores_match(tmp_path):
    """The kernels write outputs far bigger than the caches with non-temporal stores (a
    separate compiled path); CRNET_DEPTHWISE_STREAM_MB=0 lowers the size threshold to zero,
    so every output that qualifies otherwise (64-byte aligned, channels a multiple of 16,
    written whole rather than into a slice) in the fan-out (with and without the shortcut), moments, shortcut and separable
    cases is written through that path."""
    env = {**os.environ, "CRNET_DEPTHWISE_STREAM_MB": "0"}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_depthwise.py"),
         "-k", "(fanout_and_into_match or fanout_moments or fanout_with_shortcut or separable_matches_reference) and ffi"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and " skipped" not in r.stdout.split("\n")[-2], r.stdout[-500:]


def test_ffi_refuses_a_stale_extension():
    """An extension built from older sources (another calling convention, or lacking a
    target this code calls) is refused with the command that rebuilds it; this build passes."""
    class Old:
        __file__ = "/somewhere/_depthwise_ffi.so"

        @staticmethod
        def registrations():
            return {name: None for name in _ffi.REQUIRED_TARGETS}

    assert "calling convention 1, this code needs" in _ffi.stale_reason(Old)  # no abi_version
    Old.abi_version = staticmethod(lambda: _ffi.ABI_VERSION)
    assert _ffi.stale_reason(Old) == ""
    Old.registrations = staticmethod(lambda: {"crnet_depthwise_fwd": None})
    reason = _ffi.stale_reason(Old)
    assert "lacks the targets" in reason and "crnet_separable_bwd_acc" in reason and "build_ext" in reason
    if _ffi.available():
        from crnet_jax import _depthwise_ffi

        assert _ffi.stale_reason(_depthwise_ffi) == ""


def test_ffi_reports_an_extension_older_than_its_sources(tmp_path):
    """The extension records a digest of crnet_jax/csrc when it is built; a checkout whose
    sources changed since is reported (with the rebuild command), an install without the
    sources or an extension without the digest is not, and this build matches its sources."""
    from crnet_jax.csrc_digest import source_digest

    (tmp_path / "k.cc").write_text("int f() { return 1; }\n")
    digest = source_digest(tmp_path)
    assert len(digest) == 16 and source_digest(tmp_path / "missing") == ""

    class Built:
        __file__ = "/somewhere/_depthwise_ffi.so"
        source_digest = staticmethod(lambda: digest)

    assert _ffi.outdated_reason(Built, tmp_path) == ""
    (tmp_path / "k.inc").write_text("// a new kernel\n")
    reason = _ffi.outdated_reason(Built, tmp_path)
    assert "built from other sources" in reason and digest in reason and "build_ext" in reason
    assert _ffi.outdated_reason(Built, tmp_path / "missing") == ""  # installed without sources
    Built.source_digest = staticmethod(lambda: "")  # built without the digest
    assert _ffi.outdated_reason(Built, tmp_path) == ""
    if _ffi.available():
        from crnet_jax import _depthwise_ffi

        csrc = REPO / "crnet_jax" / "csrc"
        assert _ffi.outdated_reason(_depthwise_ffi, csrc) == "", "rebuild the extension before testing"


@needs_ffi
def test_ffi_threads_deterministic():
    """Weight gradients are bitwise identical whatever the thread count (big enough to thread)."""
    k, d, c = 7, 5, 16
    kx = kw = kc = np.random.default_rng(11)
    x, w, ct = _rand(kx, (2, 70, 64, c)), _rand(kw, (k, k, c)), _rand(kc, (2, 70, 64, c))
    outs = []
    for threads in (1, 2, 3):
        f = jax.jit(lambda x, w, ct: _value_and_grads(lambda *a: dw.depthwise_conv2d_ffi(*a, threads=threads), x, w, d, ct))
        outs.append([np.asarray(o) for o in f(x, w, ct)])
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            np.testing.assert_array_equal(a, b)
    _close(outs[0][2], _ref_value_and_grads(x, w, d, ct)[2], 1e-5)


@needs_ffi
def test_ffi_batch_sharded_runs_locally():
    """With the batch sharded over devices (data parallelism), every device runs the C++
    kernels on its own images (no all-gather) and the weight gradients are summed."""
    n = min(jax.device_count(), 4)
    if n < 2:
        pytest.skip("needs several devices (conftest sets --xla_force_host_platform_device_count=4)")
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    keys = np.random.default_rng(9)
    x = _rand(keys, (2 * n, 12, 11, 16))
    wd, wp = _rand(keys, (5, 5, 16)), _rand(keys, (16, 16)) / 4
    bb = jnp.zeros((16,))
    data, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

    def loss(x, wd, wp, bb, impl):
        return jnp.sum(jnp.sin(dw.separable_conv2d(x, wd, wp, bb, 3, impl))) + jnp.sum(dw.depthwise_conv2d(x, wd, 3, impl) ** 2)

    f = jax.jit(jax.value_and_grad(lambda *a: loss(*a, "ffi"), argnums=(0, 1, 2, 3)), in_shardings=(data, rep, rep, rep))
    got = f(jax.device_put(x, data), wd, wp, bb)
    want = jax.jit(jax.value_and_grad(lambda *a: loss(*a, "xla"), argnums=(0, 1, 2, 3)))(x, wd, wp, bb)
    _close(got[0], want[0], 1e-5, "loss")
    for g_, w_ in zip(got[1], want[1]):
        _close(g_, w_, 1e-5)
    hlo = f.lower(jax.device_put(x, data), wd, wp, bb).compile().as_text()
    assert "all-gather(" not in hlo
    assert f"f32[2,12,11,16]{{3,2,1,0}} custom-call(" in hlo  # local batch of 2 per device


def test_default_implementation(monkeypatch):
    monkeypatch.delenv("CRNET_DEPTHWISE_IMPL", raising=False)
    impl = dw.default_implementation("cpu")
    assert impl == ("ffi" if _ffi.available() else "shift")
    assert dw.default_implementation("gpu") == "shift"
    monkeypatch.setenv("CRNET_DEPTHWISE_IMPL", "xla")
    assert dw.default_implementation() == "xla"
    monkeypatch.setenv("CRNET_DEPTHWISE_IMPL", "nope")
    with pytest.raises(ValueError):
        dw.default_implementation()
    assert set(dw.IMPLEMENTATIONS) == {"xla", "shift", "ffi"}


def test_fallback_warns_once(monkeypatch):
    monkeypatch.delenv("CRNET_DEPTHWISE_IMPL", raising=False)
    _ffi._load()
    monkeypatch.setattr(_ffi, "_state", {"ok": False, "reason": "pretend it was not built"})
    monkeypatch.setattr(dw, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="pretend it was not built"):
        assert dw.default_implementation("cpu") == "shift"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dw.default_implementation("cpu") == "shift"
    with pytest.raises(RuntimeError, match="pretend it was not built"):
        dw.depthwise_conv2d(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2)), 1, "ffi")


def test_bad_arguments():
    x = jnp.ones((1, 6, 6, 4))
    with pytest.raises(ValueError):
        dw.depthwise_conv2d(x, jnp.ones((4, 4, 4)), 1, "shift")  # even kernel
    with pytest.raises(ValueError):
        dw.depthwise_conv2d(x, jnp.ones((3, 3, 5)), 1, "shift")  # channel mismatch
    with pytest.raises(ValueError):
        dw.depthwise_conv2d(x, jnp.ones((3, 3, 4)), 0, "shift")  # dilation
    with pytest.raises(ValueError):
        dw.depthwise_conv2d(x, jnp.ones((3, 3, 4)), 1, "bogus")


def test_auto_matches_reference():
    x = _rand(np.random.default_rng(0), (2, 10, 9, 16))
    w = _rand(np.random.default_rng(1), (5, 5, 16))
    _close(jax.jit(lambda x, w: dw.depthwise_conv2d(x, w, 3))(x, w), _ref(x, w, 3), 1e-5)
    pw, b = _rand(np.random.default_rng(2), (16, 16)), _rand(np.random.default_rng(3), (16,))
    _close(jax.jit(lambda x: dw.separable_conv2d(x, w, pw, b, 3))(x), _sep_ref(x, w, pw, b, 3), 1e-5)


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_depthwise.py"), "--smoke", "--combos", "16:5:3",
         "--results", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "Depthwise" in text and "| dw:shift | fwd+bwd |" in text and "| dw:xla | fwd |" in text
    if _ffi.available():
        assert "| sep:ffi | fwd+bwd |" in text


# ---------------------------------------------------------------------------------------
# Slow: network-sized shapes
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
@needs_ffi
@pytest.mark.parametrize("c,k,d", [(1, 3, 1), (16, 5, 3), (48, 7, 5), (48, 3, 1)])
def test_full_size_ffi_vs_shift(c, k, d):
    """300 x 340, batch 2: the C++ kernels against the (independently written) shift version."""
    kx = kw = kc = np.random.default_rng(c + k)
    x, w, ct = _rand(kx, (2, 300, 340, c)), _rand(kw, (k, k, c)), _rand(kc, (2, 300, 340, c))
    want = jax.jit(lambda x, w, ct: _value_and_grads(lambda *a: dw.depthwise_conv2d(*a, impl="shift"), x, w, d, ct))(x, w, ct)
    got = jax.jit(lambda x, w, ct: _value_and_grads(lambda *a: dw.depthwise_conv2d(*a, impl="ffi"), x, w, d, ct))(x, w, ct)
    for name, g_, w_ in zip(["y", "dx", "dw"], got, want):
        _close(g_, w_, 1e-4, name)  # float32 sums over 2e5 pixels on both sides


@pytest.mark.slow
@needs_ffi
@pytest.mark.parametrize("cin,k,d", [(48, 7, 5), (16, 3, 1), (1, 5, 3)])
def test_full_size_separable(cin, k, d):
    keys = np.random.default_rng(cin + k)
    x = _rand(keys, (2, 300, 340, cin))
    wd, wp, bb = _rand(keys, (k, k, cin)), _rand(keys, (cin, 16)) / np.sqrt(cin), _rand(keys, (16,))
    ct = _rand(keys, (2, 300, 340, 16))

    def run(impl):
        return _value_and_vjp(lambda *a: dw.separable_conv2d(*a, d, impl), (x, wd, wp, bb), ct)

    got, want = jax.jit(lambda: run("ffi"))(), jax.jit(lambda: run("shift"))()
    for g_, w_ in zip(got, want):
        _close(g_, w_, 1e-4)  # float32 sums over 2e5 pixels on both sides


@pytest.mark.slow
@pytest.mark.parametrize("k,d", [(3, 1), (5, 3), (7, 5)])
def test_medium_size_all_vs_xla(k, d):
    """64 x 80 x 48, batch 2: every implementation against the grouped convolution."""
    kx = kw = kc = np.random.default_rng(k)
    x, w, ct = _rand(kx, (2, 64, 80, 48)), _rand(kw, (k, k, 48)), _rand(kc, (2, 64, 80, 48))
    want = _xla_value_and_grads(x, w, d, ct)
    impls = ["shift"] + (["ffi"] if _ffi.available() else [])
    for impl in impls:
        got = jax.jit(lambda x, w, ct: _value_and_grads(lambda *a: dw.depthwise_conv2d(*a, impl=impl), x, w, d, ct))(x, w, ct)
        for name, g_, w_ in zip(["y", "dx", "dw"], got, want):
            _close(g_, w_, 2e-5, f"{impl} {name}")


def test_shift_kernel_grad_variants_agree():
    """The GPU/TPU kernel-gradient variant of "shift" (k*k reductions) equals the CPU one."""
    kx = kg = np.random.default_rng(5)
    x, g = _rand(kx, (2, 9, 11, 5)), _rand(kg, (2, 9, 11, 5))
    k, d = 5, 3
    _close(jax.jit(lambda x, g: dw._shift_kgrad_blocked(x, g, k, d))(x, g),
           jax.jit(lambda x, g: dw._shift_kgrad_unrolled(x, g, k, d))(x, g), 1e-5)


EMPTY_INPUTS = """
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from crnet_jax import depthwise as dw
from crnet_jax.config import lung_config
from crnet_jax.model import ResCRNet

for shape in [(0, 9, 10, 48), (2, 0, 10, 48), (2, 9, 0, 48)]:
    x = jnp.ones(shape, jnp.float32)
    wd = jnp.ones((7, 7, 48), jnp.float32)
    wp = jnp.ones((48, 16), jnp.float32)
    b = jnp.ones((16,), jnp.float32)
    a, s = jnp.ones((48,)), jnp.zeros((48,))
    def loss(x, wd, wp, b, a, s, impl):
        return jnp.sum(dw.separable_conv2d(x, wd, wp, b, 5, impl, prologue=(a, s, 0.1)))
    got = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))(x, wd, wp, b, a, s, "ffi")
    want = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))(x, wd, wp, b, a, s, "xla")
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
    y = dw.depthwise_conv2d(x, wd, 5, "ffi")
    assert y.shape == shape

model = ResCRNet(lung_config(), rngs=nnx.Rngs(0))
for shape in [(0, 16, 16, 1), (1, 0, 16, 1), (1, 16, 0, 1)]:
    x = jnp.zeros(shape)
    model.eval()
    assert model(x).shape == shape[:3] + (2,)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest, copy=True)(x)))(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
print("ok")
"""


@needs_ffi
def test_empty_images_and_batches_do_not_crash():
    """A batch of zero images or images of zero rows or columns: the kernels do no work,
    the gradients equal the reference's (zeros), and the network's forward and backward in
    both modes run. Run in a subprocess: the kernels once divided by zero (SIGFPE) here."""
    r = subprocess.run([sys.executable, "-c", EMPTY_INPUTS], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stderr[-3000:])
