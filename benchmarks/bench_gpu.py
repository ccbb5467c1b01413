"""The accelerator figures in one short run: the training step at 300 x 340 (batch 16 and 8,
float32 and bfloat16) and inference, with the pure-XLA depthwise implementations, against
the device's measured memory bandwidth.

    python3 -m benchmarks.bench_gpu --out "$OUT"      # on a GPU machine, with its own jax
    python -m benchmarks.bench_gpu --smoke --no-record  # checks the script on any machine

Per configuration (a fresh process each, `benchmarks.worker`): images/s, the device's peak
bytes in use, XLA's compiled memory, and what bounds the step: XLA's own count of bytes
accessed and flops per step (its cost analysis) divided by the step time, as GB/s and a
fraction of the bandwidth a device-to-device copy reaches here (measured first, in its own
process), and as TFLOP/s. Needs no installation beyond jax, flax and optax (the C++ kernels
are for the CPU). Writes gpu_section.md and gpu_rows.jsonl under --out and appends the
section to RESULTS.md unless --no-record.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

from benchmarks.common import (append_results, format_table, gib, median, results_section, run_json_subprocess,
                               time_calls)

TITLE = "Accelerator: training step and inference, lung network (bench_gpu.py)"
# (mode, batch, dtype, depthwise implementation); 300 x 340 unless --smoke
CONFIGS = [
    ("train", 16, "float32", "shift"),
    ("train", 16, "bfloat16", "shift"),
    ("train", 16, "float32", "xla"),
    ("train", 8, "float32", "shift"),
    ("infer", 16, "float32", "shift"),
    ("infer", 16, "bfloat16", "shift"),
]


def probe_bandwidth(n_bytes: int) -> dict:
    """Bytes read + written per second by a device-to-device copy of n_bytes (median of 10)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((n_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    times = time_calls(lambda: copy(x).block_until_ready(), steps=10, warmup=1)
    return {"copy_bytes_per_s": 2 * n_bytes / median(times), "platform": jax.devices()[0].platform}


def _row(r: dict, bandwidth: float | None) -> list:
    if "error" in r:
        return [r.get("mode", "?"), "-", "-", "-", "-", "error: " + r["error"][:80], "", "", "", "", "", ""]
    med = r["median_s"]
    moved = r.get("xla_bytes_accessed")
    flops = r.get("xla_flops")
    rate = moved / med if moved else None
    return [
        r["mode"], f"{r['height']}x{r['width']}", r["batch"], r["dtype"], r["impl_resolved"],
        f"{med * 1e3:.1f}", f"{r['images_per_s']:.1f}",
        "-" if rate is None else f"{rate / 1e9:.3g}",
        "-" if rate is None or not bandwidth else f"{rate / bandwidth:.2f}",
        "-" if not flops else f"{flops / med / 1e12:.3g}",
        gib(r.get("device_peak_bytes")), gib(r["argument_bytes"] + r["temp_bytes"]),
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_results", help="folder for gpu_section.md and gpu_rows.jsonl")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=float, default=150, help="seconds per configuration (compilation included)")
    p.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and one block: checks the script runs")
    p.add_argument("--probe-bandwidth", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe_bandwidth:
        print(json.dumps(probe_bandwidth(args.probe_bandwidth)))
        return
    # This process never touches the device; each measuring process allocates what it uses,
    # so that its peak is its own.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    h, w = (24, 32) if args.smoke else (300, 340)
    configs = [CONFIGS[0], CONFIGS[4]] if args.smoke else CONFIGS  # smoke: one training, one inference
    probe = run_json_subprocess(["-m", "benchmarks.bench_gpu", "--probe-bandwidth", str(2**20 if args.smoke else 2**31)],
                                timeout=args.timeout)
    bandwidth = probe.get("copy_bytes_per_s")
    rows, results = [], []
    for mode, batch, dtype, impl in configs:
        spec = {"mode": mode, "height": h, "width": w, "batch": 2 if args.smoke else batch, "dtype": dtype,
                "impl": impl, "remat": "branches", "steps": 1 if args.smoke else args.steps,
                "warmup": 0 if args.smoke else args.warmup}
        if args.smoke:
            spec["num_conv_res"] = 1
        try:
            r = run_json_subprocess(["-m", "benchmarks.worker", json.dumps(spec)], timeout=args.timeout)
        except Exception as e:  # noqa: BLE001 (a timeout must not lose the other rows)
            r = {"error": f"{type(e).__name__}: {e}"}
        r = {**spec, **r}
        results.append(r)
        rows.append(_row(r, bandwidth))
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
        with (out / "gpu_rows.jsonl").open("a") as f:
            f.write(json.dumps(r) + "\n")
    headers = ["mode", "HxW", "batch", "dtype", "impl", "ms/step", "images/s", "XLA GB/s",
               "x copy bandwidth", "XLA TFLOP/s", "device peak GiB", "args+temp GiB"]
    table = format_table(headers, rows)
    bw = "not measured" if not bandwidth else f"{bandwidth / 1e9:.0f} GB/s (read + written)"
    notes = (f"Device-to-device copy here: {bw}. 'XLA GB/s' and 'XLA TFLOP/s' are XLA's cost analysis of "
             "the compiled step (bytes accessed, flops) over the median step time: the fraction of the copy "
             "bandwidth says how close the step is to being bound by bytes moved. Target (issue 3): >= 300 "
             "images/s training at 300 x 340, batch 16, on one H100.")
    print(table)
    print(notes)
    command = "python -m benchmarks.bench_gpu " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = next((r["machine"] for r in results if "machine" in r), "unknown (every configuration failed)")
    (out / "gpu_section.md").write_text(results_section(TITLE, table, notes, command, machine).lstrip())
    if not args.no_record and not args.smoke:
        append_results(TITLE, table, notes, command=command, machine=machine)

if __name__ == "__main__":
    main()
