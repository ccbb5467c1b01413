"""ResCRNet: the fully convolutional, pooling-free Res-CR-Net.

Without LSTM blocks (the authors' lung network, CXR-Net Module_1):
    STEM -> dropout -> (CONV RES -> dropout) x (num_conv_res - 1) -> CONV RES -> head -> softmax
With m >= 1 LSTM RES blocks (the authors' microscopy network):
    STEM -> dropout -> (CONV RES -> dropout) x num_conv_res -> LSTM RES x m -> softmax
Dropout is SpatialDropout2D, active only in training mode (`model.train()` / `model.eval()`).
In training each block hands the next its output's per-image channel sums (taken by its
kernels as they write it) for the next pre-activation BatchNorm's moments: see
`ResidualBlock.forward`.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.custom_derivatives import SymbolicZero

from crnet_jax.blocks import Head, ResidualBlock, conv_res_block, stem_block
from crnet_jax.config import ModelConfig
from crnet_jax.layers import spatial_dropout


def _opaque_true(a: jax.Array) -> jax.Array:
    """A boolean scalar that is True for every value of `a` but that XLA cannot constant-fold:
    (bits of a[0]) | 1 is odd, hence never 0."""
    v = a.reshape(-1)[0]
    u = lax.bitcast_convert_type(v, jnp.dtype(f"uint{jnp.dtype(v.dtype).itemsize * 8}"))
    return (u | 1) != 0


def recompute_in_backward(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` (pytrees of arrays in and out), rematerialised under reverse-mode AD: the
    forward keeps only `args`; the backward recomputes `fn` and its VJP.

    Why not `jax.checkpoint`: it is correct at the jaxpr level (the backward `remat2` reads
    only the block input), but its guard against XLA undoing it is an `optimization_barrier`
    on the recomputation's INPUTS, and XLA:CPU removes every barrier early in its pipeline
    (cse_barrier_expander, before fusion and scheduling). The recomputation then depends only
    on forward values, so the scheduler interleaves it with the forward pass and every
    recomputed activation lives until the backward: no memory is saved (measured: identical
    compiled temp bytes with and without it, whatever the policy), and XLA fusion further
    duplicates the elementwise cotangent expressions across blocks.

    Here the recomputation and the VJP run inside a `lax.cond` whose operands include the
    incoming cotangent: a conditional cannot start before its operands exist (so nothing is
    hoisted into the forward pass), XLA does not fuse across it (its operands, the saved block
    input among them, are materialised once; its outputs are materialised), and its
    predicate is always true but not constant-foldable, so XLA keeps it. The false branch
    (dead) returns zeros. Values are identical to calling `fn` directly: same operations,
    same order. Forward-mode AD (jax.jvp) of the result is not supported (custom_vjp).
    """
    leaves, in_tree = jax.tree.flatten(args)
    box: dict[str, Any] = {}

    def flat(*leaves):
        out, box["out_tree"] = jax.tree.flatten(fn(*jax.tree.unflatten(in_tree, leaves)))
        return out

    @jax.custom_vjp
    def call(*leaves):
        return flat(*leaves)

    def fwd(*primals):
        vals = [p.value for p in primals]
        # cotangents are needed for inputs that are perturbed and differentiable
        box["need"] = [p.perturbed and jnp.issubdtype(jnp.result_type(p.value), jnp.inexact) for p in primals]
        return flat(*vals), vals

    def bwd(vals, cts):
        need = box["need"]
        live = [i for i, c in enumerate(cts) if not isinstance(c, SymbolicZero)
                and jnp.issubdtype(jnp.result_type(c), jnp.inexact)]
        if not live or not any(need):
            return tuple(None for _ in vals)
        diff = [v for v, n in zip(vals, need) if n]
        rest = [v for v, n in zip(vals, need) if not n]
        live_cts = [cts[i] for i in live]

        def merged(diff, rest):
            it_d, it_r = iter(diff), iter(rest)
            return [next(it_d) if n else next(it_r) for n in need]

        def grads(diff, rest, live_cts):
            def f_live(*d):
                out = flat(*merged(d, rest))
                return [out[i] for i in live]

            _, vjp = jax.vjp(f_live, *diff)
            return list(vjp(live_cts))

        def dead(diff, rest, live_cts):
            return [jnp.zeros_like(d) for d in diff]

        gd = iter(lax.cond(_opaque_true(live_cts[0]), grads, dead, diff, rest, live_cts))
        return tuple(next(gd) if n else None for n in need)

    call.defvjp(fwd, bwd, symbolic_zeros=True)
    out = call(*leaves)
    return jax.tree.unflatten(box["out_tree"], out)


def _in_training(block: nnx.Module) -> bool:
    """True when some BatchNorm of the block uses batch statistics or some dropout is active
    (`model.train()`); in inference mode there is no backward pass to save memory for."""
    for _, node in nnx.iter_graph(block):
        if isinstance(node, nnx.BatchNorm) and not node.use_running_average:
            return True
        if getattr(node, "deterministic", True) is False:  # nnx.Dropout, the LSTM block's recurrent dropout
            return True
    return False


def _apply(block: nnx.Module, x: jax.Array, remat: bool | str, sums=None, want_sums: bool = False):
    """Call a block; with remat (training mode only) only its input is kept for the backward pass, which recomputes
    the block's activations (`recompute_in_backward` over the block as a pure function of its
    state; the updated non-parameter state, BatchNorm statistics and RNG counts, is written
    back to the module afterwards). remat "branches": a residual block runs as it is, since
    in training it keeps only its input and its branches' first convolutions (its shortcut's
    backward needs nothing else, `crnet_jax.pointwise_bn`): there is nothing cheap left to
    recompute; other blocks (LSTM RES) as True.

    Returns (y, per-image sums of y or None): a residual block takes its input's sums
    and, with want_sums, returns its output's (`ResidualBlock.forward`)."""
    residual = isinstance(block, ResidualBlock)

    def run(b, x, sums):
        return b.forward(x, sums, want_sums) if residual else (b(x), None)

    if not remat or not _in_training(block) or (remat == "branches" and residual):
        return run(block, x, sums)
    graphdef, state = nnx.split(block)

    def pure(state, x, sums):
        b = nnx.merge(graphdef, state, copy=True)
        return run(b, x, sums), nnx.state(b, nnx.Not(nnx.Param))

    out, new_state = recompute_in_backward(pure, state, x, sums)
    nnx.update(block, new_state)
    return out


@jax.custom_vjp
def _masked(y: jax.Array, mask: jax.Array) -> jax.Array:
    """y (B, H, W, C) * mask (B, 1, 1, C), materialised: computed inside a conditional (see
    `recompute_in_backward` for why XLA keeps it), so no later fusion recomputes it from y.
    Written plainly, XLA fuses the product into the backward's elementwise pass over the
    next block's input gradient and keeps y alive until then, besides the product itself
    (which the kernels read): one more (B, H, W, C) tensor per dropout for the whole step
    (0.73 GiB at 300 x 340 x 8). The backward is the plain g * mask, free to fuse."""
    return lax.cond(_opaque_true(mask), lambda y, m: y * m, lambda y, m: y, y, mask)


def _masked_fwd(y, mask):
    return _masked(y, mask), mask


def _masked_bwd(mask, g):
    return g * mask, jnp.zeros_like(mask)


_masked.defvjp(_masked_fwd, _masked_bwd)


def _spatial_dropout(dropout: nnx.Dropout, y: jax.Array, sums):
    """dropout(y) and, given y's per-image sums (sum, sum of squares), (B, C) each, those of
    the result (else None). In training the channel mask (scaled by 1 / keep) that
    dropout(y) draws, drawn as dropout(ones (B, 1, 1, C)) (same key, same shape),
    multiplies y (`_masked`: the product is materialised once, whatever the
    implementation) and the sums (its square the sums of squares)."""
    if dropout.deterministic or dropout.rate == 0.0 or y.size == 0:
        return dropout(y), sums
    b, c = y.shape[0], y.shape[-1]
    mask = lax.stop_gradient(dropout(jnp.ones((b, 1, 1, c), y.dtype)))
    if sums is None:
        return _masked(y, mask), None
    m = mask.reshape(b, c).astype(jnp.float32)
    return _masked(y, mask), (sums[0] * m, sums[1] * (m * m))


class ResCRNet(nnx.Module):
    """Res-CR-Net. Call: image (B, H, W, in_channels), any H x W -> class probabilities
    (B, H, W, num_classes) in float32 (softmax over the last axis)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        c = cfg.block_channels
        has_lstm = cfg.num_lstm_res > 0
        self.stem = stem_block(cfg.in_channels, cfg, rngs=rngs)
        self.conv_res = nnx.List([conv_res_block(c, cfg, rngs=rngs) for _ in range(cfg.num_conv_res)])
        # The authors put SpatialDropout2D after the STEM and after every CONV RES block built in
        # their loop: all of them when LSTM blocks follow, all but the last otherwise.
        n_dropped = 1 + (cfg.num_conv_res if has_lstm else cfg.num_conv_res - 1)
        self.dropouts = nnx.List([spatial_dropout(cfg.dropout_rate, rngs=rngs) for _ in range(n_dropped)])
        if has_lstm:
            from crnet_jax.lstm import LSTMResBlock  # the LSTM RES block lives in its own module

            self.lstm_res = nnx.List(
                [LSTMResBlock(c if i == 0 else cfg.num_classes, cfg, rngs=rngs) for i in range(cfg.num_lstm_res)]
            )
            self.head = None
        else:
            self.lstm_res = nnx.List([])
            self.head = Head(c, cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        remat = self.cfg.remat
        blocks: list[ResidualBlock] = [self.stem, *self.conv_res]
        y, sums = x, None
        for i, block in enumerate(blocks):
            # a CONV RES block next: its pre-activation's moments from this output's sums
            want = i + 1 < len(blocks) and blocks[i + 1].pre_bn is not None
            y, sums = _apply(block, y, remat, sums, want)
            if i < len(self.dropouts):
                y, sums = _spatial_dropout(self.dropouts[i], y, sums)
        for block in self.lstm_res:
            y, _ = _apply(block, y, remat)
        if self.head is not None:
            y = self.head(y)
        return jax.nn.softmax(y.astype(jnp.float32), axis=-1)


def count_parameters(model: nnx.Module) -> dict[str, int]:
    """Numbers of trainable parameters (nnx.Param) and BatchNorm statistics (nnx.BatchStat)."""
    size = lambda state: sum(int(v.size) for v in jax.tree.leaves(state))  # noqa: E731
    trainable = size(nnx.state(model, nnx.Param))
    stats = size(nnx.state(model, nnx.BatchStat))
    return {"trainable": trainable, "batch_stats": stats, "total": trainable + stats}
