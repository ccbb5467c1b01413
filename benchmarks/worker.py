"""Measure one configuration of the lung network in this process and print one JSON line.

    python -m benchmarks.worker '{"mode": "train", "height": 300, "width": 340, "batch": 8,
                                  "dtype": "float32", "impl": "auto", "remat": false, "steps": 5}'

mode "train": one optimizer step (forward, weighted Tanimoto loss, backward, Adam update,
BatchNorm statistics), the jitted step with donated buffers. mode "infer": forward in inference
mode. Reports per-step seconds, images/s from the median, XLA's memory analysis of the compiled
step, peak RSS of this process and (on accelerators) peak device bytes.
"""
from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.common import compiled_cost, compiled_memory, device_peak_bytes, machine_description, median, peak_rss_bytes, time_calls
from crnet_jax import depthwise
from crnet_jax.config import lung_config
from crnet_jax.host_memory import block_cache_stats, blocks_in_use, is_active, reexec_with_host_memory_settings, settle_block_cache
from crnet_jax.losses import tanimoto_loss


def _blobby_masks(rng: np.random.Generator, b: int, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    lung = np.zeros((b, h, w), bool)
    for i in range(b):
        for cx in (0.3, 0.7):
            ry, rx = rng.uniform(0.25, 0.35) * h, rng.uniform(0.12, 0.18) * w
            lung[i] |= ((yy - 0.5 * h) / ry) ** 2 + ((xx - cx * w) / rx) ** 2 < 1
    lung = lung.astype(np.float32)
    return np.stack([lung, 1 - lung], -1)


def build(spec: dict):
    """Returns (step function of no arguments that blocks, compiled object)."""
    cfg = lung_config(dtype=spec["dtype"], depthwise_impl=spec["impl"], remat=spec["remat"],
                      num_conv_res=spec.get("num_conv_res", 5))
    b, h, w = spec["batch"], spec["height"], spec["width"]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((b, h, w, 1), np.float32))
    y = jnp.asarray(_blobby_masks(rng, b, h, w))
    model = ResCRNet(cfg, rngs=nnx.Rngs(0))
    if spec["mode"] == "infer":
        model.eval()
        graphdef, state = nnx.split(model)

        def infer(state, x):
            return nnx.merge(graphdef, state, copy=True)(x)

        fn = jax.jit(infer)
        compiled = fn.lower(state, x).compile()
        def infer_once():
            before = blocks_in_use()
            compiled(state, x).block_until_ready()
            settle_block_cache(before)

        return infer_once, compiled

    model.train()
    tx = optax.adam(1e-3)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)

    def train_step(params, rest, opt_state, x, y):
        def loss_fn(params):
            m = nnx.merge(graphdef, params, rest, copy=True)
            loss = tanimoto_loss(m(x), y, weighted=True)
            return loss, nnx.state(m, nnx.Not(nnx.Param))

        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss

    fn = jax.jit(train_step, donate_argnums=(0, 1, 2))
    compiled = fn.lower(params, rest, opt_state, x, y).compile()
    carry = [params, rest, opt_state]

    def step():
        before = blocks_in_use()
        p, r, o, loss = compiled(*carry, x, y)
        carry[:] = [p, r, o]
        loss.block_until_ready()
        settle_block_cache(before)  # as the training loop does between steps on CPU

    return step, compiled


from crnet_jax.model import ResCRNet  # noqa: E402  (after the helper definitions, for readability)


def main() -> None:
    reexec_with_host_memory_settings("benchmarks.worker")  # as the command-line entry points do (crnet_jax.host_memory)
    spec = {"mode": "train", "height": 300, "width": 340, "batch": 8, "dtype": "float32", "impl": "auto",
            "remat": False, "steps": 5, "warmup": 1}
    spec.update(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
    spec["impl_resolved"] = depthwise.default_implementation() if spec["impl"] == "auto" else spec["impl"]
    t0 = time.perf_counter()
    step, compiled = build(spec)
    compile_s = time.perf_counter() - t0
    times = time_calls(step, spec["steps"], spec["warmup"])
    med = median(times)
    out = {
        **spec,
        "framework": f"crnet_jax (jax {jax.__version__})",
        "compile_s": round(compile_s, 2),
        "step_s": [round(t, 4) for t in times],
        "median_s": round(med, 4),
        "images_per_s": round(spec["batch"] / med, 3),
        **compiled_memory(compiled),
        **compiled_cost(compiled),
        "peak_rss_bytes": peak_rss_bytes(),
        "device_peak_bytes": device_peak_bytes(),
        "malloc_huge_pages": is_active(),
        "block_cache": block_cache_stats(),
        "machine": machine_description(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
