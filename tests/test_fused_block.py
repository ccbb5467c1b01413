"""The fused inference block (`crnet_block_infer`) against the same block computed layer by
layer: values on shapes that exercise the rings' borders, column strips and row bands, every
instruction set, thread counts, gradients, vmap, batch sharding, argument checks, and the
network's inference with and without it."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from crnet_jax import _ffi
from crnet_jax.config import lung_config
from crnet_jax.fused_block import (
    BranchWeights,
    fused_block_supported,
    residual_block_inference_fused,
    residual_block_inference_reference,
)
from crnet_jax.model import ResCRNet
from isa_helpers import require_isa

pytestmark = pytest.mark.skipif(
    not _ffi.available(), reason=f"C++ FFI extension not built: {_ffi.unavailable_reason()}")


def _block(rng: np.random.Generator, c: int, f: int, kds, prologue: bool):
    def r(*shape, scale=0.3):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * scale)

    branches = [BranchWeights(r(k, k, c), r(c, f), r(f), 1 + r(f), r(f), r(k, k, f), r(f, f), r(f)) for k, _ in kds]
    dilations = [d for _, d in kds]
    pro = (1 + r(c), r(c), 0.1) if prologue else None
    return branches, dilations, r(c, f * len(kds)), r(f * len(kds)), pro


RES_CR_NET = ((3, 1), (5, 3), (7, 5))
# (batch, H, W, C, F, branches): odd and even sizes; images smaller than the widest reach
# (15) in one or both directions; a width that takes several column strips (with the
# default scratch budget where the L2 cache is 2 MB; test_fused_block_narrow_strips forces
# them) and a height split into row bands for a single image; other widths and
# kernels than Res-CR-Net's (generic code) and a single branch.
CASES = [
    (2, 23, 30, 48, 16, RES_CR_NET),
    (3, 9, 8, 48, 16, RES_CR_NET),
    (1, 40, 13, 16, 16, RES_CR_NET),
    (2, 31, 26, 1, 16, RES_CR_NET),  # the STEM's grayscale image
    (1, 18, 22, 3, 16, RES_CR_NET),  # an RGB STEM
    (1, 140, 300, 48, 16, RES_CR_NET),
    (2, 17, 21, 24, 8, ((3, 2), (1, 1))),
    (1, 12, 19, 32, 16, ((5, 1),)),
]


def _ids(case):
    b, h, w, c, f, kds = case
    return f"{b}x{h}x{w}x{c}-F{f}-" + "_".join(f"k{k}d{d}" for k, d in kds)


def _close(got, want, tol):
    scale = float(jnp.max(jnp.abs(want))) + 1e-6
    chex.assert_trees_all_close(got / scale, want / scale, atol=tol, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("prologue", [True, False], ids=["preact", "stem"])
def test_fused_block_matches_layers(case, prologue):
    b, h, w, c, f, kds = case
    rng = np.random.default_rng(h * w + c)
    branches, dilations, sk, sb, pro = _block(rng, c, f, kds, prologue)
    x = jnp.asarray(rng.standard_normal((b, h, w, c), dtype=np.float32))
    got = jax.jit(lambda x: residual_block_inference_fused(x, branches, dilations, sk, sb, pro, 0.1))(x)
    # the XLA grouped convolution is the reference where it is quick enough; the
    # layer-by-layer C++ kernels (tested against it in test_depthwise) above that
    impl = "xla" if h * w <= 1000 else "ffi"
    want = residual_block_inference_reference(x, branches, dilations, sk, sb, pro, 0.1, impl=impl)
    assert got.shape == (b, h, w, f * len(kds)) and got.dtype == jnp.float32
    _close(got, want, 2e-6)


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_fused_block_other_instruction_sets(isa):
    """The block compiled for 4 and 8 float lanes per vector."""
    require_isa(isa)
    rng = np.random.default_rng(3)
    for b, h, w, c, f, kds in (CASES[0], CASES[4]):
        branches, dilations, sk, sb, pro = _block(rng, c, f, kds, True)
        x = jnp.asarray(rng.standard_normal((b, h, w, c), dtype=np.float32))
        got = residual_block_inference_fused(x, branches, dilations, sk, sb, pro, 0.1, isa=isa)
        want = residual_block_inference_reference(x, branches, dilations, sk, sb, pro, 0.1, impl="xla")
        _close(got, want, 2e-6)


def _matches_layers_in_subprocess(**env_changes: str) -> None:
    """test_fused_block_matches_layers in a fresh process with the kernels' environment
    variables changed (they are read once per process); every case must pass, none skip."""
    env = {**os.environ, **env_changes}
    test = pathlib.Path(__file__)
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test), "-k", "matches_layers"],
        cwd=test.parent, env=env, capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.split("\n")[-2], r.stdout[-500:]


def test_fused_block_streaming_stores():
    """Outputs far bigger than the caches are written with non-temporal stores (another
    compiled path); CRNET_DEPTHWISE_STREAM_MB=0 sends every output that qualifies (L a
    multiple of 16, 64-byte aligned) through it."""
    _matches_layers_in_subprocess(CRNET_DEPTHWISE_STREAM_MB="0")


@pytest.mark.skipif(not _ffi.available(), reason="C++ kernels not built")
def test_fused_block_narrow_strips():
    """The column strips' halos, whatever the default budget gives on this machine (one strip
    at these widths where the L2 cache is small): CRNET_BLOCK_SCRATCH_KB=256 cuts every
    case that can be cut into strips of a few dozen columns."""
    _matches_layers_in_subprocess(CRNET_BLOCK_SCRATCH_KB="256")


def test_fused_block_threads_identical():
    """Units are (image, band, strip) and no sums cross them: every thread count gives the
    same bits (a single image here, so the rows are split into bands by thread count)."""
    rng = np.random.default_rng(4)
    branches, dilations, sk, sb, pro = _block(rng, 48, 16, RES_CR_NET, True)
    x = jnp.asarray(rng.standard_normal((1, 150, 90, 48), dtype=np.float32))
    outs = [np.asarray(residual_block_inference_fused(x, branches, dilations, sk, sb, pro, 0.1, threads=t))
            for t in (1, 2, 3)]
    for o in outs[1:]:
        np.testing.assert_array_equal(outs[0], o)


def test_fused_block_gradients_and_vmap():
    """Gradients (through the layer-by-layer kernels) equal the reference's, for x and every
    weight; vmap over x alone (folded into the batch) and over x and a weight (per element)."""
    rng = np.random.default_rng(5)
    b, h, w, c, f, kds = CASES[0]
    branches, dilations, sk, sb, pro = _block(rng, c, f, kds, True)
    x = jnp.asarray(rng.standard_normal((b, h, w, c), dtype=np.float32))
    ct = jnp.asarray(rng.standard_normal((b, h, w, f * len(kds)), dtype=np.float32))

    def loss(fn, x, branches, sk, sb, pro_a):
        return jnp.sum(fn(x, branches, dilations, sk, sb, (pro_a, pro[1], 0.1), 0.1) * ct)

    ref = lambda *a, **k: residual_block_inference_reference(*a, **k, impl="xla")  # noqa: E731
    args = (x, branches, sk, sb, pro[0])
    got = jax.jit(jax.grad(lambda *a: loss(residual_block_inference_fused, *a), argnums=(0, 1, 2, 3, 4)))(*args)
    want = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2, 3, 4))(*args)
    for g_, w_ in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        _close(g_, w_, 2e-5)

    xs = jnp.stack([x, 2 * x])
    got = jax.jit(jax.vmap(lambda x: residual_block_inference_fused(x, branches, dilations, sk, sb, pro, 0.1)))(xs)
    want = jax.vmap(lambda x: ref(x, branches, dilations, sk, sb, pro, 0.1))(xs)
    _close(got, want, 2e-6)
    sks = jnp.stack([sk, -sk])
    got = jax.jit(jax.vmap(lambda x, sk: residual_block_inference_fused(x, branches, dilations, sk, sb, pro, 0.1)))(
        xs, sks)
    want = jax.vmap(lambda x, sk: ref(x, branches, dilations, sk, sb, pro, 0.1))(xs, sks)
    _close(got, want, 2e-6)


def test_fused_block_batch_sharded_runs_locally():
    """With the batch sharded over devices, each device runs the block on its own images."""
    n = min(jax.device_count(), 4)
    if n < 2:
        pytest.skip("needs several devices (conftest sets --xla_force_host_platform_device_count=4)")
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    data = NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(6)
    branches, dilations, sk, sb, pro = _block(rng, 16, 8, RES_CR_NET, True)
    x = jnp.asarray(rng.standard_normal((2 * n, 11, 12, 16), dtype=np.float32))
    f = jax.jit(lambda x: residual_block_inference_fused(x, branches, dilations, sk, sb, pro, 0.1),
                in_shardings=data)
    _close(f(jax.device_put(x, data)),
           residual_block_inference_reference(x, branches, dilations, sk, sb, pro, 0.1, impl="xla"), 2e-6)
    hlo = f.lower(jax.device_put(x, data)).compile().as_text()
    assert "all-gather(" not in hlo
    assert "f32[2,11,12,24]{3,2,1,0} custom-call(" in hlo  # local batch of 2 per device


def test_fused_block_bad_arguments():
    rng = np.random.default_rng(7)
    branches, dilations, sk, sb, pro = _block(rng, 16, 8, RES_CR_NET, True)
    x = jnp.zeros((1, 10, 10, 16))
    with pytest.raises(ValueError, match=r"branch 1: pointwise2 has shape \(8, 4\), expected \(8, 8\)"):
        bad = list(branches)
        bad[1] = bad[1]._replace(pointwise2=bad[1].pointwise2[:, :4])
        residual_block_inference_fused(x, bad, dilations, sk, sb, pro)
    with pytest.raises(ValueError, match=r"shortcut kernel/bias must be \(16, 24\)"):
        residual_block_inference_fused(x, branches, dilations, sk[:, :8], sb, pro)
    with pytest.raises(ValueError, match="1 to 4 branches"):
        residual_block_inference_fused(x, branches, dilations[:2], sk, sb, pro)
    with pytest.raises(ValueError, match=r"prologue scale/shift must have shape \(16,\)"):
        residual_block_inference_fused(x, branches, dilations, sk, sb, (pro[0][:3], pro[1], 0.1))
    assert fused_block_supported(x, [3, 5, 7], [8, 8, 8], dilations)
    assert not fused_block_supported(x.astype(jnp.bfloat16), [3, 5, 7], [8, 8, 8], dilations)
    assert not fused_block_supported(x, [3, 5, 7], [8, 8, 4], dilations)


def test_network_inference_fused_equals_layers():
    """The lung network in inference mode, its CONV RES blocks fused or layer by layer
    (after a few training steps' worth of non-trivial BatchNorm statistics)."""
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.random((2, 45, 38, 1), dtype=np.float32))
    outs = []
    for fused in (True, False):
        model = ResCRNet(lung_config(fused_inference=fused), rngs=nnx.Rngs(0))
        model.train()
        for _ in range(2):
            model(x)  # BatchNorm running statistics away from (0, 1)
        model.eval()
        outs.append(jax.jit(lambda s, x: nnx.merge(nnx.graphdef(model), s)(x))(nnx.state(model), x))
        if fused:
            jaxpr = str(jax.make_jaxpr(lambda x: model(x))(x))
            assert jaxpr.count("crnet_block_infer") == 6  # the STEM and the 5 CONV RES blocks
    _close(outs[0], outs[1], 1e-5)
