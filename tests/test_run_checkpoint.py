"""Run checkpoints: full-state round trip, keep last N + best, and a process killed with
SIGKILL in the middle of a save still resumes from its last complete checkpoint."""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crnet_jax import optimizer, step
from crnet_jax import train_config as tc
from crnet_jax.config import ModelConfig
from crnet_jax.run_checkpoint import RunCheckpointer
from crnet_jax.train_config import OptimConfig
from train_helpers import TINY_SETS

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def state0():
    """A TrainState with reduce-on-plateau and clipping in its optimiser state."""
    _, params, stats = step.split_model(step.create_model(ModelConfig(num_conv_res=1, filters=4), 0))
    tx = optimizer.make_optimizer(OptimConfig(schedule="plateau", clip_norm=1.0), 10)
    return step.init_train_state(params, stats, tx, 0)


def test_round_trip_of_the_full_state(tmp_path, state0):
    state = state0.replace(step=jnp.int32(7), params=jax.tree.map(lambda x: x + 1.0, state0.params),
                           rng=jnp.array([3, 4], jnp.uint32))
    ckpt = RunCheckpointer(tmp_path, keep=2)
    meta = {"data": {"next_step": 7}, "best": {"value": 0.5, "step": 7}}
    ckpt.save(state, meta, score=0.5)
    ckpt.wait()
    restored, got = ckpt.restore(7, like=state0)
    ckpt.close()
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
    assert got["data"] == {"next_step": 7} and got["best"]["value"] == 0.5
    assert type(restored.opt_state) is type(state.opt_state)


def test_keeps_the_last_n_and_the_best(tmp_path, state0):
    state = state0
    ckpt = RunCheckpointer(tmp_path, keep=2)
    scores = {1: 0.5, 2: 0.9, 3: 0.3, 4: None, 5: 0.4, 6: None}
    for s, score in scores.items():
        ckpt.save(state.replace(step=jnp.int32(s)), {"step": s}, score=score)
    ckpt.wait()
    assert ckpt.steps() == [2, 5, 6]  # best (0.9 at 2) + the last two
    ckpt.close()


def _tmp_entries(d: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in d.iterdir() if "tmp" in p.name] if d.is_dir() else []


def _complete(d: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_a_run_that_resumes(tmp_path):
    run_dir = tmp_path / "run"
    sets = TINY_SETS + ["num_steps=100000", "eval_every=100000", "checkpoint.every=1", "checkpoint.keep=3"]
    cmd = [sys.executable, "-m", "crnet_jax.train", "--workdir", str(run_dir), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    ckdir = run_dir / "checkpoints"
    killed_mid_save = False
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(_complete(ckdir)) >= 2 and _tmp_entries(ckdir):
                proc.send_signal(signal.SIGKILL)  # our own child, by pid
                killed_mid_save = True
                break
            time.sleep(0.001)
    finally:
        if proc.poll() is None and not killed_mid_save:
            proc.kill()
        out = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert killed_mid_save, f"never caught a save in progress; child output:\n{out[-3000:]}"
    assert proc.returncode == -signal.SIGKILL
    partial = _tmp_entries(ckdir)
    complete = _complete(ckdir)
    assert partial, "the interrupted save left its temporary directory behind"
    last = complete[-1]

    from crnet_jax import train

    cfg = tc.load_config(run_dir / "config.json")
    result = train.run(cfg, run_dir, resume=True, stop_at=last + 2, progress=False, log=lambda *a: None)
    assert result.steps == last + 2
    assert not any(p.exists() for p in partial), "the partial save was cleaned up"
    assert _complete(ckdir)[-1] == last + 2
    params = jax.device_get(result.state.params)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
