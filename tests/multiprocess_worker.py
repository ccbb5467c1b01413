"""One process of a multi-process training run (started by tests/test_train_multiprocess.py).

    python tests/multiprocess_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID RUN_DIR OUT.npz
"""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


def main() -> None:
    coordinator, n, pid, run_dir, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    from crnet_jax import distributed

    distributed.initialize(coordinator, n, pid)  # before anything else touches JAX's devices
    import jax
    import numpy as np

    from crnet_jax import train
    from train_helpers import multiprocess_config

    assert jax.process_count() == n and jax.process_index() == pid
    result = train.run(multiprocess_config(), run_dir, progress=False)
    params = jax.device_get(result.state.params)  # replicated: every process holds all of it
    leaves = jax.tree_util.tree_leaves_with_path(params)
    np.savez(out, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})
    print(f"process {pid}: {len(leaves)} parameter arrays, devices {jax.device_count()}", flush=True)


if __name__ == "__main__":
    main()
