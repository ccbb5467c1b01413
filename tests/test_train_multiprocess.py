"""Two JAX processes on localhost (CPU, gloo collectives) train together: each reads only its own
rows of every global batch, and both end with the parameters of a single-process run."""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from crnet_jax import train
from train_helpers import multiprocess_config

HERE = pathlib.Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    assert jax.device_count() == 4
    reference = train.run(multiprocess_config(), tmp_path / "single", progress=False, log=lambda *a: None)
    ref = jax.device_get(reference.state.params)
    ref = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(ref)}

    coordinator = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    run_dir = tmp_path / "multi"
    procs = [subprocess.Popen([sys.executable, str(HERE / "multiprocess_worker.py"), coordinator, "2", str(i),
                               str(run_dir), str(tmp_path / f"p{i}.npz")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
             for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=400)[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    got = [dict(np.load(tmp_path / f"p{i}.npz")) for i in range(2)]
    assert set(got[0]) == set(got[1]) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(got[0][k], got[1][k], err_msg=f"processes disagree on {k}")
        np.testing.assert_allclose(got[0][k], ref[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert (run_dir / "model" / "config.json").is_file() and (run_dir / "curves.png").is_file()
