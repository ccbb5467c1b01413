"""Pure training and evaluation steps, and their compilation over a data mesh.

The model is split ONCE into a graph definition (static) and its state: parameters
(``nnx.Param``), BatchNorm statistics (``nnx.BatchStat``) and dropout RNG streams. The steps
are plain functions of arrays that rebuild the module with ``nnx.merge(..., copy=True)``
inside ``jax.jit``; no ``nnx.jit`` in the hot loop.

Randomness of step ``s`` comes from ``(seed, s)`` only: dropout keys are
``fold_in(fold_in(fold_in(key(seed), DROPOUT_TAG), s), stream_index)`` and augmentation uses
:func:`crnet_jax.augment.augment_batch` with (seed, s, global example index). A resumed run
therefore repeats a straight run exactly.

Shapes: batch ``image`` (B, H, W, C) float32 in [0, 1], ``mask`` (B, H, W, K) float32 one-hot
(channel 0 = lung); B is the GLOBAL batch, sharded over the mesh axis ``'data'``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from crnet_jax import augment as augment_lib
from crnet_jax import distributed
from crnet_jax.config import ModelConfig
from crnet_jax.losses import defu_dice_loss, tanimoto_loss
from crnet_jax.metrics import pooled_counts, segmentation_metrics

DROPOUT_TAG = 0x0D50


@flax.struct.dataclass
class TrainState:
    """Everything a training step changes.

    step: () int32, optimiser updates applied so far.
    params: the model's ``nnx.Param`` state (float32 by default).
    batch_stats: the model's ``nnx.BatchStat`` state (BatchNorm running mean / var).
    opt_state: optax state.
    rng: (2,) uint32 raw key data of ``jax.random.key(seed)``; the root of all randomness.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """The static halves of a split ResCRNet: graph definitions in training and inference
    mode, and the structure of its dropout RNG state (rebuilt fresh inside every step)."""

    cfg: ModelConfig
    train_graph: Any
    eval_graph: Any
    rng_leaves: tuple[jax.ShapeDtypeStruct, ...]
    rng_treedef: Any

    def rng_state(self, key: jax.Array) -> Any:
        """Dropout stream state with every stream keyed ``fold_in(key, i)`` and counts zeroed."""
        new = []
        for i, leaf in enumerate(self.rng_leaves):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                new.append(jnp.broadcast_to(jax.random.fold_in(key, i), leaf.shape))
            else:
                new.append(jnp.zeros(leaf.shape, leaf.dtype))
        return jax.tree.unflatten(self.rng_treedef, new)

    def merge(self, params: Any, batch_stats: Any, key: jax.Array, train: bool) -> nnx.Module:
        graph = self.train_graph if train else self.eval_graph
        return nnx.merge(graph, params, batch_stats, self.rng_state(key), copy=True)


def create_model(cfg: ModelConfig, seed: int) -> nnx.Module:
    """A freshly initialised ResCRNet, its initialisers run as ONE compiled program (eager
    initialisation compiles every small op separately, seconds on a CPU)."""
    from crnet_jax.model import ResCRNet

    make = lambda: ResCRNet(cfg, rngs=nnx.Rngs(seed))  # noqa: E731
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.state(make()))()
    return nnx.merge(graphdef, state)


def split_model(model: nnx.Module) -> tuple[ModelDef, Any, Any]:
    """ResCRNet -> (ModelDef, params, batch_stats). The model object is left in eval mode."""
    model.train()
    train_graph, params, batch_stats, rngs = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    model.eval()
    eval_graph, _, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    leaves, treedef = jax.tree.flatten(rngs)
    structs = tuple(jax.ShapeDtypeStruct(jnp.shape(x), x.dtype) for x in leaves)
    return ModelDef(model.cfg, train_graph, eval_graph, structs, treedef), params, batch_stats


def init_train_state(params: Any, batch_stats: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Step 0 state; the optimiser state starts from ``params``."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(seed)))


def loss_function(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """(probabilities (B,H,W,K), targets (B,H,W,K)) -> float32 scalar loss."""
    if name == "tanimoto_weighted":
        return functools.partial(tanimoto_loss, weighted=True)
    if name == "tanimoto":
        return functools.partial(tanimoto_loss, weighted=False)
    if name == "defu_dice":
        return defu_dice_loss
    raise ValueError(f"unknown loss {name!r}; choose tanimoto_weighted, tanimoto or defu_dice")


def step_keys(rng: jax.Array, step: jax.Array) -> jax.Array:
    """Typed dropout key of one step from the root key data and the step number."""
    root = jax.random.fold_in(jax.random.wrap_key_data(rng), DROPOUT_TAG)
    return jax.random.fold_in(root, step)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model_def: ModelDef,
               tx: optax.GradientTransformationExtraArgs, loss_name: str,
               augment_cfg: augment_lib.AugmentConfig | None, seed: int,
               lr_fn: Callable[[jax.Array, Any], jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on a global batch.

    Returns the new state and scalars of the step (computed BEFORE the update): ``loss``,
    ``grad_norm``, ``lr`` and ``finite`` (1.0 when loss, gradients and the new parameters are
    all finite, else 0.0).
    """
    x, y = batch["image"], batch["mask"]
    if augment_cfg is not None:
        x, y = augment_lib.augment_batch(x, y, seed, state.step, augment_cfg)
    loss_fn = loss_function(loss_name)
    key = step_keys(state.rng, state.step)

    def objective(params):
        model = model_def.merge(params, state.batch_stats, key, train=True)
        p = model(x)
        return loss_fn(p, y), nnx.state(model, nnx.BatchStat)

    (loss, batch_stats), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    lr = lr_fn(state.step, state.opt_state)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(params))
    new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "finite": finite.astype(jnp.float32)}
    return new, metrics


def predict_step(params: Any, batch_stats: Any, image: jax.Array, *, model_def: ModelDef) -> jax.Array:
    """Inference-mode probabilities (B, H, W, K) float32 (BatchNorm running statistics, no dropout)."""
    model = model_def.merge(params, batch_stats, jax.random.key(0), train=False)
    return model(image)


def eval_step(params: Any, batch_stats: Any, batch: dict[str, jax.Array], *, model_def: ModelDef,
              loss_name: str) -> dict[str, jax.Array]:
    """Per-image validation numbers, each (B,): lung ``dice``, ``iou``, ``precision``,
    ``recall``, ``f1``, pixel ``accuracy``; ``loss`` (the training loss of the image alone); and the
    authors' pooled both-class counts ``pooled_tp``, ``pooled_pred``, ``pooled_true`` (sum them
    over images, then :func:`crnet_jax.metrics.pooled_scores`)."""
    p = predict_step(params, batch_stats, batch["image"], model_def=model_def)
    y = batch["mask"]
    out = dict(segmentation_metrics(p, y))
    loss_fn = loss_function(loss_name)
    out["loss"] = jax.vmap(lambda pi, yi: loss_fn(pi[None], yi[None]))(p, y)
    pooled = jax.vmap(lambda pi, yi: pooled_counts(pi[None], yi[None]))(p, y)
    out.update({f"pooled_{k}": v for k, v in pooled.items()})
    return out


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
    """The jitted steps of a run, bound to a mesh.

    train(state, batch) -> (state, scalars): state replicated and DONATED, batch sharded on 'data'.
    evaluate(params, batch_stats, batch) -> per-image dict (B,), replicated.
    predict(params, batch_stats, image) -> (B, H, W, K), replicated.
    """

    mesh: Any
    train: Callable
    evaluate: Callable
    predict: Callable


def compile_steps(mesh, model_def: ModelDef, tx: optax.GradientTransformationExtraArgs, *, loss_name: str,
                  augment_cfg: augment_lib.AugmentConfig | None, seed: int,
                  lr_fn: Callable[[jax.Array, Any], jax.Array]) -> CompiledSteps:
    """jax.jit the steps with explicit shardings: batch on 'data', everything else replicated."""
    rep = distributed.replicated(mesh)
    data = distributed.batch_sharded(mesh)
    train = jax.jit(
        functools.partial(train_step, model_def=model_def, tx=tx, loss_name=loss_name,
                          augment_cfg=augment_cfg, seed=seed, lr_fn=lr_fn),
        in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=(0,))
    evaluate = jax.jit(functools.partial(eval_step, model_def=model_def, loss_name=loss_name),
                       in_shardings=(rep, rep, data), out_shardings=rep)
    predict = jax.jit(functools.partial(predict_step, model_def=model_def),
                      in_shardings=(rep, rep, data), out_shardings=rep)
    return CompiledSteps(mesh, train, evaluate, predict)


def replicate(tree: Any, mesh) -> Any:
    """Place a host / single-device pytree on every device of ``mesh`` (works with several processes)."""
    sharding = distributed.replicated(mesh)

    def put(x):
        x = np.array(jax.device_get(x), copy=True)  # never alias a buffer that the step will donate
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, tree)
