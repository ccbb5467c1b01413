#!/usr/bin/env python
"""Cost of the LSTM RES block against a CONV RES block, and of the network with and without it.

    python benchmarks/bench_lstm.py                  # 300x340, batch 8, 5 timed steps
    python benchmarks/bench_lstm.py --smoke          # tiny and fast (tests)

Cases (inputs are random; training = forward + backward, gradients of a mean-square loss with
respect to every parameter and to the input, as inside a network; BatchNorm in training mode,
dropout on; no optimizer update):

  CONV RES block   conv_res_block(48) on (B, H, W, 48)
  LSTM RES block   LSTMResBlock(48) (microscopy: 4 classes) on (B, H, W, 48), recurrent dropout on
  net +LSTM        the microscopy network: STEM + 5 CONV RES + 1 LSTM RES, RGB, 4 classes
  net -LSTM        the same with num_lstm_res=0: STEM + 5 CONV RES + 1x1 head

Timing: every case is compiled in one process and the timed steps run round-robin across the
cases (a shared, noisy machine then slows them alike); the table gives the median and the min.
Memory: XLA's `memory_analysis()` of the compiled step (argument and temporary bytes) and the
peak RSS of a fresh subprocess that compiles and runs only that case once (--no-rss skips it;
with --smoke everything runs in one process and RSS is not reported).

Appends the table, with the machine (CPU model, cores, jax version), depthwise implementation,
load average, date and command, to benchmarks/RESULTS.md (--results to choose the file; with
--smoke only when --results is given). Like bench_depthwise.py it re-executes itself with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (huge pages for XLA's large buffers) unless --no-hugepages.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_RESULTS = HERE / "RESULTS.md"
CASES = ("conv_res", "lstm_res", "net_lstm", "net_plain")
LABELS = {"conv_res": "CONV RES block", "lstm_res": "LSTM RES block", "net_lstm": "net +LSTM", "net_plain": "net -LSTM"}
MODES = ("forward", "train")


# ---------------------------------------------------------------------------------------------
# What is measured.
# ---------------------------------------------------------------------------------------------


def build_case(case: str, mode: str, batch: int, height: int, width: int, impl: str):
    """A jitted step and its arguments: returns (jitted_fn, args)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from crnet_jax.blocks import conv_res_block
    from crnet_jax.config import microscopy_lstm_config
    from crnet_jax.lstm import LSTMResBlock
    from crnet_jax.model import ResCRNet

    cfg = microscopy_lstm_config(depthwise_impl=impl)
    rngs = nnx.Rngs(0)
    if case == "conv_res":
        module, channels = conv_res_block(cfg.block_channels, cfg, rngs=rngs), cfg.block_channels
    elif case == "lstm_res":
        module, channels = LSTMResBlock(cfg.block_channels, cfg, rngs=rngs), cfg.block_channels
    elif case == "net_lstm":
        module, channels = ResCRNet(cfg, rngs=rngs), cfg.in_channels
    elif case == "net_plain":
        module, channels = ResCRNet(cfg.replace(num_lstm_res=0), rngs=rngs), cfg.in_channels
    else:
        raise ValueError(f"unknown case {case!r}; choose from {CASES}")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, height, width, channels), np.float32))
    if mode == "forward":
        module.eval()
    else:
        module.train()
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    if mode == "forward":

        def step(params, rest, x):
            return nnx.merge(graphdef, params, rest, copy=True)(x)

    else:

        def step(params, rest, x):
            def loss_fn(params, x):
                m = nnx.merge(graphdef, params, rest, copy=True)
                y = m(x)
                return jnp.mean(jnp.square(y.astype(jnp.float32))), nnx.state(m, nnx.Not(nnx.Param))

            (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True, argnums=(0, 1))(params, x)
            return loss, grads, new_rest

    return jax.jit(step), (params, rest, x)


def compile_case(case: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Compile one case; returns {"call": blocking thunk, "compile_s", "memory"}."""
    import jax

    fn, fargs = build_case(case, mode, args.batch, args.height, args.width, args.impl)
    t = time.perf_counter()
    compiled = fn.lower(*fargs).compile()
    compile_s = time.perf_counter() - t
    m = compiled.memory_analysis()
    memory = {} if m is None else {"argument_bytes": int(m.argument_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
                                  "output_bytes": int(m.output_size_in_bytes)}
    call: Callable[[], Any] = lambda: jax.block_until_ready(compiled(*fargs))  # noqa: E731
    return {"call": call, "compile_s": compile_s, "memory": memory}


def time_round_robin(compiled: dict[tuple[str, str], dict], steps: int) -> dict[tuple[str, str], list[float]]:
    """One warm-up call each, then `steps` rounds calling every case once per round."""
    for c in compiled.values():
        c["call"]()
    times: dict[tuple[str, str], list[float]] = {k: [] for k in compiled}
    for _ in range(steps):
        for key, c in compiled.items():
            t = time.perf_counter()
            c["call"]()
            times[key].append(time.perf_counter() - t)
    return times


def peak_rss_bytes() -> int:
    """This process's peak resident set size: VmHWM of /proc/self/status (ru_maxrss would also
    count the parent's peak, which a forked child inherits across exec)."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_child(case: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of a fresh process that compiles and runs only this case (twice)."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--rss-child", f"{case}:{mode}",
           "--batch", str(args.batch), "--height", str(args.height), "--width", str(args.width), "--impl", args.impl,
           "--no-hugepages"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------


def machine_line(impl: str) -> str:
    import jax

    from crnet_jax import depthwise

    from benchmarks import common  # the repo root is on sys.path (main)

    resolved = depthwise.default_implementation() if impl == "auto" else impl
    dev = jax.devices()[0]
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    return (
        f"{common.cpu_model()}, {os.cpu_count()} cores ({affinity} usable), jax {jax.__version__} ({dev.platform}), "
        f"depthwise impl {impl!r} -> {resolved!r}, load average {load}"
    )


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def table(args, compiled, times, rss) -> str:
    head = "| case | mode | median s | min s | compile s | args MiB | temp MiB | peak RSS MiB |\n|---|---|---|---|---|---|---|---|"
    rows = []
    for (case, mode), c in compiled.items():
        t = times[(case, mode)]
        mem = c["memory"]
        r = rss.get((case, mode), {})
        rows.append(
            f"| {LABELS[case]} | {mode} | {statistics.median(t):.3f} | {min(t):.3f} | {c['compile_s']:.1f} | "
            f"{mib(mem.get('argument_bytes'))} | {mib(mem.get('temp_bytes'))} | {mib(r.get('peak_rss_bytes'))} |"
        )
    return head + "\n" + "\n".join(rows)


def ratios(times) -> str:
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = []
    for mode in MODES:
        if ("lstm_res", mode) in med and ("conv_res", mode) in med:
            lines.append(f"LSTM RES / CONV RES ({mode}): {med[('lstm_res', mode)] / med[('conv_res', mode)]:.2f}")
        if ("net_lstm", mode) in med and ("net_plain", mode) in med:
            extra = med[("net_lstm", mode)] - med[("net_plain", mode)]
            lines.append(
                f"net +LSTM / net -LSTM ({mode}): {med[('net_lstm', mode)] / med[('net_plain', mode)]:.2f} "
                f"(+{extra:.3f} s per step)"
            )
    return "\n".join(f"- {line}" for line in lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, the two blocks only, 1 timed step, no RSS subprocesses (for tests)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--height", type=int, default=300)
    p.add_argument("--width", type=int, default=340)
    p.add_argument("--steps", type=int, default=5, help="timed rounds (after one warm-up call per case)")
    p.add_argument("--cases", default=None, help=f"comma list from {CASES} (default all; --smoke: the two blocks)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list from forward,train")
    p.add_argument("--impl", default="auto", help="depthwise implementation for the CONV RES blocks (crnet_jax.depthwise)")
    p.add_argument("--no-rss", action="store_true", help="skip the per-case peak-RSS subprocesses")
    p.add_argument("--results", default=None, help=f"markdown file to append to (default {DEFAULT_RESULTS}; "
                   "--smoke appends only when this is given)")
    p.add_argument("--no-hugepages", action="store_true", help="do not set GLIBC_TUNABLES=glibc.malloc.hugetlb=1")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))

    if args.rss_child:
        case, mode = args.rss_child.split(":")
        c = compile_case(case, mode, args)
        c["call"]()
        c["call"]()
        print(json.dumps({"peak_rss_bytes": peak_rss_bytes()}))
        return 0
    if not args.no_hugepages and not args.smoke and "hugetlb" not in os.environ.get("GLIBC_TUNABLES", ""):
        env = dict(os.environ)
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), "glibc.malloc.hugetlb=1"]))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    if args.smoke:
        args.batch, args.height, args.width, args.steps, args.no_rss = 1, 12, 14, 1, True
        args.cases = args.cases or "conv_res,lstm_res"

    cases = [c for c in (args.cases or ",".join(CASES)).split(",") if c]
    modes = [m for m in args.modes.split(",") if m]
    compiled = {}
    for case in cases:
        for mode in modes:
            compiled[(case, mode)] = compile_case(case, mode, args)
            print(f"# compiled {LABELS[case]} {mode} in {compiled[(case, mode)]['compile_s']:.1f} s", flush=True)
    times = time_round_robin(compiled, args.steps)
    rss = {} if args.no_rss else {key: rss_child(*key, args) for key in compiled}
    text = table(args, compiled, times, rss)
    notes = ratios(times)
    print(text)
    print(notes)

    results = pathlib.Path(args.results) if args.results else (None if args.smoke else DEFAULT_RESULTS)
    if results is not None:
        if not results.exists():
            results.write_text("# Benchmark results\n\nAppended by the scripts in benchmarks/.\n")
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        command = "python " + " ".join([str(pathlib.Path(sys.argv[0]).relative_to(REPO) if pathlib.Path(sys.argv[0]).is_absolute() and REPO in pathlib.Path(sys.argv[0]).parents else sys.argv[0]), *sys.argv[1:]])
        section = (
            f"\n## LSTM RES vs CONV RES block, network with/without LSTM RES (bench_lstm.py)\n\n"
            f"- Date: {when}\n- Machine: {machine_line(args.impl)}\n- Command: `{command}`\n"
            f"- Shape: batch {args.batch}, {args.height} x {args.width}; {args.steps} timed rounds, round-robin; "
            f"training = forward + backward incl. input gradient (no optimizer update); GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}\n\n"
            f"{text}\n\n{notes}\n"
        )
        with results.open("a") as f:
            f.write(section)
        print(f"# appended to {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
