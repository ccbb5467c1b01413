"""How training-step time and memory grow with pixel count and with batch (should be linear).

    python -m benchmarks.bench_scaling                      # 128^2..1024^2 at batch 1; batch 1..16 at 256^2
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from benchmarks.common import append_results, format_table, gib, run_json_subprocess


def _measure(mode: str, h: int, w: int, b: int, args) -> dict:
    spec = {"mode": mode, "height": h, "width": w, "batch": b, "dtype": args.dtype, "impl": args.impl,
            "remat": False, "steps": args.steps, "warmup": args.warmup}
    if args.smoke:
        spec["num_conv_res"] = 1  # the smoke run checks the script, not the network
    return run_json_subprocess(["-m", "benchmarks.worker", json.dumps(spec)])


def _slope(xs: list[float], ys: list[float]) -> float:
    """Exponent of the power law y ~ x^a fitted in log-log space (1.0 = linear)."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="train", choices=["train", "infer"])
    p.add_argument("--sides", default="128,256,512,1024", help="square image sides for the pixel sweep (batch 1)")
    p.add_argument("--batches", default="1,2,4,8,16", help="batches for the batch sweep")
    p.add_argument("--batch-side", type=int, default=256, help="image side for the batch sweep")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--impl", default="auto")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--smoke", action="store_true", help="two tiny points per sweep")
    args = p.parse_args(argv)
    if args.smoke:
        args.sides, args.batches, args.batch_side, args.steps, args.warmup = "16,32", "1,2", 16, 1, 0
    rows, sweeps = [], {"pixels": [], "batch": []}
    for s in [int(v) for v in args.sides.split(",")]:
        sweeps["pixels"].append((s * s, _measure(args.mode, s, s, 1, args)))
    for b in [int(v) for v in args.batches.split(",")]:
        sweeps["batch"].append((b, _measure(args.mode, args.batch_side, args.batch_side, b, args)))
    summary = []
    for name, points in sweeps.items():
        ok = [(x, r) for x, r in points if "error" not in r]
        for x, r in points:
            if "error" in r:
                rows.append([name, x, "error", r["error"][:60], "", "", ""])
                continue
            per = r["median_s"] / x * (1e6 if name == "pixels" else 1e3)
            rows.append([name, x, f"{r['median_s']:.3f}", f"{per:.3f}", gib(r["argument_bytes"] + r["temp_bytes"]),
                         gib(r["peak_rss_bytes"]), r["height"] if name == "batch" else r["batch"]])
        if len(ok) >= 2:
            xs = [x for x, _ in ok]
            summary.append(
                f"- {name}: time ~ {name}^{_slope(xs, [r['median_s'] for _, r in ok]):.2f}, "
                f"compiled memory ~ {name}^{_slope(xs, [r['argument_bytes'] + r['temp_bytes'] for _, r in ok]):.2f}"
            )
    headers = ["sweep", "pixels or batch", "median s/step", "s per Mpixel (pixels) / ms per image (batch)",
               "args+temp GiB", "peak RSS GiB", "batch or side"]
    table = format_table(headers, rows)
    print(table)
    print("\n".join(summary))
    if not args.no_record and not args.smoke:
        append_results(f"Cost scaling ({args.mode}, {args.dtype}, depthwise {args.impl})", table,
                       "Fitted power-law exponents (1.00 = linear):\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
