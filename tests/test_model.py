"""Structure, parameter counts and behaviour of ResCRNet."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from crnet_jax.blocks import ResidualBlock
from crnet_jax.config import ModelConfig, lung_config
from crnet_jax.layers import SeparableAtrousConv, he_truncated_normal, leaky_relu
from crnet_jax.model import ResCRNet, count_parameters


def test_lung_parameter_counts():
    model = ResCRNet(lung_config(), rngs=nnx.Rngs(0))
    assert count_parameters(model) == {"trainable": 58_309, "batch_stats": 1_632, "total": 59_941}


def test_structure_of_lung_network():
    model = ResCRNet(lung_config(), rngs=nnx.Rngs(0))
    assert model.stem.pre_bn is None
    assert len(model.conv_res) == 5 and all(b.pre_bn is not None for b in model.conv_res)
    # dropout after the STEM and the first 4 CONV RES blocks, none after the 5th
    assert len(model.dropouts) == 5
    assert all(d.rate == 0.05 and tuple(d.broadcast_dims) == (1, 2) for d in model.dropouts)
    assert [(br.conv1.kernel_size, br.conv1.dilation) for br in model.stem.branches] == [(3, 1), (5, 3), (7, 5)]
    bn = model.stem.shortcut_bn
    assert bn.momentum == 0.99 and bn.epsilon == 1e-3


@pytest.mark.parametrize("shape", [(1, 17, 23, 1), (2, 32, 40, 1)])
def test_any_size_gives_probabilities(shape):
    model = ResCRNet(lung_config(num_conv_res=2), rngs=nnx.Rngs(1))
    model.eval()
    x = jax.random.uniform(jax.random.key(0), shape)
    y = model(x)
    chex.assert_shape(y, shape[:3] + (2,))
    chex.assert_trees_all_close(y.sum(-1), jnp.ones(shape[:3]), atol=1e-5)
    assert y.dtype == jnp.float32


def _block_reference(block: ResidualBlock, x: np.ndarray) -> np.ndarray:
    """The block written out in float64 NumPy from its weights (inference mode)."""

    def bn(m, v):
        return (v - np.asarray(m.mean[...])) / np.sqrt(np.asarray(m.var[...]) + m.epsilon) * np.asarray(m.scale[...]) + np.asarray(m.bias[...])

    def sep(conv, v):
        k, d = conv.kernel_size, conv.dilation
        dw = np.asarray(conv.depthwise_kernel[...], np.float64)
        p = d * (k // 2)
        vp = np.pad(v, ((0, 0), (p, p), (p, p), (0, 0)))
        out = np.zeros_like(v)
        H, W = v.shape[1:3]
        for u in range(k):
            for w in range(k):
                out += vp[:, u * d : u * d + H, w * d : w * d + W, :] * dw[u, w]
        return out @ np.asarray(conv.pointwise_kernel[...], np.float64) + np.asarray(conv.bias[...])

    lrelu = lambda v: np.where(v >= 0, v, 0.1 * v)  # noqa: E731
    x0 = x if block.pre_bn is None else lrelu(bn(block.pre_bn, x))
    branches = [sep(br.conv2, lrelu(bn(br.bn, sep(br.conv1, x0)))) for br in block.branches]
    sc = x @ np.asarray(block.shortcut_conv.kernel[...], np.float64) + np.asarray(block.shortcut_conv.bias[...])
    return bn(block.shortcut_bn, sc) + np.concatenate(branches, -1)


@pytest.mark.parametrize("preactivate", [False, True])
def test_block_matches_numpy_reference(preactivate):
    cfg = lung_config()
    cin = 48 if preactivate else 1
    block = ResidualBlock(cin, cfg, preactivate=preactivate, rngs=nnx.Rngs(3))
    # non-trivial BatchNorm statistics so that every term shows up
    rng = np.random.default_rng(0)
    for path, var in nnx.to_flat_state(nnx.state(block, nnx.BatchStat)):
        var.set_value(jnp.asarray(rng.uniform(0.5, 1.5, var.shape) if path[-1] == "var" else rng.normal(0, 0.1, var.shape), jnp.float32))
    block.eval()
    x = rng.normal(size=(2, 13, 18, cin)).astype(np.float32)
    got = np.asarray(block(jnp.asarray(x)))
    want = _block_reference(block, x.astype(np.float64))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def _block_unfused(block: ResidualBlock, x: jax.Array) -> jax.Array:
    """The block with every BatchNorm applied by nnx.BatchNorm and LeakyReLU as separate
    operations (no prologue folded into the convolutions)."""
    lrelu = lambda v: leaky_relu(v, 0.1)  # noqa: E731
    x0 = x if block.pre_bn is None else lrelu(block.pre_bn(x))
    branches = [br.conv2(lrelu(br.bn(br.conv1(x0)))) for br in block.branches]
    return block.shortcut_bn(block.shortcut_conv(x)) + jnp.concatenate(branches, -1)


@pytest.mark.parametrize("impl", ["ffi", "shift"])
@pytest.mark.parametrize("preactivate", [False, True])
def test_block_training_mode_equals_unfused(preactivate, impl):
    """Training mode (batch statistics): the block with BatchNorm + LeakyReLU folded into the
    convolutions gives the output, parameter gradients and updated running statistics of
    the unfused composition of nnx.BatchNorm, LeakyReLU and SepConv."""
    from crnet_jax import _ffi

    if impl == "ffi" and not _ffi.available():
        pytest.skip("C++ FFI extension not built")
    cfg = lung_config(depthwise_impl=impl, bn_momentum=0.9)
    cin = 48 if preactivate else 1
    block = ResidualBlock(cin, cfg, preactivate=preactivate, rngs=nnx.Rngs(4))
    rng = np.random.default_rng(1)
    for path, var in nnx.to_flat_state(nnx.state(block, nnx.Param)):  # non-trivial BN scale/bias
        if path[-1] in ("scale", "bias") and "conv" not in "".join(map(str, path)):
            var.set_value(jnp.asarray(rng.uniform(0.5, 1.5, var.shape), jnp.float32))
    block.train()
    x = jnp.asarray(rng.normal(0.3, 1.2, size=(2, 11, 14, cin)).astype(np.float32))
    ct = jnp.asarray(rng.normal(size=(2, 11, 14, cfg.block_channels)).astype(np.float32))
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)

    def run(fn):
        def loss(p, x):
            b = nnx.merge(graphdef, p, rest, copy=True)
            y = fn(b, x)
            return jnp.sum(y * ct), (y, nnx.to_pure_dict(nnx.state(b, nnx.BatchStat)))

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)

    (_, (y1, stats1)), g1 = run(lambda b, x: b(x))
    (_, (y0, stats0)), g0 = run(_block_unfused)
    chex.assert_trees_all_close(y1, y0, atol=2e-5, rtol=2e-5)
    chex.assert_trees_all_close(stats1, stats0, atol=1e-6, rtol=1e-5)
    chex.assert_trees_all_close(g1, g0, atol=5e-4, rtol=2e-4)
    # the statistics did move (the comparison above is not between two untouched states)
    before = nnx.to_pure_dict(nnx.state(block, nnx.BatchStat))
    assert np.abs(np.asarray(stats1["shortcut_bn"]["mean"]) - np.asarray(before["shortcut_bn"]["mean"])).max() > 0


@pytest.mark.parametrize("impl", ["ffi", "shift"])
def test_block_training_mode_bfloat16(impl):
    """bfloat16 compute in training mode (batch statistics, the shortcut's moments from
    the convolution): close to the float32 unfused composition with the same parameters,
    in value and in the updated running statistics."""
    from crnet_jax import _ffi

    if impl == "ffi" and not _ffi.available():
        pytest.skip("C++ FFI extension not built")
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(0.3, 1.2, size=(2, 11, 40, 48)).astype(np.float32))
    blocks = {}
    for dtype in ("bfloat16", "float32"):
        block = ResidualBlock(48, lung_config(depthwise_impl=impl, dtype=dtype, bn_momentum=0.9),
                              preactivate=True, rngs=nnx.Rngs(5))
        block.train()
        blocks[dtype] = block
    y16 = blocks["bfloat16"](x)
    y32 = _block_unfused(blocks["float32"], x)
    assert y16.dtype == jnp.bfloat16
    err = np.abs(np.asarray(y16, np.float32) - np.asarray(y32))
    assert err.max() < 0.08 and err.mean() < 0.01, (err.max(), err.mean())
    s16 = nnx.to_pure_dict(nnx.state(blocks["bfloat16"], nnx.BatchStat))
    s32 = nnx.to_pure_dict(nnx.state(blocks["float32"], nnx.BatchStat))
    chex.assert_trees_all_close(s16, s32, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("impl", ["ffi", "shift"])
def test_into_rounds_bias_and_extra_bias_once(impl):
    """In bfloat16 a branch's bias and the shift it adds for the shortcut's BatchNorm
    (`SeparableAtrousConv.into(extra_bias=...)`) are summed in float32 and rounded once:
    1 + 2^-8 and 2^-8 give 1 + 2^-7, where rounding each to bfloat16 first gives 1."""
    from crnet_jax import _ffi

    if impl == "ffi" and not _ffi.available():
        pytest.skip("C++ FFI extension not built")
    conv = SeparableAtrousConv(4, 4, 3, 1, dtype=jnp.bfloat16, impl=impl, rngs=nnx.Rngs(0))
    conv.depthwise_kernel[...] = jnp.zeros_like(conv.depthwise_kernel[...])
    conv.pointwise_kernel[...] = jnp.zeros_like(conv.pointwise_kernel[...])
    conv.bias[...] = jnp.full((4,), 1 + 2.0**-8, jnp.float32)
    acc = jnp.zeros((1, 5, 6, 8), jnp.bfloat16)
    out = conv.into(acc, 4, jnp.ones((1, 5, 6, 4), jnp.bfloat16), extra_bias=jnp.full((4,), 2.0**-8, jnp.float32))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out[..., 4:], np.float32), 1 + 2.0**-7)
    np.testing.assert_array_equal(np.asarray(out[..., :4], np.float32), 0.0)


def test_dropout_only_in_training():
    model = ResCRNet(lung_config(num_conv_res=1, dropout_rate=0.5), rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 1))
    model.eval()
    a, b = model(x), model(x)
    chex.assert_trees_all_equal(a, b)
    model.train()
    c = model(x)
    assert not np.allclose(np.asarray(a), np.asarray(c))


def test_batchnorm_updates_statistics_in_training_only():
    model = ResCRNet(lung_config(num_conv_res=1), rngs=nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 1))
    model.eval()
    model(x)
    chex.assert_trees_all_equal(before, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    model.train()
    model(x)
    after = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    m0, m1 = before["stem"]["shortcut_bn"]["mean"], np.asarray(after["stem"]["shortcut_bn"]["mean"])
    # Keras momentum convention: moving = 0.99 * moving + 0.01 * batch
    assert np.abs(m1 - m0).max() > 0


@pytest.mark.parametrize("dropout", [0.0, 0.3, 1.0])
def test_moments_from_the_previous_blocks_sums(dropout):
    """In training with the C++ kernels a CONV RES block's pre-activation moments come from
    the per-image sums the previous block's kernels take as they write its output (scaled
    by the dropout mask between them) instead of a reduction over its input: same loss,
    gradients and BatchNorm statistics as the composition that reduces the input itself
    (impl "shift": plain dropout, `batch_moments`), the same dropout masks, and the kernels
    that sum are the ones in the step."""
    from crnet_jax import _ffi

    if not _ffi.available():
        pytest.skip("C++ FFI extension not built")
    x = jax.random.uniform(jax.random.key(1), (2, 16, 20, 1))
    results, hlos = [], []
    for impl in ("ffi", "shift"):
        model = ResCRNet(lung_config(num_conv_res=2, depthwise_impl=impl, dropout_rate=dropout), rngs=nnx.Rngs(0))
        model.train()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p, rest):
            m = nnx.merge(graphdef, p, rest, copy=True)
            y = m(x)
            return jnp.mean(y[..., 0] ** 2) + jnp.mean(y[..., 1]), nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))

        step = jax.jit(jax.value_and_grad(loss, has_aux=True))
        results.append(step(params, rest))
        hlos.append(step.lower(params, rest).as_text())
    chex.assert_trees_all_close(results[0], results[1], atol=2e-5, rtol=2e-4)
    # the STEM and the first CONV RES block feed a CONV RES block: 3 branches each sum
    assert hlos[0].count("crnet_separable_fwd_into_sums") == 6, hlos[0].count("crnet_separable_fwd_into_sums")
    assert "crnet_separable_fwd_into_sums" not in hlos[1]


@pytest.mark.parametrize("impl", ["ffi", "shift", "xla"])
def test_dropout_keeps_no_extra_tensor_in_training(impl):
    """Spatial dropout between blocks costs no memory in the training step: its output is
    materialised once and its input dies (XLA, left alone, recomputes the product inside the
    backward's fusions and keeps the input alive: one or two more block-output-sized tensors
    per dropout). Compiled temporaries with dropout on against off, every implementation."""
    from crnet_jax import _ffi

    if impl == "ffi" and not _ffi.available():
        pytest.skip("C++ FFI extension not built")
    x = jnp.ones((2, 40, 48, 1))
    temps = []
    for rate in (0.3, 0.0):
        model = ResCRNet(lung_config(num_conv_res=3, depthwise_impl=impl, dropout_rate=rate), rngs=nnx.Rngs(0))
        model.train()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p, rest):
            return jnp.mean(nnx.merge(graphdef, p, rest, copy=True)(x)[..., 0] ** 2)

        compiled = jax.jit(jax.grad(loss)).lower(params, rest).compile()
        temps.append(compiled.memory_analysis().temp_size_in_bytes)
    block_output = 2 * 40 * 48 * 48 * 4
    assert temps[0] < temps[1] + block_output, (temps, block_output)


@pytest.mark.parametrize("training, dropout", [(False, 0.0), (True, 0.0), (True, 0.3)])
def test_remat_gives_same_values_gradients_and_statistics(training, dropout):
    """remat True (block input kept) and "branches" (the branches' first convolutions kept
    too) against no remat: same loss, gradients and BatchNorm statistics, dropout on or off."""
    x = jax.random.uniform(jax.random.key(1), (2, 16, 20, 1))
    results = []
    for remat in (False, True, "branches"):
        model = ResCRNet(lung_config(num_conv_res=2, remat=remat, dropout_rate=dropout), rngs=nnx.Rngs(0))
        model.train() if training else model.eval()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p, rest):
            m = nnx.merge(graphdef, p, rest, copy=True)
            return jnp.mean(m(x)[..., 0] ** 2), nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))

        results.append(jax.jit(jax.value_and_grad(loss, has_aux=True))(params, rest))
    chex.assert_trees_all_close(results[0], results[1], atol=1e-6, rtol=1e-5)
    chex.assert_trees_all_close(results[0], results[2], atol=1e-6, rtol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
    model = ResCRNet(lung_config(num_conv_res=1, dtype="bfloat16"), rngs=nnx.Rngs(0))
    model.eval()
    ref = ResCRNet(lung_config(num_conv_res=1), rngs=nnx.Rngs(0))
    ref.eval()
    for v in jax.tree.leaves(nnx.state(model, nnx.Param)):
        assert v.dtype == jnp.float32
    x = jax.random.uniform(jax.random.key(1), (1, 16, 16, 1))
    y, y_ref = model(x), ref(x)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=5e-2)


def test_he_truncated_normal_statistics():
    # Keras: stddev = sqrt(2 / fan_in) / 0.8796, truncated at 2 stddev; fan_in = k*k*Cin for depthwise.
    fan_in = 7 * 7 * 48
    w = np.asarray(he_truncated_normal(fan_in)(jax.random.key(0), (7, 7, 48, 64)))
    assert abs(w.std() - np.sqrt(2.0 / fan_in)) < 0.03 * np.sqrt(2.0 / fan_in)
    assert np.abs(w).max() <= 2 * np.sqrt(2.0 / fan_in) / 0.87962566103423978 + 1e-6


def test_leaky_relu_slope():
    np.testing.assert_allclose(np.asarray(leaky_relu(jnp.array([-2.0, 0.0, 3.0]))), [-0.2, 0.0, 3.0])


def test_config_round_trip_and_validation():
    cfg = lung_config(dtype="bfloat16")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="odd"):
        ModelConfig(kernel_sizes=(3, 4, 7))
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"nope": 1})
