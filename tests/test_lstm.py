"""The LSTM RES block: Keras parity, the fused scan against a Python loop, gradients, dropout,
weight import of networks with LSTM RES blocks."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from crnet_jax import lstm as L
from crnet_jax.config import ModelConfig, lung_config, microscopy_lstm_config
from crnet_jax.convert_keras import (
    KerasImportError,
    load_keras_model,
    load_keras_weights,
    read_keras_weights,
    read_lstm_block_weights,
)
from crnet_jax.model import ResCRNet, count_parameters

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {
    "micro_rgb4_lstm": microscopy_lstm_config(),
    "lung_lstm": lung_config(num_conv_res=4, num_lstm_res=1),
}


def _reference_io(convlstm_dir: pathlib.Path, tag: str) -> tuple[np.ndarray, np.ndarray]:
    io = np.load(convlstm_dir / "tf_keras_reference_io.npz")
    return io[f"{tag}__input"], io[f"{tag}__output"]


def _random_cells(seed: int, c: int, scale: float = 0.6, dtype=np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """kernel, recurrent_kernel (4, 3, C, 4) and bias (4, 4) for the four sequences (numpy:
    no per-op compilations in the tests)."""
    rng = np.random.default_rng(seed)
    return (
        (scale * rng.standard_normal((4, 3, c, 4))).astype(dtype),
        (scale * rng.standard_normal((4, 3, c, 4))).astype(dtype),
        (0.3 * rng.standard_normal((4, 4))).astype(dtype),
    )


def _cell_params(kernel, recurrent, bias, i: int) -> dict[str, jax.Array]:
    return {"kernel": kernel[i][:, :, None, :], "recurrent_kernel": recurrent[i][:, :, None, :], "bias": bias[i]}


def _masks(seed: int, b: int, h: int, w: int, c: int, keep: float = 0.7, dtype=np.float32):
    rng = np.random.default_rng(seed)
    row = (rng.random((2, 4, b, w, c)) < keep) / keep
    col = (rng.random((2, 4, b, h, c)) < keep) / keep
    return row.astype(dtype), col.astype(dtype)


def _normal(seed: int, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _directional_check(loss, args: tuple, seed: int, n: int = 2, eps: float = 1e-6) -> None:
    """<grad loss, d> against the central difference (loss(a + eps d) - loss(a - eps d)) / 2 eps
    for n random directions d over all arguments, computed in one jitted function."""
    rng = np.random.default_rng(seed)
    dirs = [tuple(rng.standard_normal(np.shape(a)).astype(np.asarray(a).dtype) for a in args) for _ in range(n)]

    @jax.jit
    def both(args, d):
        grads = jax.grad(lambda a: loss(*a))(args)
        analytic = sum(jnp.vdot(g, v) for g, v in zip(grads, d))
        fd = (loss(*(a + eps * v for a, v in zip(args, d))) - loss(*(a - eps * v for a, v in zip(args, d)))) / (2 * eps)
        return analytic, fd

    for d in dirs:
        analytic, fd = both(args, d)
        np.testing.assert_allclose(analytic, fd, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Cell and scan semantics (no reference files needed)
# --------------------------------------------------------------------------------------------


def test_hard_sigmoid_is_keras_2():
    x = jnp.array([-3.0, -2.5, -1.0, 0.0, 1.0, 2.5, 3.0])
    np.testing.assert_allclose(L.hard_sigmoid(x), [0.0, 0.0, 0.3, 0.5, 0.7, 1.0, 1.0], atol=1e-7)


def test_cell_initialisers_follow_keras():
    cell = L.ConvLSTMCell(1, 1, (3, 4), rngs=nnx.Rngs(0))
    assert cell.kernel.shape == (3, 4, 1, 4) and cell.recurrent_kernel.shape == (3, 4, 1, 4)
    np.testing.assert_array_equal(cell.bias[...], [0.0, 1.0, 0.0, 0.0])  # unit forget bias, gates i f c o
    u = np.asarray(cell.recurrent_kernel[...]).reshape(12, 4)  # orthogonal: orthonormal columns
    np.testing.assert_allclose(u.T @ u, np.eye(4), atol=1e-5)
    limit = np.sqrt(6.0 / (3 * 4 * 1 + 3 * 4 * 4))  # glorot_uniform with Keras' fans
    assert np.abs(cell.kernel[...]).max() <= limit


@pytest.mark.parametrize(
    "hw, c",
    [((4, 6), 4), ((5, 3), 2), pytest.param((6, 6), 2, marks=pytest.mark.slow), pytest.param((9, 4), 4, marks=pytest.mark.slow)],
)
def test_fused_scan_equals_python_loop(hw, c):
    """The one-scan, band-matrix implementation against the literal Keras graph (lax.conv per step)."""
    h, w = hw
    y = _normal(h * 100 + w * 10 + c, (2, h, w, c))
    k, u, b = _random_cells(1, c)
    want = L.lstm_res_reference(y, (_cell_params(k, u, b, 0), _cell_params(k, u, b, 1)), (_cell_params(k, u, b, 2), _cell_params(k, u, b, 3)))
    got = L.lstm_res_scan(y, k, u, b)
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("hw", [(4, 6), pytest.param((7, 5), marks=pytest.mark.slow)])
def test_fused_scan_equals_python_loop_with_recurrent_dropout(hw):
    h, w = hw
    c = 4
    y = _normal(7, (2, h, w, c))
    k, u, b = _random_cells(1, c)
    masks = _masks(2, 2, h, w, c)
    want = L.lstm_res_reference(
        y, (_cell_params(k, u, b, 0), _cell_params(k, u, b, 1)), (_cell_params(k, u, b, 2), _cell_params(k, u, b, 3)), masks
    )
    np.testing.assert_allclose(L.lstm_res_scan(y, k, u, b, masks), want, atol=2e-5)
    assert not np.allclose(L.lstm_res_scan(y, k, u, b), want, atol=1e-3)  # the masks matter


def _float64_problem(h: int = 3, w: int = 5, c: int = 4, with_masks: bool = True):
    f8 = np.float64
    y = _normal(3, (2, h, w, c), f8)
    k, u, b = _random_cells(4, c, dtype=f8)
    weight = _normal(5, (2, h, w, c), f8)
    masks = _masks(6, 2, h, w, c, dtype=f8) if with_masks else None
    return (y, k, u, b), weight, masks


def test_scan_gradients_match_finite_differences_in_float64():
    """The fused scan's custom VJP, with recurrent-dropout masks and H != W (plane and time
    padding), against central finite differences along random directions, in float64."""
    with jax.enable_x64(True):
        args, weight, masks = _float64_problem()

        def loss(y, k, u, b):
            return jnp.sum(L.lstm_res_scan(y, k, u, b, masks) * weight)

        _directional_check(loss, args, seed=7)


@pytest.mark.slow
def test_custom_vjp_equals_scan_autodiff_in_float64():
    """The hand-written VJP against JAX's autodiff of the same scan (custom_vjp=False)."""
    with jax.enable_x64(True):
        args, weight, masks = _float64_problem()

        def loss(y, k, u, b, custom_vjp):
            return jnp.sum(L.lstm_res_scan(y, k, u, b, masks, custom_vjp=custom_vjp) * weight)

        g_custom = jax.grad(loss, argnums=(0, 1, 2, 3))(*args, True)
        g_auto = jax.grad(loss, argnums=(0, 1, 2, 3))(*args, False)
        for a, r in zip(g_custom, g_auto):
            np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("with_masks", [True, False])
def test_custom_vjp_equals_loop_autodiff_and_finite_differences_in_float64(with_masks):
    """The fused scan's VJP against autodiff of the Python-loop reference and against central
    finite differences along random directions, in float64."""
    with jax.enable_x64(True):
        args, weight, masks = _float64_problem(with_masks=with_masks)

        def fused(y, k, u, b):
            return jnp.sum(L.lstm_res_scan(y, k, u, b, masks) * weight)

        def reference(y, k, u, b):
            rows = (_cell_params(k, u, b, 0), _cell_params(k, u, b, 1))
            cols = (_cell_params(k, u, b, 2), _cell_params(k, u, b, 3))
            return jnp.sum(L.lstm_res_reference(y, rows, cols, masks) * weight)

        g_fused = jax.grad(fused, argnums=(0, 1, 2, 3))(*args)
        g_ref = jax.jit(jax.grad(reference, argnums=(0, 1, 2, 3)))(*args)
        for a, r in zip(g_fused, g_ref):
            np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-10)
        _directional_check(fused, args, seed=8, n=3)


def test_block_gradients_match_finite_differences_in_float64():
    """The whole module (1x1 conv, LeakyReLU, scans; custom VJP) in float64: gradients against
    central finite differences along random directions."""
    with jax.enable_x64(True):
        cfg = ModelConfig(num_classes=2, dtype="float64", param_dtype="float64")
        block = L.LSTMResBlock(3, cfg, rngs=nnx.Rngs(0))
        block.eval()
        x = _normal(1, (1, 3, 5, 3), np.float64)
        graphdef, params, rest = nnx.split(block, nnx.Param, ...)
        leaves, treedef = jax.tree.flatten(params)

        def loss(*leaves):
            return jnp.sum(nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), rest)(x) ** 2)

        _directional_check(loss, tuple(leaves), seed=9)


def test_recurrent_dropout_only_in_training():
    cfg = microscopy_lstm_config()
    block = L.LSTMResBlock(6, cfg, rngs=nnx.Rngs(0, dropout=1))
    x = jnp.asarray(_normal(0, (2, 4, 6, 6)))
    block.eval()
    a, b = block(x), block(x)
    np.testing.assert_array_equal(a, b)
    y = L.leaky_relu(block.conv(x), cfg.leaky_slope)
    np.testing.assert_array_equal(a, L.lstm_res_scan(y, *block.stacked_params()))
    block.train()
    t1, t2 = block(x), block(x)
    assert not np.allclose(t1, a, atol=1e-4) and not np.allclose(t1, t2, atol=1e-4)  # fresh masks per call
    block.recurrent_dropout = 0.0
    np.testing.assert_allclose(block(x), a, atol=1e-6)


def test_dropout_masks_are_fixed_over_the_sequence_and_per_gate():
    block = L.LSTMResBlock(6, microscopy_lstm_config(), rngs=nnx.Rngs(0))
    row, col = block.dropout_masks(jax.random.key(0), 3, 5, 7)
    assert row.shape == (2, 4, 3, 7, 4) and col.shape == (2, 4, 3, 5, 4)  # no time axis
    values = np.unique(np.concatenate([np.ravel(row), np.ravel(col)]))
    np.testing.assert_allclose(values, [0.0, 1.0 / 0.9], rtol=1e-6)
    assert not np.array_equal(row[0, 0], row[0, 1])  # one mask per gate


def test_microscopy_network_has_59165_parameters_and_ends_with_lstm():
    model = nnx.eval_shape(lambda: ResCRNet(microscopy_lstm_config(), rngs=nnx.Rngs(0)))
    counts = count_parameters(model)
    assert counts["trainable"] == 59_165
    assert model.head is None and len(model.lstm_res) == 1 and len(model.dropouts) == 6
    lstm_params = sum(int(v.size) for v in jax.tree.leaves(nnx.state(model.lstm_res, nnx.Param)))
    assert lstm_params == 48 * 4 + 4 + 4 * (2 * 3 * 4 * 4 + 4)  # 1x1 conv + 4 cells


def test_network_with_two_lstm_blocks_runs_and_trains():
    cfg = microscopy_lstm_config(num_conv_res=1, num_lstm_res=2, filters=4, kernel_sizes=(3,), dilations=(1,))
    model = ResCRNet(cfg, rngs=nnx.Rngs(0))
    assert model.lstm_res[1].conv.kernel.shape == (4, 4)  # later blocks read num_classes channels
    x = jnp.asarray(_normal(0, (1, 6, 7, 3)))
    model.train()

    def loss(m, v):
        y = m(v)
        return jnp.mean(y[..., 0]), y

    grads, y = nnx.jit(nnx.grad(loss, has_aux=True))(model, x)
    assert y.shape == (1, 6, 7, 4)
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-5)
    g = grads.lstm_res[1].rows.forward.recurrent_kernel[...]
    assert np.isfinite(g).all() and np.abs(g).max() > 0


# --------------------------------------------------------------------------------------------
# Parity with tf_keras (reference files)
# --------------------------------------------------------------------------------------------


def test_lstm_block_alone_matches_keras(convlstm_dir):
    x, want = _reference_io(convlstm_dir, "lstm_block_only")
    block = L.LSTMResBlock(48, ModelConfig(num_classes=2), rngs=nnx.Rngs(0))
    for ext in ("npz", "h5"):
        weights = read_lstm_block_weights(convlstm_dir / f"lstm_block_only.weights.{ext}")
        state = nnx.state(block, nnx.Param)
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, weights))
        nnx.update(block, state)
        block.eval()
        got = np.asarray(block(jnp.asarray(x)))
        assert np.abs(got - want).max() <= 1e-4, ext


@pytest.mark.parametrize("tag", sorted(CONFIGS))
def test_networks_with_lstm_block_match_keras(convlstm_dir, tag):
    cfg = CONFIGS[tag]
    x, want = _reference_io(convlstm_dir, tag)
    model = load_keras_weights(convlstm_dir / f"{tag}.weights.npz", cfg)
    got = np.asarray(jax.jit(lambda v: model(v))(jnp.asarray(x)))
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4
    # the tf_keras weights file gives the very same weights
    from_h5 = read_keras_weights(convlstm_dir / f"{tag}.weights.h5", cfg)
    from_npz = read_keras_weights(convlstm_dir / f"{tag}.weights.npz", cfg)
    jax.tree.map(np.testing.assert_array_equal, from_h5, from_npz)


def _write_legacy_weights_h5(npz_path: pathlib.Path, out: pathlib.Path, root_group: str | None = None) -> list[str]:
    """Write the npz's weights in the legacy Keras HDF5 layout (layer_names + weight_names)."""
    data = np.load(npz_path)
    layers: dict[str, list[str]] = {}
    for key in data.files:
        layers.setdefault(key.split("/")[0], []).append(key)
    with h5py.File(out, "a") as f:
        root = f.create_group(root_group) if root_group else f
        root.attrs["layer_names"] = [n.encode() for n in layers]
        for name, keys in layers.items():
            g = root.create_group(name)
            g.attrs["weight_names"] = [k.encode() for k in keys]
            for k in keys:
                g.create_dataset(k, data=data[k])
    return list(layers)


def test_legacy_hdf5_weights_file(convlstm_dir, tmp_path):
    tag = "lung_lstm"
    path = tmp_path / "legacy.h5"
    _write_legacy_weights_h5(convlstm_dir / f"{tag}.weights.npz", path)
    jax.tree.map(
        np.testing.assert_array_equal,
        read_keras_weights(path, CONFIGS[tag]),
        read_keras_weights(convlstm_dir / f"{tag}.weights.npz", CONFIGS[tag]),
    )


def test_wrong_structure_is_refused(convlstm_dir):
    path = convlstm_dir / "lung_lstm.weights.npz"
    with pytest.raises(KerasImportError, match="left over"):
        read_keras_weights(path, lung_config(num_conv_res=3, num_lstm_res=1))
    with pytest.raises(KerasImportError, match="too few"):
        read_keras_weights(path, lung_config(num_conv_res=5, num_lstm_res=1))
    with pytest.raises(KerasImportError, match="too few Conv2D"):
        read_keras_weights(path, lung_config(num_conv_res=4, num_lstm_res=2))


class _Keras2Graph:
    """Builds a Keras 2 functional model_config with Keras' automatic layer names."""

    SNAKE = {
        "InputLayer": "input", "SeparableConv2D": "separable_conv2d", "BatchNormalization": "batch_normalization",
        "LeakyReLU": "leaky_re_lu", "Conv2D": "conv2d", "Add": "add", "Concatenate": "concatenate",
        "SpatialDropout2D": "spatial_dropout2d", "Lambda": "lambda", "Bidirectional": "bidirectional", "Softmax": "softmax",
    }

    def __init__(self):
        self.layers: list[dict] = []
        self.counts: dict[str, int] = {}

    def __call__(self, cls: str, inputs: list[str], **config) -> str:
        base = self.SNAKE[cls]
        n = self.counts.get(base, 0)
        self.counts[base] = n + 1
        name = base if n == 0 else f"{base}_{n}"
        nodes = [[[i, 0, 0, {}] for i in inputs]] if inputs else []
        self.layers.append({"class_name": cls, "name": name, "config": {"name": name, **config}, "inbound_nodes": nodes})
        return name


def _keras2_lstm_network(shape: tuple[int, int, int], nc: int, n_res: int) -> dict:
    """The model_config of make_reference.py's network, layers created in the same order."""
    g = _Keras2Graph()
    sep = lambda x, k, d: g("SeparableConv2D", [x], filters=16, kernel_size=[k, k], dilation_rate=[d, d])  # noqa: E731

    def block(x: str, pre: bool) -> str:
        x0 = g("LeakyReLU", [g("BatchNormalization", [x])]) if pre else x
        res = [sep(g("LeakyReLU", [g("BatchNormalization", [sep(x0, k, d)])]), k, d) for k, d in ((3, 1), (5, 3), (7, 5))]
        short = g("BatchNormalization", [g("Conv2D", [x], filters=48, kernel_size=[1, 1])])
        return g("Add", [short, g("Concatenate", res)])

    x = g("InputLayer", [], batch_input_shape=[None, *shape])
    for i in range(n_res):
        x = g("SpatialDropout2D", [block(x, i > 0)])
    bidi = {"layer": {"class_name": "ConvLSTM2D", "config": {"filters": 1, "kernel_size": [3, nc]}}, "merge_mode": "concat"}
    act = g("LeakyReLU", [g("Conv2D", [x], filters=nc, kernel_size=[1, 1])])
    o2 = g("Lambda", [act])
    o3 = g("Bidirectional", [o2], **bidi)
    o2t = g("Lambda", [o2])
    o3t = g("Lambda", [g("Bidirectional", [o2t], **bidi)])
    res = g("Lambda", [g("Add", [o3, o3t])])
    out = g("Softmax", [g("Add", [act, res])])
    return {"class_name": "Functional", "config": {"name": "model", "layers": g.layers, "output_layers": [[out, 0, 0]]}}


def test_full_model_file_with_lstm_block_is_walked(convlstm_dir, tmp_path):
    """A Keras 2 full-model HDF5 (graph + model_weights) of the lung_lstm network: the graph walk
    finds the LSTM RES block, recovers the configuration and reproduces tf_keras' output."""
    tag = "lung_lstm"
    x, want = _reference_io(convlstm_dir, tag)
    config = _keras2_lstm_network(x.shape[1:], nc=2, n_res=5)
    path = tmp_path / "lung_lstm_full.h5"
    names = _write_legacy_weights_h5(convlstm_dir / f"{tag}.weights.npz", path, root_group="model_weights")
    assert set(names) <= {layer["name"] for layer in config["config"]["layers"]}  # Keras' names reproduced
    with h5py.File(path, "a") as f:
        f.attrs["model_config"] = json.dumps(config)
    model = load_keras_model(path)
    assert model.cfg == CONFIGS[tag]
    got = np.asarray(jax.jit(lambda v: model(v))(jnp.asarray(x)))
    assert np.abs(got - want).max() <= 1e-4


def test_benchmark_smoke(tmp_path):
    """benchmarks/bench_lstm.py --smoke runs and writes its table."""
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_lstm.py"), "--smoke", "--results", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "LSTM RES" in text and "CONV RES" in text


def test_cli_converts_a_weights_only_file(convlstm_dir, tmp_path, capsys):
    from crnet_jax.checkpoint import read_config
    from crnet_jax.convert_keras import main

    out = tmp_path / "micro"
    assert main([str(convlstm_dir / "micro_rgb4_lstm.weights.h5"), str(out), "--config", "microscopy"]) == 0
    assert "1 LSTM RES blocks, 59,165 trainable" in capsys.readouterr().out
    assert read_config(out) == microscopy_lstm_config()
    assert main([str(convlstm_dir / "micro_rgb4_lstm.weights.h5"), str(tmp_path / "x"), "--config", "nope"]) == 2
