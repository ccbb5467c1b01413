"""Inference throughput (images/s) and memory per batch of the lung network.

    python -m benchmarks.bench_infer --peer                 # 300x340, batch 8, side by side with Keras
"""
from __future__ import annotations

import argparse

from benchmarks.grid import add_grid_arguments, run_grid


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_arguments(p, sizes="300x340", batches="8")
    args = p.parse_args(argv)
    run_grid(args, "infer", "Inference, lung network (STEM + 5 CONV RES + head)",
             notes="Forward pass in inference mode (BatchNorm with moving statistics, no dropout); median of the "
                   "timed calls after compilation; one process per row.")


if __name__ == "__main__":
    main()
