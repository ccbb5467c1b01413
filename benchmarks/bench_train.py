"""Training-step throughput (images/s) and memory per batch of the lung network.

    python -m benchmarks.bench_train                        # 300x340, batch 8, float32, side by side with Keras
    python -m benchmarks.bench_train --sizes 256x256,300x340,512x512 --batches 1,8,16 \
        --dtypes float32,bfloat16 --impls ffi,shift --remat both
"""
from __future__ import annotations

import argparse

from benchmarks.grid import add_grid_arguments, run_grid


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_arguments(p, sizes="300x340", batches="8")
    args = p.parse_args(argv)
    run_grid(args, "train", "Training step, lung network (STEM + 5 CONV RES + head), weighted Tanimoto, Adam",
             notes="One step = forward, loss, backward, Adam update, BatchNorm statistics; median of the timed "
                   "steps after compilation. 'args+temp' is XLA's compiled memory analysis; peak RSS is of the "
                   "measuring process (one process per row). 'x peer' and 'RSS / peer' are against the Keras peer "
                   "row measured just before in the same invocation.")


if __name__ == "__main__":
    main()
