"""Run a grid of lung-network configurations, each in its own process, optionally side by side
with the Keras peer, print a table and append it to RESULTS.md."""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
from typing import Any

from benchmarks.common import append_results, format_table, gib, run_json_subprocess


def parse_size(s: str) -> tuple[int, int]:
    h, _, w = s.lower().partition("x")
    return int(h), int(w or h)


def add_grid_arguments(p: argparse.ArgumentParser, *, sizes: str, batches: str, impls: str = "auto",
                       dtypes: str = "float32", remat: str = "branches") -> None:
    p.add_argument("--sizes", default=sizes, help="comma-separated HxW (e.g. 256x256,300x340)")
    p.add_argument("--batches", default=batches, help="comma-separated batch sizes")
    p.add_argument("--dtypes", default=dtypes, help="compute dtypes: float32,bfloat16")
    p.add_argument("--impls", default=impls, help="depthwise implementations: auto,ffi,shift,xla")
    p.add_argument("--remat", default=remat, choices=["off", "on", "branches", "both", "all"],
                   help="block rematerialisation: off, on (block input kept), branches (its branches' first "
                        "convolutions kept too; the ModelConfig default), both (off and on), all three")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True, help="also run the Keras peer (benchmarks/peers) on each size/batch (default on; --no-peer)")
    p.add_argument("--peer-python", default=None,
                   help="python with tensorflow for the peer (default: this one, if it imports tensorflow)")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one step: checks the script runs")


def _peer_python(args) -> str | None:
    if args.peer_python:
        return args.peer_python
    return sys.executable if importlib.util.find_spec("tensorflow") else None


def run_grid(args, mode: str, title: str, notes: str = "") -> list[dict[str, Any]]:
    if args.smoke:
        args.sizes, args.batches, args.steps, args.warmup = "32x40", "2", 1, 0
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    remats = {"off": [False], "on": [True], "branches": ["branches"], "both": [False, True],
              "all": [False, True, "branches"]}[args.remat]
    if mode == "infer":  # no backward pass: remat changes nothing
        remats = remats[:1]
    peer_py = _peer_python(args) if args.peer else None
    rows, results = [], []
    for (h, w), b in itertools.product(sizes, batches):
        peer = None
        if args.peer:
            if peer_py is None:
                print("peer skipped: no python with tensorflow (pass --peer-python)", file=sys.stderr)
            else:
                peer = run_json_subprocess(
                    ["-m", "benchmarks.peers.keras_lung", "--mode", mode, "--height", str(h), "--width", str(w),
                     "--batch", str(b), "--steps", str(args.steps), "--warmup", str(args.warmup), "--json"],
                    python=peer_py,
                )
                if "median_s_per_step" in peer:
                    peer.setdefault("median_s", peer["median_s_per_step"])
                results.append(peer)
                rows.append(_row(peer, "keras peer", h, w, b, "float32", "-", "-", None))
        for dtype, impl, remat in itertools.product(args.dtypes.split(","), args.impls.split(","), remats):
            spec = {"mode": mode, "height": h, "width": w, "batch": b, "dtype": dtype, "impl": impl,
                    "remat": remat, "steps": args.steps, "warmup": args.warmup}
            if args.smoke:
                spec["num_conv_res"] = 1  # the smoke run checks the script, not the network
            r = run_json_subprocess(["-m", "benchmarks.worker", json.dumps(spec)])
            r.setdefault("impl_resolved", impl)
            results.append(r)
            rows.append(_row(r, "crnet_jax", h, w, b, dtype, r.get("impl_resolved", impl),
                             "-" if mode == "infer" else _remat_label(remat), peer))
            print(format_table(HEADERS, rows[-1:]).splitlines()[-1], flush=True)
    table = format_table(HEADERS, rows)
    print(table)
    if not args.no_record and not args.smoke:
        append_results(title, table, notes)
    return results


def _remat_label(remat) -> str:
    return remat if isinstance(remat, str) else ("on" if remat else "off")


HEADERS = ["impl", "H x W", "batch", "dtype", "depthwise", "remat", "median s/step", "images/s",
           "x peer", "args+temp GiB", "peak RSS GiB", "RSS / peer", "compile s"]


def _row(r: dict, who: str, h: int, w: int, b: int, dtype: str, impl: str, remat: str, peer: dict | None) -> list:
    if "error" in r:
        return [who, f"{h}x{w}", b, dtype, impl, remat, "error", r["error"][:80], "", "", "", "", ""]
    speedup = rss_ratio = "-"
    if peer and "error" not in peer and peer.get("images_per_s"):
        speedup = f"{r['images_per_s'] / peer['images_per_s']:.2f}"
        rss_ratio = f"{r['peak_rss_bytes'] / peer['peak_rss_bytes']:.2f}"
    mem = r.get("argument_bytes", 0) + r.get("temp_bytes", 0) if "temp_bytes" in r else None
    return [who, f"{h}x{w}", b, dtype, impl, remat, f"{r['median_s']:.3f}", f"{r['images_per_s']:.2f}", speedup,
            gib(mem), gib(r.get("peak_rss_bytes")), rss_ratio, r.get("compile_s", "-")]
