"""ResCRNet: the fully convolutional, pooling-free Res-CR-Net.

Without LSTM blocks (the authors' lung network, CXR-Net Module_1):
    STEM -> dropout -> (CONV RES -> dropout) x (num_conv_res - 1) -> CONV RES -> head -> softmax
With m >= 1 LSTM RES blocks (the authors' microscopy network):
    STEM -> dropout -> (CONV RES -> dropout) x num_conv_res -> LSTM RES x m -> softmax
Dropout is SpatialDropout2D, active only in training mode (`model.train()` / `model.eval()`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from crnet_jax.blocks import Head, ResidualBlock, conv_res_block, stem_block
from crnet_jax.config import ModelConfig
from crnet_jax.layers import spatial_dropout


def _apply(block: nnx.Module, x: jax.Array, remat: bool) -> jax.Array:
    """Call a block; with remat its activations are recomputed in the backward pass
    (`jax.checkpoint` over the block as a pure function of its state; BatchNorm statistic
    updates are written back to the module afterwards)."""
    if not remat:
        return block(x)
    graphdef, state = nnx.split(block)

    def pure(state, x):
        b = nnx.merge(graphdef, state, copy=True)
        return b(x), nnx.state(b)

    y, new_state = jax.checkpoint(pure)(state, x)
    nnx.update(block, new_state)
    return y


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
        y = x
        for i, block in enumerate(blocks):
            y = _apply(block, y, remat)
            if i < len(self.dropouts):
                y = self.dropouts[i](y)
        for block in self.lstm_res:
            y = _apply(block, y, remat)
        if self.head is not None:
            y = self.head(y)
        return jax.nn.softmax(y.astype(jnp.float32), axis=-1)


def count_parameters(model: nnx.Module) -> dict[str, int]:
    """Numbers of trainable parameters (nnx.Param) and BatchNorm statistics (nnx.BatchStat)."""
    size = lambda state: sum(int(v.size) for v in jax.tree.leaves(state))  # noqa: E731
    trainable = size(nnx.state(model, nnx.Param))
    stats = size(nnx.state(model, nnx.BatchStat))
    return {"trainable": trainable, "batch_stats": stats, "total": trainable + stats}
