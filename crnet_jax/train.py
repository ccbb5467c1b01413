"""Train a Res-CR-Net: ``python -m crnet_jax.train``.

Usage::

    python -m crnet_jax.train                                   # quick default: synthetic phantoms, ~2-3 min on 2 CPU cores
    python -m crnet_jax.train --config configs/authors_lung.py --set data.source=folder --set data.path=../shared/data/mcsz512
    python -m crnet_jax.train --config configs/lstm.py --set num_steps=2000 --workdir runs/lstm
    python -m crnet_jax.train --workdir runs/lstm --resume --set num_steps=4000     # continue exactly where it stopped
    # several hosts (or processes): the same command on each, with its own --process_id
    python -m crnet_jax.train --coordinator_address host0:1234 --num_processes 2 --process_id 0 --workdir runs/x

A run directory holds: ``config.json`` (the resolved configuration), ``checkpoints/`` (Orbax,
full training state, last N + best), ``metrics.csv`` and ``tb/`` (every logged value),
``curves.png``, ``val_overlays.png``, ``summary.json`` (final and best validation scores) and
``model/`` (the best model as an inference model directory for crnet_jax.predict / evaluate).

Exit codes: 0 done (or stopped early), 2 bad arguments or configuration, 3 the loss or the
gradients became NaN/Inf (the last good checkpoint is kept; lower the learning rate and
``--resume``).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np

from crnet_jax import distributed
from crnet_jax import train_config as tc
from crnet_jax.host_memory import blocks_in_use, reexec_with_host_memory_settings, settle_block_cache

RUNS_DIR = "runs"
MODEL_DIR = "model"


class TrainingDiverged(RuntimeError):
    """The loss, the gradients or the parameters stopped being finite."""


@dataclasses.dataclass
class RunResult:
    """What a finished run returns (also written to run_dir/summary.json)."""

    run_dir: pathlib.Path
    steps: int
    final: dict[str, float]
    best: dict[str, Any]
    stopped_early: bool
    seconds: float
    state: Any = None  # the final TrainState (replicated jax arrays)


# --------------------------------------------------------------------------- validation

def evaluate(steps, params, batch_stats, source, mesh, global_batch_size: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Validate on every example of ``source``.

    Returns (scalars, per_image): scalars ``dice_mean``, ``dice_median``, ``iou_mean``,
    ``precision_mean``, ``recall_mean``, ``accuracy_mean``, ``loss`` (mean per-image loss) and
    ``pooled_dice`` (the authors' pooled both-class score); per_image maps each metric to (N,).
    """
    from crnet_jax.metrics import pooled_scores
    from crnet_jax.train_data import eval_batches

    rows = distributed.local_rows(mesh, global_batch_size)
    chunks: dict[str, list[np.ndarray]] = {}
    for local, _, valid in eval_batches(source, global_batch_size, rows):
        batch = distributed.global_batch(mesh, local, global_batch_size)
        out = steps.evaluate(params, batch_stats, batch)
        for k, v in out.items():
            chunks.setdefault(k, []).append(np.asarray(v)[valid])
    per_image = {k: np.concatenate(v) for k, v in chunks.items()}
    pooled = pooled_scores({"tp": per_image["pooled_tp"].sum(), "pred": per_image["pooled_pred"].sum(),
                            "true": per_image["pooled_true"].sum()})
    scalars = {
        "dice_mean": float(np.mean(per_image["dice"])),
        "dice_median": float(np.median(per_image["dice"])),
        "iou_mean": float(np.mean(per_image["iou"])),
        "precision_mean": float(np.mean(per_image["precision"])),
        "recall_mean": float(np.mean(per_image["recall"])),
        "accuracy_mean": float(np.mean(per_image["accuracy"])),
        "loss": float(np.mean(per_image["loss"])),
        "pooled_dice": float(pooled["dice"]),
    }
    return scalars, per_image


def metric_value(scalars: dict[str, float], name: str) -> float:
    """The value of ``TrainConfig.val_metric`` in a validation result."""
    return {"dice": scalars["dice_mean"], "iou": scalars["iou_mean"], "loss": scalars["loss"],
            "pooled_dice": scalars["pooled_dice"], "accuracy": scalars["accuracy_mean"]}[name]


# --------------------------------------------------------------------------- run directory

def default_run_dir(root: str = RUNS_DIR) -> pathlib.Path:
    """runs/<YYYYmmdd-HHMMSS>; every process gets the name process 0 chose."""
    stamp = np.array(int(time.time()), np.int64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        stamp = multihost_utils.broadcast_one_to_all(stamp)
    return pathlib.Path(root) / time.strftime("%Y%m%d-%H%M%S", time.localtime(int(stamp)))


def latest_run_dir(root: str = RUNS_DIR) -> pathlib.Path:
    """The newest run under ``root`` that has checkpoints (for ``--resume`` without ``--workdir``)."""
    from crnet_jax.run_checkpoint import CHECKPOINT_DIR

    runs = sorted(p for p in pathlib.Path(root).glob("*") if (p / CHECKPOINT_DIR).is_dir())
    if not runs:
        raise FileNotFoundError(f"--resume: no run with checkpoints under {root}/; pass --workdir RUN_DIR")
    return runs[-1]


def write_inference_model(model_cfg, params, batch_stats, directory: pathlib.Path) -> pathlib.Path:
    """The model as an inference directory (config.json + Orbax state) readable by
    :func:`crnet_jax.checkpoint.load_model`. With several processes only process 0 writes."""
    from flax import nnx

    from crnet_jax import checkpoint
    from crnet_jax.model import ResCRNet

    params, batch_stats = jax.device_get((params, batch_stats))
    model = nnx.eval_shape(lambda: ResCRNet(model_cfg, rngs=nnx.Rngs(0)))  # structure only, no init work
    nnx.update(model, params, batch_stats)
    model.eval()
    if jax.process_count() == 1:
        return checkpoint.save_model(model, directory, overwrite=True)
    # Orbax coordinates all processes by default; here one process writes host arrays alone.
    import shutil

    import orbax.checkpoint as ocp

    if distributed.is_primary():
        directory = directory.absolute()
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        (directory / checkpoint.CONFIG_FILE).write_text(model.cfg.to_json())
        opts = ocp.options.MultiprocessingOptions(primary_host=0, active_processes={0})
        with ocp.StandardCheckpointer(multiprocessing_options=opts) as ckptr:
            ckptr.save(directory / checkpoint.STATE_DIR, checkpoint.model_state(model))
            ckptr.wait_until_finished()
    return directory


# --------------------------------------------------------------------------- the run

def _runtime_model_config(model_cfg, log):
    """The model config the steps are built with. Several processes on CPU: the C++ depthwise
    kernels ("ffi") hang or abort inside cross-process (gloo) collectives, so "auto" becomes the
    pure-JAX "shift" implementation there (same results; the saved config keeps "auto")."""
    if jax.process_count() > 1 and model_cfg.depthwise_impl == "auto":
        from crnet_jax.depthwise import default_implementation

        if default_implementation() == "ffi":
            log("note      several CPU processes: depthwise convolutions use the pure-JAX 'shift' kernels "
                "(the C++ 'ffi' kernels do not work with cross-process collectives)")
            return model_cfg.replace(depthwise_impl="shift")
    return model_cfg


@functools.lru_cache(maxsize=4)
def _initial_model(model_cfg, seed: int):
    """(ModelDef, params, batch_stats, parameter counts) of a fresh model; cached per process."""
    from crnet_jax import step as step_lib
    from crnet_jax.model import count_parameters

    model = step_lib.create_model(model_cfg, seed)
    return (*step_lib.split_model(model), count_parameters(model))


@functools.lru_cache(maxsize=4)
def _model_and_steps(model_cfg, optim_cfg, num_steps: int, loss: str, augment_cfg, seed: int, mesh):
    """Initial model state, optimiser and jitted steps for a configuration. Cached, so runs in
    one process with the same settings (tests, sweeps over data) compile only once."""
    from crnet_jax import optimizer as optim_lib
    from crnet_jax import step as step_lib

    model_def, params, batch_stats, counts = _initial_model(model_cfg, seed)
    tx = optim_lib.make_optimizer(optim_cfg, num_steps)
    steps = step_lib.compile_steps(mesh, model_def, tx, loss_name=loss, augment_cfg=augment_cfg, seed=seed,
                                   lr_fn=optim_lib.current_learning_rate(optim_cfg, num_steps))
    return model_def, params, batch_stats, tx, steps, counts


def run(cfg: tc.TrainConfig, run_dir: str | pathlib.Path, *, resume: bool = False, progress: bool = True,
        stop_at: int | None = None, log=print) -> RunResult:
    """Train ``cfg`` in ``run_dir`` (created), or continue it with ``resume=True``.

    ``stop_at``: leave after this step with a checkpoint, as if interrupted there (a later
    ``resume=True`` continues exactly; used for time-sliced jobs and by the tests).

    Raises TrainingDiverged when the loss or gradients become NaN/Inf (the checkpoints written
    before that step are kept).
    """
    from tqdm.auto import tqdm

    from crnet_jax import report
    from crnet_jax import step as step_lib
    from crnet_jax import train_data
    from crnet_jax.run_checkpoint import RunCheckpointer

    t_start = time.time()
    primary = distributed.is_primary()
    log = log if primary else (lambda *a, **k: None)
    run_dir = pathlib.Path(run_dir)
    mesh = distributed.data_mesh(cfg.num_devices)
    n_dev = mesh.devices.size
    for name, b in (("batch_size", cfg.batch_size), ("eval_batch_size", cfg.global_eval_batch_size)):
        if b % n_dev:
            raise ValueError(f"{name}={b} is not divisible by the {n_dev} devices; pick a multiple of {n_dev} "
                             f"(--set {name}=...) or fewer devices (--set num_devices=...)")

    ckpt = RunCheckpointer(run_dir, keep=cfg.checkpoint.keep, keep_best=cfg.checkpoint.save_best,
                           asynchronous=cfg.checkpoint.asynchronous)
    existing = ckpt.latest_step()
    if existing is not None and not resume:
        raise FileExistsError(f"{run_dir} already has checkpoints (last step {existing}); continue it with --resume "
                              "or pick a new --workdir")
    if resume and existing is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint to resume from; start it without --resume")
    if primary:
        run_dir.mkdir(parents=True, exist_ok=True)
        tc.save_config(cfg, run_dir / "config.json")

    # Model, optimiser, state.
    aug = cfg.augment if cfg.data.augment else None
    model_cfg = _runtime_model_config(cfg.model, log)
    schedule_steps = cfg.num_steps if cfg.optim.schedule == "cosine" else 0  # only cosine depends on it
    model_def, params, batch_stats, tx, steps, counts = _model_and_steps(
        model_cfg, cfg.optim, schedule_steps, cfg.loss, aug, cfg.seed, mesh)
    state = step_lib.replicate(step_lib.init_train_state(params, batch_stats, tx, cfg.seed), mesh)
    meta: dict[str, Any] = {}
    if resume:
        state, meta = ckpt.restore(existing, like=state)
    start = int(jax.device_get(state.step))
    best = dict(meta.get("best") or {"metric": cfg.val_metric, "value": None, "step": None})
    bad_evals = int(meta.get("early_stopping", {}).get("bad_evals", 0))
    best_host = None
    if best.get("step") is not None and best["step"] in ckpt.steps():
        best_state, _ = ckpt.restore(best["step"], like=state)
        best_host = jax.device_get((best_state.params, best_state.batch_stats))

    # Data.
    train_src, val_src, data_desc = train_data.make_sources(cfg.data)
    batches = train_data.TrainBatches(train_src, seed=cfg.seed, global_batch_size=cfg.batch_size,
                                      rows=distributed.local_rows(mesh, cfg.batch_size), start_step=start,
                                      prefetch=cfg.data.prefetch)
    if resume and meta.get("seed") not in (None, cfg.seed):
        log(f"warning: the run was checkpointed with seed {meta['seed']}, now seed {cfg.seed}: data order and "
            "augmentation change from here on (dropout keeps the checkpoint's key)")
    if resume and meta.get("data", {}).get("next_step") not in (None, start):
        raise RuntimeError(f"{ckpt.directory / str(start)}: its data position ({meta['data']['next_step']}) does not "
                           f"match its step ({start}); the checkpoint is inconsistent")
    if resume and meta.get("data", {}).get("num_examples") not in (None, len(train_src)):
        log(f"warning: the training set had {meta['data']['num_examples']} examples when checkpointed, "
            f"now {len(train_src)}; the data order differs from the original run")
    writer = report.MetricsWriter(run_dir, resume_step=start if resume else None) if primary else None

    log(f"run dir   {run_dir}")
    log(f"data      {data_desc}" + (f" [{cfg.label}]" if cfg.label else ""))
    log(f"model     {cfg.model.num_conv_res} CONV RES + {cfg.model.num_lstm_res} LSTM RES, "
        f"{counts['trainable']:,} parameters, {cfg.model.dtype} compute")
    log(f"devices   {n_dev} x {jax.devices()[0].platform} over {jax.process_count()} process(es); "
        f"global batch {cfg.batch_size}, {cfg.data.height} x {cfg.data.width}")
    if resume:
        log(f"resuming  at step {start} of {cfg.num_steps} from {ckpt.directory / str(start)}")
    else:
        log(f"training  {cfg.num_steps} steps, validating every {cfg.eval_every}")

    def meta_for(next_step: int, val: dict[str, float] | None) -> dict[str, Any]:
        return {"step": next_step, "data": batches.position(next_step), "best": best,
                "early_stopping": {"bad_evals": bad_evals, "patience": cfg.early_stopping_patience},
                "val": val, "seed": cfg.seed, "time": time.time()}

    pending: list[tuple[int, dict]] = []
    # On CPU, dispatch a step only once the previous one is done and its memory is back (the
    # next batch is read and placed meanwhile): XLA:CPU allocates a step's temporaries when
    # the step is dispatched, so a step queued behind a running one maps a second step-sized
    # block, where the block cache preloaded by the entry points (crnet_jax.host_memory)
    # would have served the first one again with no page faults. The devices are the host's
    # cores, so nothing is lost; accelerators keep their queue.
    one_step_in_flight = mesh.devices.flat[0].platform == "cpu"
    blocks_before_step = 0
    window = {"t": time.time(), "images": 0}
    last_val: dict[str, float] | None = None
    stopped_early = was_interrupted = False
    bar = tqdm(total=cfg.num_steps, initial=start, disable=not (progress and primary), unit="step",
               dynamic_ncols=True, desc="train")

    def flush() -> None:
        """Fetch the pending step scalars, stop on NaN/Inf, log them, update the bar."""
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        for (s, _), m in zip(pending, fetched):
            if not (m["finite"] > 0 and math.isfinite(float(m["loss"]))):
                last = ckpt.latest_step()
                kept = (f"the last good checkpoint is step {last} in {ckpt.directory}" if last is not None else
                        "no checkpoint had been written yet (save more often with --set checkpoint.every=N)")
                raise TrainingDiverged(
                    f"step {s}: loss {float(m['loss'])}, gradient norm {float(m['grad_norm'])}: the loss, gradients or "
                    f"parameters are no longer finite. Training stopped; {kept}. Lower the learning rate "
                    f"(--set optim.learning_rate=...), clip gradients (--set optim.clip_norm=1.0) or compute in "
                    f"float32, then continue with --resume.")
        elapsed = max(time.time() - window["t"], 1e-9)
        ips = window["images"] / elapsed
        if writer is not None:
            for (s, _), m in zip(pending, fetched):
                writer.write(s, {"train/loss": m["loss"], "train/grad_norm": m["grad_norm"], "train/lr": m["lr"]})
            writer.write(pending[-1][0], {"train/images_per_s": ips})
        bar.set_postfix(loss=f"{float(fetched[-1]['loss']):.4f}", img_s=f"{ips:.1f}", refresh=False)
        bar.update(len(pending))
        pending.clear()
        window.update(t=time.time(), images=0)

    try:
        for s, local in batches:
            if s >= cfg.num_steps:
                break
            batch = distributed.global_batch(mesh, local, cfg.batch_size)
            if one_step_in_flight:
                if pending:
                    jax.block_until_ready(pending[-1][1])
                    settle_block_cache(blocks_before_step)
                blocks_before_step = blocks_in_use()
            state, m = steps.train(state, batch)
            pending.append((s, m))
            window["images"] += cfg.batch_size
            nxt = s + 1
            last = nxt == cfg.num_steps
            interrupted = stop_at is not None and nxt >= stop_at and not last
            do_eval = nxt % cfg.eval_every == 0 or last
            do_save = do_eval or interrupted or bool(cfg.checkpoint.every and nxt % cfg.checkpoint.every == 0)
            if nxt % cfg.log_every == 0 or do_eval or do_save:
                flush()
            score = None
            if do_eval:
                t_eval = time.time()
                last_val, _ = evaluate(steps, state.params, state.batch_stats, val_src, mesh, cfg.global_eval_batch_size)
                value = metric_value(last_val, cfg.val_metric)
                sign = -1.0 if cfg.val_mode == "min" else 1.0
                score = sign * value
                improved = best["value"] is None or sign * (value - best["value"]) > cfg.early_stopping_min_delta
                if improved:
                    best.update(metric=cfg.val_metric, value=value, step=nxt, scores=last_val)
                    best_host = jax.device_get((state.params, state.batch_stats))
                    bad_evals = 0
                else:
                    bad_evals += 1
                if writer is not None:
                    writer.write(nxt, {f"val/{k}": v for k, v in last_val.items()})
                if primary:
                    message = (f"step {nxt:>6}: val lung Dice mean {last_val['dice_mean']:.4f} median "
                               f"{last_val['dice_median']:.4f}, IoU {last_val['iou_mean']:.4f}, pooled "
                               f"{last_val['pooled_dice']:.4f}, loss {last_val['loss']:.4f}" + ("  *best*" if improved else ""))
                    bar.write(message) if progress else log(message)
                window["t"] += time.time() - t_eval  # images/s counts training time only
                if cfg.early_stopping_patience and bad_evals >= cfg.early_stopping_patience:
                    stopped_early = True
            if do_save or stopped_early:
                ckpt.save(state, meta_for(nxt, last_val if do_eval else None), score=score)
            if interrupted:
                was_interrupted = True
                log(f"stopping at step {nxt} as asked (--stop-at); continue with --resume")
                break
            if stopped_early:
                log(f"early stopping at step {nxt}: no improvement of {cfg.val_metric} for {bad_evals} validations "
                    f"(best {best['value']:.4f} at step {best['step']})")
                break
        flush()
    finally:
        batches.close()
        bar.close()
        ckpt.close()
        if writer is not None:
            writer.close()

    final_step = int(jax.device_get(state.step))
    if was_interrupted:
        return RunResult(run_dir, final_step, last_val or {}, best, False, time.time() - t_start, state)
    if last_val is None:  # nothing trained (already at num_steps): validate what we have
        last_val, _ = evaluate(steps, state.params, state.batch_stats, val_src, mesh, cfg.global_eval_batch_size)
    if best_host is None:
        best_host = jax.device_get((state.params, state.batch_stats))
        best.update(metric=cfg.val_metric, value=metric_value(last_val, cfg.val_metric), step=final_step,
                    scores=last_val)

    # The best model for inference, figures and the summary.
    model_dir = write_inference_model(cfg.model, *best_host, run_dir / MODEL_DIR)
    if primary:  # predict/evaluate/export preprocess films exactly as this run did
        from crnet_jax import train_data
        from crnet_jax.predict import write_preprocess_config

        write_preprocess_config(train_data.preprocess_config(cfg.data), model_dir)
        _figures(cfg, run_dir, steps, best_host, val_src, mesh, data_desc, best)
    else:
        _figures(cfg, None, steps, best_host, val_src, mesh, data_desc, best)  # collectives need every process
    seconds = time.time() - t_start
    result = RunResult(run_dir, final_step, last_val, best, stopped_early, seconds, state)
    if primary:
        summary = {"final_step": final_step, "final_val": last_val, "best": best, "stopped_early": stopped_early,
                   "seconds": seconds, "data": data_desc, "label": cfg.label, "parameters": counts,
                   "model_dir": str(model_dir), "devices": n_dev, "processes": jax.process_count()}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
        log(f"final     step {final_step}: validation lung Dice mean {last_val['dice_mean']:.4f} "
            f"(median {last_val['dice_median']:.4f}), IoU {last_val['iou_mean']:.4f}, pooled both-class "
            f"{last_val['pooled_dice']:.4f}")
        log(f"best      {best['metric']} {best['value']:.4f} at step {best['step']}; inference model in {model_dir}")
        log(f"done in   {seconds:.0f} s; see {run_dir}/curves.png, val_overlays.png, metrics.csv, tb/")
    return result


def _figures(cfg, run_dir, steps, best_host, val_src, mesh, data_desc: str, best: dict) -> None:
    """curves.png and val_overlays.png (the best model on the first validation examples)."""
    from crnet_jax import report
    from crnet_jax.step import replicate

    n = min(cfg.num_overlays, len(val_src))
    if n > 0:
        params, batch_stats = replicate(best_host, mesh)
        b = cfg.global_eval_batch_size
        rows = distributed.local_rows(mesh, b)
        images, truths, preds = [], [], []
        from crnet_jax.train_data import eval_batches

        for local, idx, valid in eval_batches(_Head(val_src, n), b, rows):
            batch = distributed.global_batch(mesh, local, b)
            p = np.asarray(steps.predict(params, batch_stats, batch["image"]))[valid]
            preds.append(p[..., 0] >= 0.5)
            items = [val_src[int(i)] for i in idx[valid]]
            images += [it["image"] for it in items]
            truths += [it["mask"][..., 0] >= 0.5 for it in items]
        preds = np.concatenate(preds)
        if run_dir is not None:
            dice = [_dice(t, p) for t, p in zip(truths, preds)]
            ids = [val_src[i]["id"] for i in range(n)]
            report.plot_overlays(np.stack(images), np.stack(truths), preds, run_dir / "val_overlays.png", ids=ids,
                                 dice=dice, title=f"best model (step {best['step']}) on validation: {data_desc}")
    if run_dir is not None:
        report.plot_curves(run_dir / report.CSV_NAME, run_dir / "curves.png",
                           title=f"{run_dir.name}: {data_desc}" + (f" [{cfg.label}]" if cfg.label else ""))


class _Head:
    """The first n items of a source."""

    def __init__(self, source, n: int):
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.source[i]


def _dice(truth: np.ndarray, pred: np.ndarray) -> float:
    inter = np.logical_and(truth, pred).sum()
    total = truth.sum() + pred.sum()
    return 1.0 if total == 0 else float(2 * inter / total)


# --------------------------------------------------------------------------- command line

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m crnet_jax.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Config keys: see crnet_jax/train_config.py (TrainConfig and its nested dataclasses).")
    p.add_argument("--config", help="configs/*.py (defining `config` or `get_config()`) or a run's config.json")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, dotted for nested ones (repeatable): --set optim.learning_rate=3e-4")
    p.add_argument("--workdir", help=f"run directory (default: {RUNS_DIR}/<timestamp>; with --resume: the newest run)")
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir from its last checkpoint")
    p.add_argument("--stop-at", type=int, metavar="STEP", help="leave after this step with a checkpoint (resume later)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in logs)")
    p.add_argument("--coordinator_address", help="host:port of process 0 (several processes; env JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num_processes", type=int, help="number of processes (env JAX_NUM_PROCESSES)")
    p.add_argument("--process_id", type=int, help="this process's id in [0, num_processes) (env JAX_PROCESS_ID)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[tc.TrainConfig, pathlib.Path]:
    """The run's config and directory from the command line."""
    if args.resume:
        run_dir = pathlib.Path(args.workdir) if args.workdir else latest_run_dir()
        source = args.config or (run_dir / "config.json")
    else:
        run_dir = pathlib.Path(args.workdir) if args.workdir else None
        source = args.config
    cfg = tc.apply_overrides(tc.load_config(source), args.overrides)
    return cfg, run_dir


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # the command line: malloc settings and block cache (crnet_jax.host_memory)
        reexec_with_host_memory_settings("crnet_jax.train")
    args = parse_args(argv)
    try:
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
        cfg, run_dir = resolve(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_json())
        return 0
    run_dir = run_dir or default_run_dir()
    try:
        run(cfg, run_dir, resume=args.resume, progress=not args.no_progress, stop_at=args.stop_at)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
