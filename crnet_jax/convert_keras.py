"""Import the authors' Keras Res-CR-Net models (HDF5) without TensorFlow.

The Keras graph stored in the file's `model_config` attribute is walked structurally: every
`Add` layer closes a residual block (its inputs are the shortcut BatchNorm and the Concatenate of
the branches), every branch is SepConv -> BN -> LeakyReLU -> SepConv, a CONV RES block feeds its
branches LeakyReLU(BN(x)), and the head is the 1x1 Conv2D after the last block. Layer names are
therefore never trusted, only connections.

    python -m crnet_jax.convert_keras MODEL.h5 OUT_DIR      # writes an Orbax checkpoint
    model = crnet_jax.convert_keras.load_keras_model("jms_model_all.h5")   # in memory
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Any

import numpy as np

from crnet_jax.config import ModelConfig


class KerasImportError(ValueError):
    """The file is not a Res-CR-Net Keras model we can read; the message says what is missing."""


@dataclasses.dataclass(frozen=True)
class _Layer:
    name: str
    kind: str
    config: dict[str, Any]
    inputs: tuple[str, ...]


def _inbound(layer: dict[str, Any]) -> tuple[str, ...]:
    nodes = layer.get("inbound_nodes") or []
    names: list[str] = []
    for node in nodes:
        if isinstance(node, dict):  # Keras 3 layout: {"args": [{"config": {"keras_history": [name, ...]}}]}
            def walk(obj):
                if isinstance(obj, dict):
                    if "keras_history" in obj:
                        names.append(obj["keras_history"][0])
                    else:
                        for v in obj.values():
                            walk(v)
                elif isinstance(obj, list):
                    for v in obj:
                        walk(v)
            walk(node)
        else:  # Keras 2 layout: [[name, node_index, tensor_index, kwargs], ...]
            names.extend(entry[0] for entry in node)
    return tuple(names)


class _Graph:
    def __init__(self, model_config: dict[str, Any], source: str):
        self.source = source
        try:
            layers = model_config["config"]["layers"]
        except (KeyError, TypeError) as e:
            raise KerasImportError(f"{source}: model_config has no config.layers list; not a Keras functional model") from e
        self.order = [
            _Layer(l["config"].get("name", l.get("name")), l["class_name"], l["config"], _inbound(l)) for l in layers
        ]
        self.layers = {l.name: l for l in self.order}
        self.consumers: dict[str, list[str]] = {l.name: [] for l in self.order}
        for l in self.order:
            for i in l.inputs:
                self.consumers.setdefault(i, []).append(l.name)

    def get(self, name: str) -> _Layer:
        return self.layers[name]

    def single_input(self, layer: _Layer, expect: str | tuple[str, ...]) -> _Layer:
        expect = (expect,) if isinstance(expect, str) else expect
        if len(layer.inputs) != 1:
            raise KerasImportError(f"{self.source}: layer {layer.name!r} ({layer.kind}) should have one input, has {len(layer.inputs)}")
        src = self.get(layer.inputs[0])
        if src.kind not in expect:
            raise KerasImportError(
                f"{self.source}: layer {layer.name!r} should read a {' or '.join(expect)} layer, reads {src.name!r} ({src.kind})"
            )
        return src

    def skip_dropout(self, layer: _Layer) -> _Layer:
        while layer.kind in ("SpatialDropout2D", "Dropout"):
            layer = self.get(layer.inputs[0])
        return layer


def _branch(graph: _Graph, conv2: _Layer) -> dict[str, str]:
    """Names of one branch's layers, walking back from its second SeparableConv2D."""
    act = graph.single_input(conv2, "LeakyReLU")
    bn = graph.single_input(act, "BatchNormalization")
    conv1 = graph.single_input(bn, "SeparableConv2D")
    return {"conv1": conv1.name, "bn": bn.name, "conv2": conv2.name}


def _block(graph: _Graph, add: _Layer) -> dict[str, Any]:
    """Names of a residual block's layers, walking back from its Add."""
    by_kind = {graph.get(i).kind: graph.get(i) for i in add.inputs}
    if set(by_kind) != {"BatchNormalization", "Concatenate"}:
        raise KerasImportError(
            f"{graph.source}: Add layer {add.name!r} should join a shortcut BatchNormalization and a Concatenate "
            f"of branches, joins {[graph.get(i).kind for i in add.inputs]}"
        )
    shortcut_bn = by_kind["BatchNormalization"]
    shortcut_conv = graph.single_input(shortcut_bn, "Conv2D")
    concat = by_kind["Concatenate"]
    branches = []
    for name in concat.inputs:
        conv2 = graph.get(name)
        if conv2.kind != "SeparableConv2D":
            raise KerasImportError(f"{graph.source}: branch output {name!r} is a {conv2.kind}, expected SeparableConv2D")
        branches.append(_branch(graph, conv2))
    first = graph.get(branches[0]["conv1"])
    src = graph.get(first.inputs[0])
    pre_bn = None
    if src.kind == "LeakyReLU":  # CONV RES: branches read LeakyReLU(BN(x))
        pre_bn = graph.single_input(src, "BatchNormalization").name
    block_input = graph.get(shortcut_conv.inputs[0]).name
    return {
        "add": add.name,
        "input": block_input,
        "pre_bn": pre_bn,
        "branches": branches,
        "shortcut_conv": shortcut_conv.name,
        "shortcut_bn": shortcut_bn.name,
    }


def parse_structure(model_config: dict[str, Any], source: str = "<model_config>") -> tuple[ModelConfig, dict[str, Any]]:
    """Recover the ModelConfig and the Keras layer name of every part of the network.

    Returns (config, plan) where plan = {"stem": block, "conv_res": [block, ...], "head": name}.
    """
    graph = _Graph(model_config, source)
    inputs = [l for l in graph.order if l.kind == "InputLayer"]
    if len(inputs) != 1:
        raise KerasImportError(f"{source}: expected one InputLayer, found {len(inputs)}")
    shape = inputs[0].config.get("batch_input_shape") or inputs[0].config.get("batch_shape")
    if not shape:
        raise KerasImportError(f"{source}: InputLayer {inputs[0].name!r} has no batch_input_shape")
    adds = [l for l in graph.order if l.kind == "Add"]
    if not adds:
        raise KerasImportError(f"{source}: no Add layer found: this is not a Res-CR-Net (no residual blocks)")
    blocks = [_block(graph, a) for a in adds]
    if blocks[0]["pre_bn"] is not None:
        raise KerasImportError(f"{source}: the first residual block ({adds[0].name!r}) pre-activates its input; expected a STEM")
    for b in blocks[1:]:
        if b["pre_bn"] is None:
            raise KerasImportError(f"{source}: residual block ending at {b['add']!r} has no pre-activation BatchNorm")
    convs = [l for l in graph.order if l.kind == "Conv2D" and graph.skip_dropout(graph.get(l.inputs[0])).name == adds[-1].name]
    heads = [c for c in convs if c.name not in {b["shortcut_conv"] for b in blocks}]
    if len(heads) != 1:
        raise KerasImportError(f"{source}: expected one 1x1 Conv2D head after the last block {adds[-1].name!r}, found {len(heads)}")
    head = heads[0]
    first_branches = [graph.get(br["conv1"]).config for br in blocks[0]["branches"]]
    cfg = ModelConfig(
        in_channels=int(shape[-1]),
        num_classes=int(head.config["filters"]),
        num_conv_res=len(blocks) - 1,
        num_lstm_res=0,
        filters=int(first_branches[0]["filters"]),
        kernel_sizes=tuple(int(c["kernel_size"][0]) for c in first_branches),
        dilations=tuple(int(c["dilation_rate"][0]) for c in first_branches),
    )
    for b in blocks:
        for br, k, d in zip(b["branches"], cfg.kernel_sizes, cfg.dilations):
            for part in ("conv1", "conv2"):
                c = graph.get(br[part]).config
                if (int(c["kernel_size"][0]), int(c["dilation_rate"][0])) != (k, d):
                    raise KerasImportError(f"{source}: branch layer {br[part]!r} has kernel/dilation differing from the STEM's ({k}, {d})")
    return cfg, {"stem": blocks[0], "conv_res": blocks[1:], "head": head.name}


class _Weights:
    """Weights of a Keras HDF5 file, looked up by layer and weight name."""

    def __init__(self, h5file, source: str):
        self.source = source
        self.root = h5file["model_weights"] if "model_weights" in h5file else h5file
        self.used: set[str] = set()

    def layer(self, name: str) -> dict[str, np.ndarray]:
        if name not in self.root:
            raise KerasImportError(f"{self.source}: no weights stored for layer {name!r}")
        group = self.root[name]
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])]
        out = {}
        for n in names:
            short = n.split("/")[-1].split(":")[0]
            out[short] = np.asarray(group[n])
        self.used.add(name)
        return out

    def take(self, name: str, *keys: str) -> list[np.ndarray]:
        w = self.layer(name)
        missing = [k for k in keys if k not in w]
        if missing:
            raise KerasImportError(f"{self.source}: layer {name!r} lacks weights {missing} (has {sorted(w)})")
        return [w[k] for k in keys]


def _sepconv(w: _Weights, name: str) -> dict[str, np.ndarray]:
    dw, pw, b = w.take(name, "depthwise_kernel", "pointwise_kernel", "bias")
    if dw.ndim != 4 or dw.shape[-1] != 1:
        raise KerasImportError(f"{w.source}: {name!r} depthwise kernel has shape {dw.shape}; only depth multiplier 1 is supported")
    return {"depthwise_kernel": dw[..., 0], "pointwise_kernel": pw[0, 0], "bias": b}


def _conv1x1(w: _Weights, name: str) -> dict[str, np.ndarray]:
    k, b = w.take(name, "kernel", "bias")
    if k.shape[:2] != (1, 1):
        raise KerasImportError(f"{w.source}: {name!r} kernel has shape {k.shape}; expected a 1x1 convolution")
    return {"kernel": k[0, 0], "bias": b}


def _bn(w: _Weights, name: str) -> dict[str, np.ndarray]:
    g, b, m, v = w.take(name, "gamma", "beta", "moving_mean", "moving_variance")
    return {"scale": g, "bias": b, "mean": m, "var": v}


def _block_weights(w: _Weights, block: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "branches": {
            i: {"conv1": _sepconv(w, br["conv1"]), "bn": _bn(w, br["bn"]), "conv2": _sepconv(w, br["conv2"])}
            for i, br in enumerate(block["branches"])
        },
        "shortcut_conv": _conv1x1(w, block["shortcut_conv"]),
        "shortcut_bn": _bn(w, block["shortcut_bn"]),
    }
    if block["pre_bn"] is not None:
        out["pre_bn"] = _bn(w, block["pre_bn"])
    return out


def read_keras_h5(path: str | pathlib.Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Read a Keras full-model HDF5 file into (ModelConfig, nested weights dict).

    The nested dict mirrors `nnx.state(ResCRNet(cfg))` (Params and BatchStats) and can be applied
    with `nnx.update(model, nnx.State(weights))` or `load_keras_model`.
    """
    import h5py

    path = pathlib.Path(path)
    if not path.is_file():
        raise KerasImportError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise KerasImportError(f"{path}: not a readable HDF5 file ({e})") from e
    with f:
        raw = f.attrs.get("model_config")
        if raw is None:
            raise KerasImportError(
                f"{path}: HDF5 file has no 'model_config' attribute: it is a weights-only file or not a Keras model; "
                "save the full model (model.save('x.h5')) and convert that"
            )
        raw = raw.decode() if isinstance(raw, bytes) else str(raw)
        cfg, plan = parse_structure(json.loads(raw), str(path))
        w = _Weights(f, str(path))
        weights = {
            "stem": _block_weights(w, plan["stem"]),
            "conv_res": {i: _block_weights(w, b) for i, b in enumerate(plan["conv_res"])},
            "head": {"conv": _conv1x1(w, plan["head"])},
        }
    return cfg, weights


def load_keras_model(path: str | pathlib.Path, **config_changes: Any):
    """Build a ResCRNet with the weights of a Keras HDF5 model, in inference mode.

    `config_changes` override non-structural settings, e.g. dtype="bfloat16" or depthwise_impl="xla".
    """
    from flax import nnx

    from crnet_jax.model import ResCRNet

    cfg, weights = read_keras_h5(path)
    cfg = cfg.replace(**config_changes)
    model = ResCRNet(cfg, rngs=nnx.Rngs(0))
    assign_weights(model, weights, source=str(path))
    model.eval()
    return model


def assign_weights(model, weights: dict[str, Any], source: str = "weights") -> None:
    """Copy a nested dict of arrays into the model's Params and BatchStats, checking every shape."""
    import jax.numpy as jnp
    from flax import nnx

    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    expected = {k: tuple(v.shape) for k, v in nnx.to_flat_state(state)}
    given: dict[tuple, np.ndarray] = {}

    def flatten(d: dict, prefix: tuple = ()) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                flatten(v, prefix + (k,))
            else:
                given[prefix + (k,)] = np.asarray(v)

    flatten(weights)
    missing = sorted(set(expected) - set(given), key=str)
    extra = sorted(set(given) - set(expected), key=str)
    if missing or extra:
        raise KerasImportError(f"{source}: weights do not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, shape in expected.items():
        if tuple(given[key].shape) != shape:
            raise KerasImportError(f"{source}: weight {'/'.join(map(str, key))} has shape {given[key].shape}, model expects {shape}")
    dtype = jnp.dtype(model.cfg.param_dtype)
    nnx.replace_by_pure_dict(state, jax_tree_map(lambda a: jnp.asarray(a, dtype), weights))
    nnx.update(model, state)


def jax_tree_map(fn, tree: dict) -> dict:
    return {k: jax_tree_map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m crnet_jax.convert_keras",
        description="Convert an authors' Keras Res-CR-Net HDF5 model into a crnet_jax (Orbax) checkpoint.",
    )
    parser.add_argument("model", help="Keras full-model .h5 file (e.g. jms_model_all.h5)")
    parser.add_argument("out_dir", help="directory to write (config.json + Orbax state)")
    parser.add_argument("--force", action="store_true", help="overwrite out_dir if it exists")
    args = parser.parse_args(argv)
    from crnet_jax.checkpoint import save_model
    from crnet_jax.model import count_parameters

    try:
        model = load_keras_model(args.model)
    except KerasImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = save_model(model, args.out_dir, overwrite=args.force)
    counts = count_parameters(model)
    print(
        f"converted {args.model}: {model.cfg.num_conv_res} CONV RES blocks, {counts['trainable']:,} trainable parameters, "
        f"{counts['batch_stats']:,} BatchNorm statistics -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
