"""Checkpoints of a training run: an Orbax ``CheckpointManager`` of the full state.

Each checkpoint ``run_dir/checkpoints/<step>/`` has two items:

* ``state``: the :class:`crnet_jax.step.TrainState` as a dict: ``step``, ``params``,
  ``batch_stats`` (BatchNorm statistics), ``opt_state`` (optax), ``rng`` (root key data);
* ``meta``: JSON with the data-iterator position, the best validation metric so far (value and
  step), the early-stopping counter, and the step's validation metrics when there were some.

Saves are asynchronous (written by a background thread once the arrays are on the host) and
atomic: Orbax writes into a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous checkpoints intact and the partial one is ignored (and
cleaned up) when the run is opened again. Preservation: the last ``keep`` checkpoints and the
one with the best validation score.
"""
from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from crnet_jax.step import TrainState

CHECKPOINT_DIR = "checkpoints"
SCORE = "score"  # the metric key ranked by the preservation policy (higher is better)


def state_to_dict(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "rng": state.rng}


def state_from_dict(d: dict[str, Any]) -> TrainState:
    return TrainState(step=d["step"], params=d["params"], batch_stats=d["batch_stats"],
                      opt_state=d["opt_state"], rng=d["rng"])


class RunCheckpointer:
    """Saves and restores a run's TrainState plus JSON metadata.

    Args:
      run_dir: the run directory; checkpoints go to ``run_dir/checkpoints``.
      keep: how many of the most recent checkpoints to keep (>= 1).
      keep_best: also keep the checkpoint with the highest score (see :meth:`save`).
      asynchronous: write in the background (call :meth:`wait` or :meth:`close` to finish).
    """

    def __init__(self, run_dir: str | pathlib.Path, *, keep: int = 2, keep_best: bool = True,
                 asynchronous: bool = True):
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        self.directory = pathlib.Path(run_dir).absolute() / CHECKPOINT_DIR
        keepers: list[Any] = [policies.LatestN(keep)]
        if keep_best:
            keepers.append(policies.BestN(get_metric_fn=lambda m: m[SCORE], reverse=False, n=1,
                                          keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keepers),
            enable_async_checkpointing=asynchronous,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def save(self, state: TrainState, meta: dict[str, Any], score: float | None = None) -> None:
        """Save ``state`` at its step. ``score`` (higher is better; pass -loss for losses) ranks it
        for the keep-the-best policy; checkpoints without a score are kept only as recent ones."""
        step = int(jax.device_get(state.step))
        metrics = None if score is None else {SCORE: float(score)}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state_to_dict(state)),
                                                        meta=ocp.args.JsonSave(meta)),
                          metrics=metrics, force=True)

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk (partial ones are never listed)."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def restore(self, step: int, like: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """Read checkpoint ``step`` into arrays shaped, typed and sharded like ``like``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_to_dict(like))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise RuntimeError(
                f"{self.directory / str(step)}: cannot restore this checkpoint ({type(e).__name__}: {e}). "
                "Was it written with a different model or optimiser configuration? Resume with the run's own "
                "config.json, or start a new run.") from e
        return state_from_dict(restored.state), dict(restored.meta)

    def read_meta(self, step: int) -> dict[str, Any]:
        """Only the JSON metadata of checkpoint ``step``."""
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
