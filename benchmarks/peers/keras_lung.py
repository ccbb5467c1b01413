"""Keras 3 peer of the authors' Res-CR-Net lung network, for side-by-side benchmarks.

This is an independent Keras 3 rebuild of the network stored in the authors' Keras 2.2.4 file
``jms_model_all.h5`` (STEM + 5 CONV RES blocks + head, 58,309 trainable parameters) and of their
contour-weighted Tanimoto loss. :func:`load_authors_weights` maps the h5 layers onto the rebuild
by walking both graphs from the output backwards (so the correspondence is derived and checked,
not assumed from layer names) and :func:`check_parity` proves the rebuild exact against
``keras_reference_outputs.npz``.

Run as a benchmark subprocess from the repository root, under an interpreter that has
TensorFlow/Keras 3 (see ``benchmarks/peers/README.md``)::

    /work/venv-peers/bin/python -m benchmarks.peers.keras_lung --mode train \
        --height 300 --width 340 --batch 8 --steps 3 --warmup 1 --json

It prints exactly one JSON line on stdout (logs go to stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import keras  # noqa: E402
from keras import layers, ops  # noqa: E402

# --- architecture constants (all confirmed against the h5 ``model_config``) -------------------
NUM_FILTERS = 16                      # per dilation branch; 3 branches -> 48 channels
BRANCHES = ((3, 1), (5, 3), (7, 5))   # (kernel size, dilation rate) of the three branches
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3
LEAK = 0.1                            # LeakyReLU slope (h5: alpha 0.10000000149011612)
DROPOUT = 0.05                        # SpatialDropout2D after STEM and CONV RES 1..4
NUM_CONV_RES = 5
NUM_CLASSES = 2                       # channel 0 = lungs, channel 1 = non-lungs
TRAINABLE_PARAMS = 58_309
TOTAL_PARAMS = 59_941                 # + 1,632 BatchNorm moving statistics

# Keras' own default ("auto") resolves to jit_compile=False on a CPU-only TensorFlow. Measured on
# the 2-core dev box at 300x340, batch 8 (train and infer), XLA was slower; see README.md. The
# benchmark therefore runs with jit_compile=False unless --jit on is given.
DEFAULT_JIT_COMPILE = False

# Loss smoothing of the authors' code for W_MODE == "contour" (Constants.py: LS = 1).
DEFAULT_SMOOTH = 1.0


# ==============================================================================================
# Model
# ==============================================================================================
def _sep(name: str, k: int, d: int) -> layers.Layer:
    return layers.SeparableConv2D(
        NUM_FILTERS, k, dilation_rate=d, padding="same", use_bias=True, name=name)


def _bn(name: str) -> layers.Layer:
    return layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


def _lrelu(name: str) -> layers.Layer:
    return layers.LeakyReLU(negative_slope=LEAK, name=name)


def _res_block(x, prefix: str, preact: bool):
    """STEM (preact=False) or CONV RES (preact=True) block.

    Branches: SepConv(k, d) -> BN -> LeakyReLU -> SepConv(k, d), for (k, d) in BRANCHES, then
    concatenated (48 ch) and added to BN(Conv2D(48, 1)(x)). In a CONV RES block the three branches
    share one pre-activation LeakyReLU(BN(x)); the 1x1 shortcut always reads the raw x.
    """
    branch_in = x
    if preact:
        branch_in = _lrelu(f"{prefix}_pre_act")(_bn(f"{prefix}_pre_bn")(x))
    outs = []
    for i, (k, d) in enumerate(BRANCHES):
        h = _sep(f"{prefix}_b{i}_sep1", k, d)(branch_in)
        h = _bn(f"{prefix}_b{i}_bn")(h)
        h = _lrelu(f"{prefix}_b{i}_act")(h)
        h = _sep(f"{prefix}_b{i}_sep2", k, d)(h)
        outs.append(h)
    cat = layers.Concatenate(axis=-1, name=f"{prefix}_concat")(outs)
    short = layers.Conv2D(NUM_FILTERS * len(BRANCHES), 1, padding="same", use_bias=True,
                          name=f"{prefix}_short_conv")(x)
    short = _bn(f"{prefix}_short_bn")(short)
    return layers.Add(name=f"{prefix}_add")([short, cat])  # same operand order as the h5


def build_lung_model(height: int | None = None, width: int | None = None, channels: int = 1,
                     dropout: float = DROPOUT, name: str = "res_cr_net_lung") -> keras.Model:
    """The authors' lung Res-CR-Net (STEM + 5 CONV RES + head), output = softmax over 2 classes."""
    inp = keras.Input((height, width, channels), name="image")
    x = _res_block(inp, "stem", preact=False)
    x = layers.SpatialDropout2D(dropout, name="stem_drop")(x)
    for b in range(1, NUM_CONV_RES + 1):
        x = _res_block(x, f"res{b}", preact=True)
        if b < NUM_CONV_RES:
            x = layers.SpatialDropout2D(dropout, name=f"res{b}_drop")(x)
    x = layers.Conv2D(NUM_CLASSES, 1, padding="same", use_bias=True, name="head_conv")(x)
    x = _lrelu("head_act")(x)
    out = layers.Activation("softmax", name="softmax")(x)
    return keras.Model(inp, out, name=name)


def count_params(model: keras.Model) -> tuple[int, int]:
    trainable = int(sum(int(np.prod(v.shape)) for v in model.trainable_weights))
    total = int(sum(int(np.prod(v.shape)) for v in model.weights))
    return trainable, total


# ==============================================================================================
# Weighted Tanimoto loss (authors' MODULES/Losses.py, W_MODE = "contour")
# ==============================================================================================
def contour_kernel_size(short_axis: int) -> int:
    """Averaging window by the short image axis: 11/21/31/41 for <=150/<=300/<=600/>600."""
    if short_axis <= 150:
        return 11
    if short_axis <= 300:
        return 21
    if short_axis <= 600:
        return 31
    return 41


def contour_border(y_true, short_axis: int | None = None):
    """1 where the (padding-excluded, stride-1, same-size) local mean is in (0.005, 0.995)."""
    y = ops.cast(y_true, "float32")
    if short_axis is None:
        short_axis = min(int(y.shape[1]), int(y.shape[2]))
    k = contour_kernel_size(short_axis)
    # TensorFlow's SAME average pooling divides by the number of in-image elements only.
    avg = ops.average_pool(y, pool_size=k, strides=1, padding="same")
    return ops.cast(avg > 0.005, "float32") * ops.cast(avg < 0.995, "float32")


def contour_weights(y_true, short_axis: int | None = None):
    """w = 1 + 2 * border, rescaled to mean 1 over the whole batch tensor, then squared."""
    border = contour_border(y_true, short_axis)
    w = ops.ones_like(border)
    w0 = ops.sum(w)
    w = w + 2.0 * border
    w1 = ops.sum(w)
    w = w * (w0 / w1)
    return w * w


def weighted_tanimoto_coeff(y_true, y_pred, smooth: float = DEFAULT_SMOOTH,
                            short_axis: int | None = None):
    """(T(p, y) + T(1-p, 1-y)) / 2, T = (sum w p y + s) / (sum w (p^2 + y^2 - p y) + s).

    Sums run over batch, space and classes (the authors' reduce_sum without axes).
    """
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.cast(y_true, y_pred.dtype)
    w = ops.cast(contour_weights(y_true, short_axis), y_pred.dtype)

    def tani(p, y):
        num = ops.sum(w * y * p)
        den = ops.sum(w * (y * y + p * p - y * p))
        return (num + smooth) / (den + smooth)

    return 0.5 * (tani(y_pred, y_true) + tani(1.0 - y_pred, 1.0 - y_true))


def make_weighted_tanimoto_loss(smooth: float = DEFAULT_SMOOTH, short_axis: int | None = None):
    """Loss function ``(y_true, y_pred) -> 1 - weighted Tanimoto coefficient`` (a scalar)."""
    def weighted_tanimoto_loss(y_true, y_pred):
        return 1.0 - weighted_tanimoto_coeff(y_true, y_pred, smooth=smooth, short_axis=short_axis)
    return weighted_tanimoto_loss


weighted_tanimoto_loss = make_weighted_tanimoto_loss()


# ==============================================================================================
# Loading the authors' h5 weights (by derived, verified layer correspondence)
# ==============================================================================================
def _decode(v):
    return v.decode("utf-8") if isinstance(v, bytes) else v


def _authors_graph(h5_path) -> tuple[dict, str]:
    """{layer name: (class, config, [inbound layer names])} and the output layer of the h5."""
    import h5py
    with h5py.File(h5_path, "r") as f:
        cfg = json.loads(_decode(f.attrs["model_config"]))["config"]
    graph = {}
    for lay in cfg["layers"]:
        nodes = lay.get("inbound_nodes") or []
        if len(nodes) > 1:
            raise ValueError(f"layer {lay['name']} is called more than once")
        inbound = [n[0] for n in nodes[0]] if nodes else []
        graph[lay["name"]] = (lay["class_name"], lay["config"], inbound)
    outs = cfg["output_layers"]
    if len(outs) != 1:
        raise ValueError("expected a single-output model")
    return graph, outs[0][0]


def _keras_histories(obj, found: list) -> list:
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            found.append(obj["config"]["keras_history"][0])
        else:
            for v in obj.values():
                _keras_histories(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _keras_histories(v, found)
    return found


def _keras_graph(model: keras.Model) -> tuple[dict, str]:
    cfg = model.get_config()
    graph = {}
    for lay in cfg["layers"]:
        nodes = lay.get("inbound_nodes") or []
        if len(nodes) > 1:
            raise ValueError(f"layer {lay['name']} is called more than once")
        inbound = _keras_histories(nodes[0].get("args", []), []) if nodes else []
        graph[lay["name"]] = (lay["class_name"], lay["config"], inbound)
    outs = cfg["output_layers"]
    out = outs[0] if isinstance(outs[0], str) else outs[0][0]
    if not isinstance(outs[0], str) and len(outs) != 1:
        raise ValueError("expected a single-output model")
    return graph, out


def _as_tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def _check_same(cls: str, mine: dict, theirs: dict, where: str) -> None:
    def need(cond, what):
        if not cond:
            raise ValueError(f"{where}: {cls} {what} differs: mine={mine} theirs={theirs}")

    if cls in ("SeparableConv2D", "Conv2D"):
        need(mine["filters"] == theirs["filters"], "filters")
        need(_as_tuple(mine["kernel_size"]) == _as_tuple(theirs["kernel_size"]), "kernel_size")
        need(_as_tuple(mine["dilation_rate"]) == _as_tuple(theirs["dilation_rate"]), "dilation")
        need(_as_tuple(mine["strides"]) == _as_tuple(theirs["strides"]), "strides")
        need(mine["padding"] == theirs["padding"], "padding")
        need(mine["use_bias"] == theirs["use_bias"], "use_bias")
        need(mine["activation"] == theirs["activation"], "activation")
        if cls == "SeparableConv2D":
            need(mine["depth_multiplier"] == theirs["depth_multiplier"], "depth_multiplier")
    elif cls == "BatchNormalization":
        ax_m = mine["axis"][0] if isinstance(mine["axis"], list) else mine["axis"]
        ax_t = theirs["axis"][0] if isinstance(theirs["axis"], list) else theirs["axis"]
        need(ax_m % 4 == ax_t % 4, "axis")
        need(abs(mine["momentum"] - theirs["momentum"]) < 1e-9, "momentum")
        need(abs(mine["epsilon"] - theirs["epsilon"]) < 1e-12, "epsilon")
        need(mine["center"] == theirs["center"] and mine["scale"] == theirs["scale"], "center/scale")
    elif cls == "LeakyReLU":
        slope_m = mine.get("negative_slope", mine.get("alpha"))
        slope_t = theirs.get("negative_slope", theirs.get("alpha"))
        need(abs(slope_m - slope_t) < 1e-6, "slope")
    elif cls == "SpatialDropout2D":
        need(abs(mine["rate"] - theirs["rate"]) < 1e-12, "rate")
    elif cls == "Activation":
        need(mine["activation"] == theirs["activation"], "activation")
    elif cls == "Concatenate":
        need(mine["axis"] % 4 == theirs["axis"] % 4, "axis")
    elif cls in ("Add", "InputLayer"):
        pass
    else:
        raise ValueError(f"{where}: unexpected layer class {cls}")


def match_authors_layers(model: keras.Model, h5_path) -> dict[str, str]:
    """Map each layer of ``model`` to the h5 layer in the same place of the graph.

    Walks both graphs from their outputs towards the input, pairing the i-th inbound layer of
    each matched pair; checks class and hyper-parameters of every pair and that the mapping is a
    bijection covering every layer of both graphs. Raises ValueError on any mismatch.
    """
    mine, mine_out = _keras_graph(model)
    theirs, their_out = _authors_graph(h5_path)
    mapping: dict[str, str] = {}
    stack = [(mine_out, their_out)]
    while stack:
        a, b = stack.pop()
        if a in mapping:
            if mapping[a] != b:
                raise ValueError(f"{a} maps to both {mapping[a]} and {b}")
            continue
        cls_a, cfg_a, in_a = mine[a]
        cls_b, cfg_b, in_b = theirs[b]
        if cls_a != cls_b:
            raise ValueError(f"{a} ({cls_a}) vs {b} ({cls_b}): different layer classes")
        if len(in_a) != len(in_b):
            raise ValueError(f"{a} vs {b}: different number of inputs")
        _check_same(cls_a, cfg_a, cfg_b, f"{a}<->{b}")
        mapping[a] = b
        stack.extend(zip(in_a, in_b))
    if len(mapping) != len(mine) or len(set(mapping.values())) != len(theirs):
        raise ValueError(f"graphs differ in size: matched {len(mapping)}, mine {len(mine)}, "
                         f"theirs {len(theirs)}")
    return mapping


def load_authors_weights(model: keras.Model, h5_path) -> dict:
    """Copy the authors' h5 weights into ``model``; returns a summary of what was loaded."""
    import h5py
    mapping = match_authors_layers(model, h5_path)
    n_layers = n_tensors = n_values = 0
    with h5py.File(h5_path, "r") as f:
        g = f["model_weights"]
        for mine_name, their_name in mapping.items():
            layer = model.get_layer(mine_name)
            grp = g[their_name] if their_name in g else None
            names = [_decode(n) for n in grp.attrs.get("weight_names", [])] if grp else []
            if not layer.weights and not names:
                continue
            src = {n.split("/")[-1].split(":")[0]: np.asarray(grp[n]) for n in names}
            for v in layer.weights:
                key = v.name.split("/")[-1].split(":")[0]
                if key not in src:
                    raise ValueError(f"{mine_name}: no '{key}' in h5 layer {their_name}")
                arr = src.pop(key)
                if tuple(arr.shape) != tuple(v.shape):
                    raise ValueError(f"{mine_name}.{key}: shape {v.shape} vs h5 {arr.shape}")
                v.assign(arr.astype(v.dtype))
                n_tensors += 1
                n_values += int(arr.size)
            if src:
                raise ValueError(f"{their_name}: h5 weights not used: {sorted(src)}")
            n_layers += 1
    return {"weighted_layers": n_layers, "tensors": n_tensors, "values": n_values,
            "layers_matched": len(mapping)}


def load_sample_image(path) -> np.ndarray:
    """PNG / 255 as float32, shaped (1, H, W, 1) - the authors' inference input."""
    from PIL import Image
    a = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    return a[None, :, :, None]


def check_parity(authors_dir, tag: str = "JMS", keys: list[str] | None = None) -> dict:
    """Max |rebuild - reference| per sample of ``keras_reference_outputs.npz`` for one model."""
    authors_dir = Path(authors_dir)
    ref = np.load(authors_dir / "keras_reference_outputs.npz")
    model = build_lung_model(None, None, 1)
    summary = load_authors_weights(model, authors_dir / f"{tag.lower()}_model_all.h5")
    keys = keys or [k for k in ref.files if k.split("__")[0].upper() == tag.upper()]
    diffs = {}
    for key in keys:
        _, split, ident = key.split("__")
        x = load_sample_image(authors_dir / "samples" / split / "images" / f"{ident}.png")
        y = np.asarray(model(x, training=False))[0]
        diffs[key] = float(np.max(np.abs(y - ref[key])))
    return {"tag": tag, "load": summary, "max_abs_diff": diffs,
            "worst": max(diffs.values()) if diffs else None}


# ==============================================================================================
# Benchmark
# ==============================================================================================
def _upsample_bilinear(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of (N, gh, gw) to (N, h, w), corners aligned."""
    gh, gw = a.shape[1:]
    r = np.linspace(0, gh - 1, h)
    c = np.linspace(0, gw - 1, w)
    r0 = np.minimum(np.floor(r).astype(int), gh - 2)
    c0 = np.minimum(np.floor(c).astype(int), gw - 2)
    fr = (r - r0)[None, :, None]
    fc = (c - c0)[None, None, :]
    a00 = a[:, r0][:, :, c0]
    a01 = a[:, r0][:, :, c0 + 1]
    a10 = a[:, r0 + 1][:, :, c0]
    a11 = a[:, r0 + 1][:, :, c0 + 1]
    return ((1 - fr) * ((1 - fc) * a00 + fc * a01) + fr * ((1 - fc) * a10 + fc * a11))


def make_batch(rng: np.random.Generator, batch: int, height: int, width: int,
               channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Random images in [0, 1) and random blobby one-hot masks (lungs, non-lungs)."""
    x = rng.random((batch, height, width, channels), dtype=np.float32)
    cell = max(8, min(height, width) // 5)  # blob scale in pixels (60 at 300 x 340)
    coarse = rng.standard_normal((batch, height // cell + 2, width // cell + 2))
    m = (_upsample_bilinear(coarse, height, width) > 0.3).astype(np.float32)
    y = np.stack([m, 1.0 - m], axis=-1).astype(np.float32)
    return x, y


def _thread_info() -> dict:
    import tensorflow as tf
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = None
    return {
        "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
        "note": "0 = TensorFlow default (all visible cores)",
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "env": {k: os.environ.get(k) for k in (
            "OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS",
            "TF_ENABLE_ONEDNN_OPTS", "XLA_FLAGS") if os.environ.get(k) is not None},
    }


def run_benchmark(mode: str, height: int, width: int, batch: int, steps: int, warmup: int,
                  jit_compile: bool = DEFAULT_JIT_COMPILE, seed: int = 0,
                  intra_op: int = 0, inter_op: int = 0) -> dict:
    import tensorflow as tf
    if intra_op:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    if inter_op:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)

    t_build = time.perf_counter()
    model = build_lung_model(height, width, 1)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-3),
                  loss=make_weighted_tanimoto_loss(), jit_compile=jit_compile)
    build_s = time.perf_counter() - t_build
    data = [make_batch(rng, batch, height, width) for _ in range(2)]
    border_fraction = float(np.mean(np.asarray(contour_border(data[0][1]))))

    if mode == "train":
        def step(i):
            x, y = data[i % len(data)]
            return float(model.train_on_batch(x, y))  # returns the loss: synchronous
    elif mode == "infer":
        def step(i):
            x, _ = data[i % len(data)]
            return float(np.asarray(model.predict_on_batch(x)).ravel()[0])
    else:
        raise ValueError(f"unknown mode {mode!r}")

    warmup_times, times, last = [], [], None
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        last = step(i)
        dt = time.perf_counter() - t0
        (warmup_times if i < warmup else times).append(dt)
    if not np.isfinite(last):
        raise FloatingPointError(f"non-finite result after {warmup + steps} steps: {last}")

    med = statistics.median(times) if times else float("nan")
    trainable, total = count_params(model)
    import tensorflow as tf  # noqa: F811
    return {
        "framework": "keras",
        "framework_version": keras.__version__,
        "backend": keras.backend.backend(),
        "backend_version": tf.__version__,
        "python": platform.python_version(),
        "mode": mode,
        "height": height,
        "width": width,
        "batch": batch,
        "steps": steps,
        "warmup": warmup,
        "jit_compile": bool(model.jit_compile),
        "jit_compile_default": DEFAULT_JIT_COMPILE,
        "optimizer": "Adam(1e-3)",
        "loss": "weighted_tanimoto(contour, smooth=1)",
        "step_api": "train_on_batch" if mode == "train" else "predict_on_batch",
        "step_times_s": times,
        "warmup_times_s": warmup_times,
        "median_s_per_step": med,
        "images_per_s": batch / med if times else float("nan"),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "build_compile_s": build_s,
        "last_value": last,
        "mask_border_fraction": border_fraction,
        "params_trainable": trainable,
        "params_total": total,
        "threads": _thread_info(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers.keras_lung",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("train", "infer", "parity"), default="train")
    p.add_argument("--height", type=int, default=300)
    p.add_argument("--width", type=int, default=340)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jit", choices=("default", "on", "off"), default="default",
                   help=f"model.compile(jit_compile=...); default = {DEFAULT_JIT_COMPILE}")
    p.add_argument("--intra-op-threads", type=int, default=0, help="0 = TensorFlow default")
    p.add_argument("--inter-op-threads", type=int, default=0, help="0 = TensorFlow default")
    p.add_argument("--authors-dir", default=None,
                   help="parity mode: folder with the authors' h5 files, samples/ and "
                        "keras_reference_outputs.npz (default ../shared/reference/rescrnet-authors)")
    p.add_argument("--json", action="store_true", help="print one JSON line only")
    a = p.parse_args(argv)

    if a.mode == "parity":
        root = Path(__file__).resolve().parents[2]
        d = Path(a.authors_dir) if a.authors_dir else (
            Path(os.environ.get("CRNET_SHARED", root.parent / "shared"))
            / "reference" / "rescrnet-authors")
        res = {"framework": "keras", "framework_version": keras.__version__, "mode": "parity",
               "results": [check_parity(d, tag) for tag in ("JMS", "V7")
                           if (d / f"{tag.lower()}_model_all.h5").exists()]}
        res["worst"] = max(r["worst"] for r in res["results"])
        res["pass_1e-4"] = res["worst"] <= 1e-4
    else:
        jit = {"default": DEFAULT_JIT_COMPILE, "on": True, "off": False}[a.jit]
        res = run_benchmark(a.mode, a.height, a.width, a.batch, a.steps, a.warmup,
                            jit_compile=jit, seed=a.seed, intra_op=a.intra_op_threads,
                            inter_op=a.inter_op_threads)
    if a.json:
        print(json.dumps(res), flush=True)
    else:
        print(json.dumps(res, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
