"""Import the authors' Keras Res-CR-Net models (HDF5) without TensorFlow.

Full-model files. The Keras graph stored in the file's `model_config` attribute is walked
structurally: every `Add` layer joining a shortcut BatchNorm and a Concatenate of branches
closes a residual block, every branch is SepConv -> BN -> LeakyReLU -> SepConv, a CONV RES block
feeds its branches LeakyReLU(BN(x)), and the head is the 1x1 Conv2D after the last block. An
LSTM RES block is found from its two Bidirectional(ConvLSTM2D) layers (the one transposed back
by a Lambda is the column scan) and its 1x1 Conv2D -> LeakyReLU. Layer names are therefore
never trusted, only connections.

Weights-only files (legacy HDF5 `save_weights`, Keras 3 / tf_keras `.weights.h5`, or an `.npz`
of {weight name: array}) have no graph: their layers are matched by kind and graph order against
the structure of `ResCRNet(cfg)` for a given ModelConfig (`read_keras_weights`).

    python -m crnet_jax.convert_keras MODEL.h5 OUT_DIR      # writes an Orbax checkpoint
    python -m crnet_jax.convert_keras W.weights.h5 OUT_DIR --config microscopy   # weights only
    model = crnet_jax.convert_keras.load_keras_model("jms_model_all.h5")   # in memory
    model = crnet_jax.convert_keras.load_keras_weights("w.weights.h5", microscopy_lstm_config())
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


def _lstm_blocks(graph: _Graph) -> list[dict[str, Any]]:
    """LSTM RES blocks, in graph order, found from their Bidirectional layers.

    The authors' block: Conv2D(1x1) -> LeakyReLU -> Lambda(expand_dims) -> Bidirectional (row
    scan) -> Add; the column scan reads Lambda(transpose) of the expanded map and is transposed
    back by a Lambda before that Add; Lambda(reduce_sum) of the Add is added to the LeakyReLU.
    A Bidirectional whose output goes through a Lambda before the Add is the column scan.
    """
    found: dict[str, dict[str, Any]] = {}
    for bidi in (l for l in graph.order if l.kind == "Bidirectional"):
        if len(bidi.inputs) != 1:
            raise KerasImportError(f"{graph.source}: Bidirectional layer {bidi.name!r} should have one input")
        src = graph.get(bidi.inputs[0])
        while src.kind == "Lambda":
            src = graph.get(src.inputs[0])
        if src.kind != "LeakyReLU":
            raise KerasImportError(f"{graph.source}: Bidirectional layer {bidi.name!r} should read a LeakyReLU through Lambdas, reads {src.name!r} ({src.kind})")
        conv = graph.single_input(src, "Conv2D")
        after = [graph.get(c) for c in graph.consumers.get(bidi.name, [])]
        if len(after) != 1 or after[0].kind not in ("Lambda", "Add"):
            raise KerasImportError(f"{graph.source}: Bidirectional layer {bidi.name!r} should feed one Lambda or Add")
        column = after[0].kind == "Lambda"
        join = graph.get(graph.consumers[after[0].name][0]) if column else after[0]
        block = found.setdefault(src.name, {"conv": conv.name, "act": src.name, "adds": set()})
        slot = "cols" if column else "rows"
        if slot in block:
            raise KerasImportError(f"{graph.source}: LSTM RES block at {src.name!r} has two {slot} scans")
        block[slot] = bidi.name
        block["adds"].add(join.name)
        # the final Add: Lambda(reduce_sum)(join) + LeakyReLU
        for c in graph.consumers.get(join.name, []):
            for d in graph.consumers.get(c, []):
                if graph.get(d).kind == "Add" and src.name in graph.get(d).inputs:
                    block["adds"].add(d)
        inner = bidi.config.get("layer", {})
        if inner.get("class_name") not in (None, "ConvLSTM2D"):
            raise KerasImportError(f"{graph.source}: {bidi.name!r} wraps a {inner.get('class_name')}, expected ConvLSTM2D")
    blocks = []
    for block in found.values():
        missing = {"rows", "cols"} - set(block)
        if missing or len(block["adds"]) != 2:
            raise KerasImportError(f"{graph.source}: incomplete LSTM RES block at {block['act']!r} (missing {sorted(missing)} or its Adds)")
        blocks.append(block)
    position = {l.name: i for i, l in enumerate(graph.order)}
    return sorted(blocks, key=lambda b: position[b["conv"]])


def parse_structure(model_config: dict[str, Any], source: str = "<model_config>") -> tuple[ModelConfig, dict[str, Any]]:
    """Recover the ModelConfig and the Keras layer name of every part of the network.

    Returns (config, plan) where plan = {"stem": block, "conv_res": [block, ...], "head": name or
    None, "lstm_res": [{"conv": name, "rows": name, "cols": name}, ...]}.
    """
    graph = _Graph(model_config, source)
    inputs = [l for l in graph.order if l.kind == "InputLayer"]
    if len(inputs) != 1:
        raise KerasImportError(f"{source}: expected one InputLayer, found {len(inputs)}")
    shape = inputs[0].config.get("batch_input_shape") or inputs[0].config.get("batch_shape")
    if not shape:
        raise KerasImportError(f"{source}: InputLayer {inputs[0].name!r} has no batch_input_shape")
    all_adds = [l for l in graph.order if l.kind == "Add"]
    if not all_adds:
        raise KerasImportError(f"{source}: no Add layer found: this is not a Res-CR-Net (no residual blocks)")
    lstm_blocks = _lstm_blocks(graph)
    lstm_adds = {a for b in lstm_blocks for a in b["adds"]}
    adds = [a for a in all_adds if a.name not in lstm_adds]
    if not adds:
        raise KerasImportError(f"{source}: no residual block found before the LSTM RES blocks")
    blocks = [_block(graph, a) for a in adds]
    if blocks[0]["pre_bn"] is not None:
        raise KerasImportError(f"{source}: the first residual block ({adds[0].name!r}) pre-activates its input; expected a STEM")
    for b in blocks[1:]:
        if b["pre_bn"] is None:
            raise KerasImportError(f"{source}: residual block ending at {b['add']!r} has no pre-activation BatchNorm")
    convs = [l for l in graph.order if l.kind == "Conv2D" and graph.skip_dropout(graph.get(l.inputs[0])).name == adds[-1].name]
    heads = [c for c in convs if c.name not in {b["shortcut_conv"] for b in blocks}]
    if lstm_blocks:
        if [h.name for h in heads] != [lstm_blocks[0]["conv"]]:
            raise KerasImportError(
                f"{source}: the first LSTM RES block should read the last residual block {adds[-1].name!r}; "
                f"1x1 Conv2D layers reading it: {[h.name for h in heads]}"
            )
        head = None
        num_classes = int(graph.get(lstm_blocks[0]["conv"]).config["filters"])
    else:
        if len(heads) != 1:
            raise KerasImportError(f"{source}: expected one 1x1 Conv2D head after the last block {adds[-1].name!r}, found {len(heads)}")
        head = heads[0]
        num_classes = int(head.config["filters"])
    first_branches = [graph.get(br["conv1"]).config for br in blocks[0]["branches"]]
    cfg = ModelConfig(
        in_channels=int(shape[-1]),
        num_classes=num_classes,
        num_conv_res=len(blocks) - 1,
        num_lstm_res=len(lstm_blocks),
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
    return cfg, {
        "stem": blocks[0],
        "conv_res": blocks[1:],
        "head": None if head is None else head.name,
        "lstm_res": [{k: b[k] for k in ("conv", "rows", "cols")} for b in lstm_blocks],
    }


class _Weights:
    """Weights of a Keras HDF5 file, looked up by layer and weight name."""

    def __init__(self, h5file, source: str):
        self.source = source
        self.root = h5file["model_weights"] if "model_weights" in h5file else h5file
        self.used: set[str] = set()

    def raw(self, name: str) -> dict[str, np.ndarray]:
        """A layer's weights keyed by their full Keras names ('layer/.../kernel:0'), in stored order."""
        if name not in self.root:
            raise KerasImportError(f"{self.source}: no weights stored for layer {name!r}")
        group = self.root[name]
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])]
        self.used.add(name)
        return {n: np.asarray(group[n]) for n in names}

    def layer(self, name: str) -> dict[str, np.ndarray]:
        return {_short(n): a for n, a in self.raw(name).items()}

    def take(self, name: str, *keys: str) -> list[np.ndarray]:
        w = self.layer(name)
        missing = [k for k in keys if k not in w]
        if missing:
            raise KerasImportError(f"{self.source}: layer {name!r} lacks weights {missing} (has {sorted(w)})")
        return [w[k] for k in keys]


def _short(weight_name: str) -> str:
    """'bidirectional/forward_conv_lstm2d/kernel:0' -> 'kernel'."""
    return weight_name.split("/")[-1].split(":")[0]


def _split_bidirectional(raw: dict[str, np.ndarray], source: str) -> dict[str, dict[str, np.ndarray]]:
    """Weights of a Keras Bidirectional(ConvLSTM2D) keyed by full name -> {"forward": cell, "backward": cell},
    each cell {"kernel" (kh, kw, Cin, 4F), "recurrent_kernel" (kh, kw, F, 4F), "bias" (4F,)} (our layout = Keras')."""
    out: dict[str, dict[str, np.ndarray]] = {"forward": {}, "backward": {}}
    for name, array in raw.items():
        parts = name.split("/")
        direction = next((d for d in ("forward", "backward") for p in parts[:-1] if p.startswith(d)), None)
        if direction is None:
            raise KerasImportError(f"{source}: weight {name!r} belongs to neither the forward nor the backward ConvLSTM")
        out[direction][_short(name)] = array
    for direction, cell in out.items():
        if set(cell) != {"kernel", "recurrent_kernel", "bias"}:
            raise KerasImportError(f"{source}: {direction} ConvLSTM has weights {sorted(cell)}, expected kernel, recurrent_kernel, bias")
    return out


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
        }
        if plan["head"] is not None:
            weights["head"] = {"conv": _conv1x1(w, plan["head"])}
        if plan["lstm_res"]:
            weights["lstm_res"] = {
                i: {
                    "conv": _conv1x1(w, b["conv"]),
                    "rows": _split_bidirectional(w.raw(b["rows"]), f"{path}: {b['rows']}"),
                    "cols": _split_bidirectional(w.raw(b["cols"]), f"{path}: {b['cols']}"),
                }
                for i, b in enumerate(plan["lstm_res"])
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


# ---------------------------------------------------------------------------------------------
# Weights-only files (no model graph): map weighted layers by kind and graph order.
# ---------------------------------------------------------------------------------------------

SEPCONV, BATCHNORM, CONV, BIDIRECTIONAL = "SeparableConv2D", "BatchNormalization", "Conv2D", "Bidirectional"
_KERAS3_KIND = {"separable_conv2d": SEPCONV, "batch_normalization": BATCHNORM, "conv2d": CONV, "bidirectional": BIDIRECTIONAL}
_KERAS3_VARS = {
    SEPCONV: ("depthwise_kernel", "pointwise_kernel", "bias"),
    BATCHNORM: ("gamma", "beta", "moving_mean", "moving_variance"),
    CONV: ("kernel", "bias"),
    BIDIRECTIONAL: ("kernel", "recurrent_kernel", "bias"),  # per direction
}


@dataclasses.dataclass(frozen=True)
class _WeightedLayer:
    """One Keras layer with weights: name, kind (SEPCONV, ...), weights by short name
    (Bidirectional: {"forward": {...}, "backward": {...}})."""

    name: str
    kind: str
    weights: dict[str, Any]


def _classify(name: str, raw: dict[str, np.ndarray], source: str) -> _WeightedLayer:
    """Kind of a layer from its full weight names ('layer/[sub/]weight:0')."""
    shorts = {_short(n) for n in raw}
    if "recurrent_kernel" in shorts:
        return _WeightedLayer(name, BIDIRECTIONAL, _split_bidirectional(raw, f"{source}: {name}"))
    weights = {_short(n): a for n, a in raw.items()}
    if shorts == {"depthwise_kernel", "pointwise_kernel", "bias"}:
        return _WeightedLayer(name, SEPCONV, weights)
    if shorts == {"gamma", "beta", "moving_mean", "moving_variance"}:
        return _WeightedLayer(name, BATCHNORM, weights)
    if shorts == {"kernel", "bias"} and weights["kernel"].ndim == 4:
        return _WeightedLayer(name, CONV, weights)
    raise KerasImportError(f"{source}: layer {name!r} has weights {sorted(shorts)}, which is no Res-CR-Net layer")


def _layers_from_npz(path: pathlib.Path) -> list[_WeightedLayer]:
    """`{weight name: array}` npz in the model's weight order (Keras `model.weights`)."""
    with np.load(path) as data:
        groups: dict[str, dict[str, np.ndarray]] = {}
        for key in data.files:
            groups.setdefault(key.split("/")[0], {})[key] = data[key]
    return [_classify(name, raw, str(path)) for name, raw in groups.items()]


def _layers_from_legacy_h5(root, source: str) -> list[_WeightedLayer]:
    """Legacy Keras HDF5 weights (root attribute layer_names in graph order, each layer's group
    with attribute weight_names); also the model_weights group of a full-model file."""
    w = _Weights.__new__(_Weights)
    w.source, w.root, w.used = source, root, set()
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in root.attrs["layer_names"]]
    layers = []
    for name in names:
        raw = w.raw(name)
        if raw:
            layers.append(_classify(name, raw, source))
    return layers


def _layers_from_keras3_h5(root, source: str) -> list[_WeightedLayer]:
    """Keras 3 / tf_keras `.weights.h5` layout: layers/<kind>[_<n>]/vars/<i>, Bidirectional as
    layers/<name>/{forward,backward}_layer/cell/vars/<i>. The groups are named by layer kind
    and position in graph order (not by the layers' own names), so order = numeric suffix."""
    import re

    layers = []
    for name, group in root["layers"].items():
        m = re.fullmatch(r"([a-z0-9_]+?)(?:_(\d+))?", name)
        kind = _KERAS3_KIND.get(m.group(1)) if m else None
        if kind is None:
            stored = [] if "vars" not in group else list(group["vars"])
            if stored:
                raise KerasImportError(f"{source}: layer group {name!r} has weights but is no Res-CR-Net layer kind")
            continue

        def read(vars_group, what: str) -> dict[str, np.ndarray]:
            names = _KERAS3_VARS[kind]
            if sorted(vars_group) != [str(i) for i in range(len(names))]:
                raise KerasImportError(f"{source}: {what} holds variables {sorted(vars_group)}, expected {len(names)}: {names}")
            return {n: np.asarray(vars_group[str(i)]) for i, n in enumerate(names)}

        if kind == BIDIRECTIONAL:
            weights = {d: read(group[f"{d}_layer/cell/vars"], f"{name}/{d}_layer") for d in ("forward", "backward")}
        else:
            weights = read(group["vars"], name)
        layers.append((int(m.group(2) or 0), _WeightedLayer(name, kind, weights)))
    return [layer for _, layer in sorted(layers, key=lambda t: t[0])]


def _read_weight_layers(path: pathlib.Path) -> list[_WeightedLayer]:
    if not path.is_file():
        raise KerasImportError(f"{path}: no such file")
    if path.suffix == ".npz":
        return _layers_from_npz(path)
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise KerasImportError(f"{path}: not a readable HDF5 file nor an .npz ({e})") from e
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" in root.attrs:
            return _layers_from_legacy_h5(root, str(path))
        if "layers" in root:
            return _layers_from_keras3_h5(root, str(path))
    raise KerasImportError(f"{path}: HDF5 file has neither a 'layer_names' attribute (legacy Keras) nor a 'layers' group (Keras 3): not a Keras weights file")


def _structure_from_order(layers: list[_WeightedLayer], cfg: ModelConfig, source: str) -> dict[str, Any]:
    """Map weighted layers onto ResCRNet(cfg) by kind and graph order.

    Keras orders a functional model's layers by depth from the input, which for every
    residual block gives, per kind: SeparableConv2D conv1 of each branch, then conv2 of each;
    BatchNormalization [pre-activation], branch BNs, shortcut BN; Conv2D the shortcut. The
    network then ends with the head Conv2D, or per LSTM RES block its 1x1 Conv2D and two
    Bidirectional layers, the column scan first (it is one Lambda deeper than the row scan).
    """
    queues: dict[str, list[_WeightedLayer]] = {k: [] for k in (SEPCONV, BATCHNORM, CONV, BIDIRECTIONAL)}
    for layer in layers:
        queues[layer.kind].append(layer)
    counts = {k: len(v) for k, v in queues.items()}

    def take(kind: str) -> dict[str, Any]:
        if not queues[kind]:
            raise KerasImportError(
                f"{source}: too few {kind} layers for {cfg.num_conv_res} CONV RES + {cfg.num_lstm_res} LSTM RES blocks "
                f"(file has {counts})"
            )
        return queues[kind].pop(0).weights

    def sep(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"depthwise_kernel": w["depthwise_kernel"][..., 0], "pointwise_kernel": w["pointwise_kernel"][0, 0], "bias": w["bias"]}

    def bn(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"scale": w["gamma"], "bias": w["beta"], "mean": w["moving_mean"], "var": w["moving_variance"]}

    def conv(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"kernel": w["kernel"][0, 0], "bias": w["bias"]}

    nb = len(cfg.kernel_sizes)

    def block(preactivate: bool) -> dict[str, Any]:
        conv1 = [sep(take(SEPCONV)) for _ in range(nb)]
        conv2 = [sep(take(SEPCONV)) for _ in range(nb)]
        out: dict[str, Any] = {"pre_bn": bn(take(BATCHNORM))} if preactivate else {}
        bns = [bn(take(BATCHNORM)) for _ in range(nb)]
        out["shortcut_bn"] = bn(take(BATCHNORM))
        out["shortcut_conv"] = conv(take(CONV))
        out["branches"] = {i: {"conv1": conv1[i], "bn": bns[i], "conv2": conv2[i]} for i in range(nb)}
        return out

    weights: dict[str, Any] = {"stem": block(False), "conv_res": {i: block(True) for i in range(cfg.num_conv_res)}}
    if cfg.num_lstm_res == 0:
        weights["head"] = {"conv": conv(take(CONV))}
    else:
        lstm = {}
        for i in range(cfg.num_lstm_res):
            c = conv(take(CONV))
            cols = take(BIDIRECTIONAL)
            rows = take(BIDIRECTIONAL)
            lstm[i] = {"conv": c, "rows": rows, "cols": cols}
        weights["lstm_res"] = lstm
    left = {k: [l.name for l in v] for k, v in queues.items() if v}
    if left:
        raise KerasImportError(f"{source}: layers left over after filling the network (config {cfg.num_conv_res} CONV RES, {cfg.num_lstm_res} LSTM RES): {left}")
    return weights


def read_keras_weights(path: str | pathlib.Path, cfg: ModelConfig) -> dict[str, Any]:
    """Read a Keras weights file without a model graph into the nested weights dict of ResCRNet(cfg).

    Accepted: a legacy HDF5 weights file (`save_weights('x.h5')`: attribute layer_names), a
    Keras 3 / tf_keras `.weights.h5` file (layers/<kind>_<n>/vars), the model_weights of a
    full-model HDF5 file, or an `.npz` of {Keras weight name: array} in `model.weights` order.
    Layers are matched by kind and graph order (see `_structure_from_order`), not by name;
    every shape is checked when the weights are assigned.
    """
    path = pathlib.Path(path)
    return _structure_from_order(_read_weight_layers(path), cfg, str(path))


def read_lstm_block_weights(path: str | pathlib.Path) -> dict[str, Any]:
    """Weights of a lone LSTM RES block (a Keras file holding one 1x1 Conv2D and two
    Bidirectional(ConvLSTM2D) layers) as the nested dict of `LSTMResBlock`'s Params."""
    path = pathlib.Path(path)
    layers = _read_weight_layers(path)
    kinds = [l.kind for l in layers]
    if sorted(kinds) != sorted([CONV, BIDIRECTIONAL, BIDIRECTIONAL]):
        raise KerasImportError(f"{path}: expected one Conv2D and two Bidirectional layers for an LSTM RES block, found {kinds}")
    conv = next(l for l in layers if l.kind == CONV).weights
    cols, rows = (l.weights for l in layers if l.kind == BIDIRECTIONAL)  # graph order: column scan first
    return {"conv": {"kernel": conv["kernel"][0, 0], "bias": conv["bias"]}, "rows": rows, "cols": cols}


def load_keras_weights(path: str | pathlib.Path, cfg: ModelConfig, **config_changes: Any):
    """Build ResCRNet(cfg) with the weights of a Keras weights file (see `read_keras_weights`),
    in inference mode. `config_changes` override non-structural settings."""
    from flax import nnx

    from crnet_jax.model import ResCRNet

    weights = read_keras_weights(path, cfg)
    model = ResCRNet(cfg.replace(**config_changes), rngs=nnx.Rngs(0))
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


def _config_arg(value: str) -> ModelConfig:
    from crnet_jax.config import lung_config, microscopy_lstm_config

    presets = {"lung": lung_config, "microscopy": microscopy_lstm_config}
    if value in presets:
        return presets[value]()
    path = pathlib.Path(value)
    if not path.is_file():
        raise KerasImportError(f"--config {value!r}: neither {sorted(presets)} nor a ModelConfig JSON file")
    return ModelConfig.from_dict(json.loads(path.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m crnet_jax.convert_keras",
        description="Convert an authors' Keras Res-CR-Net HDF5 model into a crnet_jax (Orbax) checkpoint.",
    )
    parser.add_argument("model", help="Keras full-model .h5 file (e.g. jms_model_all.h5), or a weights-only file with --config")
    parser.add_argument("out_dir", help="directory to write (config.json + Orbax state)")
    parser.add_argument("--force", action="store_true", help="overwrite out_dir if it exists")
    parser.add_argument(
        "--config",
        default=None,
        help="the input is a weights-only file (.h5 / .weights.h5 / .npz): the network it belongs to, "
        "'lung', 'microscopy' or a ModelConfig JSON file (e.g. a checkpoint's config.json)",
    )
    args = parser.parse_args(argv)
    from crnet_jax.checkpoint import save_model
    from crnet_jax.model import count_parameters

    try:
        if args.config is None:
            model = load_keras_model(args.model)
        else:
            model = load_keras_weights(args.model, _config_arg(args.config))
    except KerasImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = save_model(model, args.out_dir, overwrite=args.force)
    counts = count_parameters(model)
    print(
        f"converted {args.model}: {model.cfg.num_conv_res} CONV RES + {model.cfg.num_lstm_res} LSTM RES blocks, "
        f"{counts['trainable']:,} trainable parameters, "
        f"{counts['batch_stats']:,} BatchNorm statistics -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
