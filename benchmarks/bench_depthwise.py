#!/usr/bin/env python
"""Benchmark of the depthwise atrous convolution implementations (and the separable
convolution built on them) at Res-CR-Net's layer shapes.

    python benchmarks/bench_depthwise.py                 # 300x340, batch 8, all 9 (C, k, d)
    python benchmarks/bench_depthwise.py --smoke         # tiny and fast (tests)
    python benchmarks/bench_depthwise.py --peer-python /work/venv-peers/bin/python
                                                         # + TensorFlow/Keras rows, same process timing

Prints a table of median milliseconds and GFLOP/s for the forward pass and for forward +
backward (gradients with respect to the input and every weight) and appends it, with a
description of the machine, to benchmarks/RESULTS.md.

Rows:
  dw:<impl>        depthwise_conv2d(impl) for impl in xla / shift / ffi
  sep:<impl>       separable_conv2d (depthwise + pointwise to 16 + bias) for shift / ffi; for
                   "ffi" that is the fused C++ kernel, for "shift" depthwise + an einsum
  sep:ffi-unfused  depthwise(ffi) followed by an einsum (what fusion saves)
  sep:ffi+act      separable_conv2d(prologue=...): BatchNorm scale/shift + LeakyReLU applied
                   by the fused kernel to its input (the CONV RES and mid-branch case)
  sep:ffi+xla-act  the same activation computed by XLA, then the plain fused kernel
  copy             y = 2 x on the layer's input: the memory-traffic floor of one pass
  tf:dw, tf:sep    Keras DepthwiseConv2D / SeparableConv2D under tf.function (--peer-python)

GFLOP/s counts 2 k^2 C flops per pixel for the depthwise part (x3 for forward+backward)
plus 2 C Cout for the pointwise part of sep rows, whatever the implementation does.
All implementations of a shape are timed round-robin in one process, so a noisy (shared)
machine affects them alike; compare ratios within a table.

By default the script re-executes itself with GLIBC_TUNABLES=glibc.malloc.hugetlb=1: glibc
then backs XLA's big (>= 32 MB, mmap-ed) buffers with transparent huge pages, which cuts the
page-fault cost of every fresh 157 MB activation buffer (~40k faults) by ~100x. Use
--no-hugepages to measure the default behaviour. (A training script can do the same.)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "RESULTS.md"
COMBOS = [(c, k, d) for c in (1, 16, 48) for (k, d) in ((3, 1), (5, 3), (7, 5))]
COUT = 16


def _cpu_flags() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return ",".join(f for f in ("avx2", "fma", "avx512f") if f in flags) or "-"
    except OSError:
        pass
    return "?"


def _median(ts):
    ts = sorted(ts)
    n = len(ts)
    return ts[n // 2] if n % 2 else 0.5 * (ts[n // 2 - 1] + ts[n // 2])


# ----------------------------------------------------------------------------------------
# TensorFlow peer (runs in another interpreter: --tf-worker)
# ----------------------------------------------------------------------------------------
def tf_worker(spec: dict) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    b, h, w, c, k, d, reps = (spec[key] for key in ("b", "h", "w", "c", "k", "d", "reps"))
    x = tf.random.normal((b, h, w, c))
    layers = {
        "tf:dw": tf.keras.layers.DepthwiseConv2D(k, dilation_rate=d, padding="same", use_bias=False),
        "tf:sep": tf.keras.layers.SeparableConv2D(COUT, k, dilation_rate=d, padding="same"),
    }
    fns = {}
    for name, layer in layers.items():
        layer.build(x.shape)

        def fwd(x, layer=layer):
            return layer(x)

        def fb(x, layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(layer(x))
            return tape.gradient(loss, [x] + layer.trainable_variables)

        fns[name + " fwd"] = tf.function(fwd)
        fns[name + " fwd+bwd"] = tf.function(fb)
    times = {key: [] for key in fns}
    for f in fns.values():  # trace + warm up
        [t.numpy() for t in tf.nest.flatten(f(x))]
    for _ in range(reps):
        for key, f in fns.items():
            t0 = time.perf_counter()
            [t.numpy().ravel()[:1] for t in tf.nest.flatten(f(x))]
            times[key].append(time.perf_counter() - t0)
    return {key: _median(v) for key, v in times.items()}


# ----------------------------------------------------------------------------------------
# JAX
# ----------------------------------------------------------------------------------------
def run(args) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from benchmarks import common  # the repo root is on sys.path (main)
    from crnet_jax import _ffi
    from crnet_jax import depthwise as dw

    impls = [i for i in args.impls.split(",") if i]
    if "ffi" in impls and not _ffi.available():
        print(f"# skipping ffi: {_ffi.unavailable_reason()}", file=sys.stderr)
        impls.remove("ffi")
    b, h, w = args.batch, args.height, args.width
    rows = []
    for c, k, d in args.combos:
        key = jax.random.PRNGKey(c * 100 + k)
        kx, kw, kp, kb = jax.random.split(key, 4)
        x = jax.random.normal(kx, (b, h, w, c), jnp.float32)
        wd = jax.random.normal(kw, (k, k, c), jnp.float32)
        wp = jax.random.normal(kp, (c, COUT), jnp.float32)
        bias = jax.random.normal(kb, (COUT,), jnp.float32)
        fns = {}

        def add(name, f, flops_fwd):
            fns[name + " fwd"] = (jax.jit(f), flops_fwd)
            loss = lambda *a: jnp.sum(f(*a))  # noqa: E731
            fns[name + " fwd+bwd"] = (jax.jit(jax.grad(loss, argnums=tuple(range(len(sig(name)))))), 3 * flops_fwd)

        def sig(name):
            return (x, wd) if name.startswith("dw:") else (x, wd, wp, bias)

        dw_flops = 2.0 * b * h * w * c * k * k
        sep_flops = dw_flops + 2.0 * b * h * w * c * COUT
        for impl in impls:
            if impl == "xla" and not args.smoke and c > args.xla_max_channels:
                continue
            add(f"dw:{impl}", lambda x, wd, impl=impl: dw.depthwise_conv2d(x, wd, d, impl), dw_flops)
        for impl in impls:
            if impl != "xla":  # sep:xla would only add an einsum to dw:xla
                add(f"sep:{impl}", lambda x, wd, wp, bb, impl=impl: dw.separable_conv2d(x, wd, wp, bb, d, impl), sep_flops)
        if "ffi" in impls:
            add("sep:ffi-unfused", lambda x, wd, wp, bb: jnp.einsum("bhwc,cd->bhwd", dw.depthwise_conv2d(x, wd, d, "ffi"), wp) + bb, sep_flops)
            scale, shift = jnp.full((c,), 1.1, jnp.float32), jnp.full((c,), 0.1, jnp.float32)
            add("sep:ffi+act", lambda x, wd, wp, bb: dw.separable_conv2d(x, wd, wp, bb, d, "ffi", prologue=(scale, shift, 0.1)), sep_flops)

            def xla_act_then_sep(x, wd, wp, bb):
                z = x * scale + shift
                return dw.separable_conv2d(jnp.where(z >= 0, z, 0.1 * z), wd, wp, bb, d, "ffi")

            add("sep:ffi+xla-act", xla_act_then_sep, sep_flops)
        fns["copy fwd"] = (jax.jit(lambda x: 2.0 * x), 0.0)

        times = {name: [] for name in fns}
        slow = set()
        for name, (f, _) in fns.items():  # compile + warm up
            a = (x,) if name.startswith("copy") else sig(name)
            jax.block_until_ready(f(*a))
            t0 = time.perf_counter()
            jax.block_until_ready(f(*a))
            times[name].append(time.perf_counter() - t0)
            if times[name][-1] > args.slow_seconds:
                slow.add(name)  # e.g. the grouped convolution: one timed call is enough
        for _ in range(args.reps - 1):
            for name, (f, _) in fns.items():
                if name in slow:
                    continue
                a = (x,) if name.startswith("copy") else sig(name)
                t0 = time.perf_counter()
                jax.block_until_ready(f(*a))
                times[name].append(time.perf_counter() - t0)
        result = {name: (_median(ts), fns[name][1]) for name, ts in times.items()}
        if args.peer_python:
            spec = dict(b=b, h=h, w=w, c=c, k=k, d=d, reps=args.reps)
            proc = subprocess.run(
                [args.peer_python, __file__, "--tf-worker", json.dumps(spec)],
                capture_output=True, text=True, env=os.environ.copy(),
            )
            if proc.returncode == 0:
                tf_times = json.loads(proc.stdout.strip().splitlines()[-1])
                for name, t in tf_times.items():
                    fl = dw_flops if name.startswith("tf:dw") else sep_flops
                    result[name] = (t, 3 * fl if name.endswith("fwd+bwd") else fl)
            else:
                print(f"# TensorFlow peer failed: {proc.stderr[-2000:]}", file=sys.stderr)
        for name, (t, fl) in result.items():
            label, mode = name.rsplit(" ", 1)
            rows.append(dict(C=c, k=k, d=d, impl=label, mode=mode, ms=t * 1e3, gflops=fl / t / 1e9 if fl else None))
            print(_fmt_row(rows[-1]), flush=True)
    return rows


def _fmt_row(r) -> str:
    gf = f"{r['gflops']:.1f}" if r["gflops"] else "-"
    return f"| {r['C']} | {r['k']} | {r['d']} | {r['impl']} | {r['mode']} | {r['ms']:.1f} | {gf} |"


def _table(rows) -> str:
    head = "| C | k | d | impl | pass | median ms | GFLOP/s |\n|---:|---:|---:|---|---|---:|---:|\n"
    return head + "\n".join(_fmt_row(r) for r in rows) + "\n"


def _machine(args) -> str:
    import jax
    import jaxlib

    from benchmarks import common  # the repo root is on sys.path (main)
    from crnet_jax import _ffi

    isa = _ffi.best_isa() if _ffi.available() else f"not built ({_ffi.unavailable_reason()})"
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return "\n".join([
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- command: `{' '.join(shlex.quote(a) for a in [pathlib.Path(sys.executable).name] + sys.argv)}`",
        f"- CPU: {common.cpu_model()} ({_cpu_flags()}), {os.cpu_count()} logical cores, load average {load[0]:.1f} at the end",
        f"- jax {jax.__version__}, jaxlib {jaxlib.__version__}, backend {jax.default_backend()}, ffi kernels: {isa}",
        f"- shape: batch {args.batch}, {args.height} x {args.width}, pointwise to {COUT}; median of {args.reps} timed "
        f"rounds (1 for calls slower than {args.slow_seconds} s)",
        f"- GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 rounds, 3 combos (for tests)")
    p.add_argument("--impls", default="xla,shift,ffi", help="comma list of depthwise impls")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--height", type=int, default=300)
    p.add_argument("--width", type=int, default=340)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--combos", default=None, help="e.g. '48:7:5,16:3:1' (C:k:d); default: the network's 9")
    p.add_argument("--xla-max-channels", type=int, default=1024,
                   help="skip impl xla above this many channels (it takes seconds per call at full size)")
    p.add_argument("--slow-seconds", type=float, default=2.0,
                   help="time a function only once when one call takes longer than this")
    p.add_argument("--peer-python", default=None, help="python with tensorflow: add Keras rows")
    p.add_argument("--results", default=None, help=f"markdown file to append to (default {DEFAULT_RESULTS}; "
                   "--smoke appends only when this is given)")
    p.add_argument("--no-hugepages", action="store_true", help="do not set GLIBC_TUNABLES=glibc.malloc.hugetlb=1")
    p.add_argument("--tf-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.tf_worker:
        print(json.dumps(tf_worker(json.loads(args.tf_worker))))
        return 0
    if not args.no_hugepages and "hugetlb" not in os.environ.get("GLIBC_TUNABLES", "") and not args.smoke:
        env = dict(os.environ)
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), "glibc.malloc.hugetlb=1"]))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    if args.smoke:
        args.batch, args.height, args.width, args.reps = 2, 24, 20, 2
        args.combos = args.combos or "1:3:1,16:5:3,48:7:5"
    args.combos = (
        [tuple(int(v) for v in s.split(":")) for s in args.combos.split(",")] if args.combos else COMBOS
    )
    sys.path.insert(0, str(HERE.parent))
    print("| C | k | d | impl | pass | median ms | GFLOP/s |")
    rows = run(args)
    results = pathlib.Path(args.results) if args.results else (None if args.smoke else DEFAULT_RESULTS)
    if results is not None:
        if not results.exists():
            results.write_text("# Benchmark results\n\nAppended by the scripts in benchmarks/.\n")
        with results.open("a") as f:
            f.write("\n## Depthwise / separable atrous convolution (bench_depthwise.py)\n\n")
            f.write(_machine(args) + "\n\n" + _table(rows))
        print(f"# appended to {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
