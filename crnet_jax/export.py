"""Export the whole inference function (preprocessing + network + back to the film's size) as a
serialised `jax.export` artifact (StableHLO), runnable with JAX alone, without crnet_jax.

    python -m crnet_jax.export models/jms jms_512.jaxexport --height 512 --width 512

The exported function takes a batch of films of ONE fixed size and returns probabilities:

    films float32 (B, height, width) in [0, 1]  ->  float32 (B, height, width, K), channel 0 = lung

B is symbolic (any batch size) unless ``--batch N`` fixes it. Inside: resize to the network's
input (bilinear, antialiased when shrinking), the model's contrast step (histogram equalisation
exactly as crnet_jax.preprocess / OpenCV, or none), padding (``pad`` mode), intensity scaling,
the network (softmax), cropping and bilinear resizing back to (height, width). The mask is
``argmax(p, -1) == 0``; post-processing (largest components, hole filling) is not included.

To run it:

    import jax, numpy as np
    exported = jax.export.deserialize(bytearray(open("jms_512.jaxexport", "rb").read()))
    probs = np.asarray(exported.call(films))

A JSON file beside it (``.json`` appended) describes the input, output and preprocessing.

The network is exported with the pure-JAX depthwise convolution ("shift"), never the C++ FFI
kernel, so the artifact needs no custom call. Resizing uses jax.image.resize, whose antialiased
bilinear kernel matches Pillow's (used by crnet_jax.preprocess) to ~1e-6; after 8-bit
quantisation for equalisation a few pixels may land one grey level apart, so the exported
probabilities match crnet_jax.predict closely but not bit for bit (identical when the film
already has the network's size).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from crnet_jax.preprocess import PreprocessConfig, compute_geometry


def equalize_hist_jax(x: jax.Array, bins: int = 256) -> jax.Array:
    """Histogram equalisation of one float image (H, W) in [0, 1] -> float32 (H, W) in [0, 1];
    the same arithmetic as crnet_jax.preprocess.equalize_hist (OpenCV's equalizeHist)."""
    q = jnp.rint(jnp.clip(x, 0.0, 1.0) * (bins - 1)).astype(jnp.int32)
    hist = jnp.zeros((bins,), jnp.int32).at[q.ravel()].add(1)
    first = jnp.argmax(hist > 0)
    n_first = hist[first]
    total = q.size
    scale = jnp.float32(bins - 1) / (jnp.float32(total) - n_first.astype(jnp.float32))
    cum = jnp.cumsum(hist) - n_first
    lut = jnp.clip(jnp.rint(cum.astype(jnp.float32) * scale), 0, bins - 1)
    lut = jnp.where(jnp.arange(bins) <= first, 0.0, lut)
    out = lut[q]
    constant = n_first == total
    out = jnp.where(constant, first.astype(jnp.float32), out)
    return out.astype(jnp.float32) / jnp.float32(bins - 1)


def _resize(x: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """(B, H, W[, C]) -> (B, h, w[, C]) bilinear, antialiased when shrinking (like Pillow)."""
    if tuple(x.shape[1:3]) == tuple(shape):
        return x
    return jax.image.resize(x, (x.shape[0], *shape, *x.shape[3:]), method="linear", antialias=True)


def pure_jax_model(model: Any) -> Any:
    """A copy of ``model`` in inference mode using the pure-JAX depthwise convolution ("shift")."""
    from flax import nnx

    from crnet_jax.model import ResCRNet

    copy = ResCRNet(model.cfg.replace(depthwise_impl="shift"), rngs=nnx.Rngs(0))
    nnx.update(copy, nnx.state(model, (nnx.Param, nnx.BatchStat)))
    copy.eval()
    return copy


def inference_function(model: Any, input_shape: tuple[int, int], cfg: PreprocessConfig = PreprocessConfig(),
                       tta: bool = False) -> Callable[[jax.Array], jax.Array]:
    """The exported computation as a JAX function: films float32 (B, H, W) in [0, 1] of the fixed
    ``input_shape`` (H, W) -> probabilities float32 (B, H, W, K) in the films' geometry."""
    from flax import nnx

    if cfg.contrast == "clahe":
        raise NotImplementedError("export: CLAHE is not available inside the exported function; "
                                  "use contrast 'equalize' or 'none', or apply CLAHE before calling it")
    if model.cfg.in_channels != 1:
        raise ValueError(f"export: the model takes {model.cfg.in_channels} channels; only greyscale films are supported")
    geom = compute_geometry(input_shape, cfg.shape, cfg.resize_mode)
    top, left, ch, cw = geom.box
    h, w = cfg.shape
    graphdef, state = nnx.split(pure_jax_model(model))

    def prepare_one(film: jax.Array) -> jax.Array:
        if cfg.contrast == "equalize":
            film = equalize_hist_jax(film, cfg.hist_bins)
        else:
            film = jnp.clip(film, 0.0, 1.0)
        film = jnp.pad(film, ((top, h - top - ch), (left, w - left - cw)))
        if cfg.scaling == "zscore":
            film = (film - film.mean()) / jnp.maximum(film.std(), 1e-6)
        return film

    def infer(films: jax.Array) -> jax.Array:
        films = films.astype(jnp.float32)
        x = jax.vmap(prepare_one)(_resize(films, (ch, cw)))[..., None]
        net = nnx.merge(graphdef, state)
        p = net(x)
        if tta:
            p = 0.5 * (p + net(x[:, :, ::-1])[:, :, ::-1])
        p = p[:, top:top + ch, left:left + cw]
        return _resize(p, input_shape).astype(jnp.float32)

    return infer


def export_model(model: Any, input_shape: tuple[int, int], cfg: PreprocessConfig = PreprocessConfig(), *,
                 batch: int | None = None, platforms: Sequence[str] = ("cpu",), tta: bool = False) -> jax.export.Exported:
    """``jax.export`` the inference function; ``batch=None`` makes the batch dimension symbolic."""
    fn = jax.jit(inference_function(model, input_shape, cfg, tta))
    b = jax.export.symbolic_shape("b")[0] if batch is None else int(batch)
    spec = jax.ShapeDtypeStruct((b, *input_shape), jnp.float32)
    return jax.export.export(fn, platforms=tuple(platforms))(spec)


def describe(exported: jax.export.Exported, model: Any, cfg: PreprocessConfig, input_shape: tuple[int, int],
             tta: bool) -> dict[str, Any]:
    """The sidecar JSON: what goes in, what comes out, how it was made."""
    return {
        "format": "jax.export (StableHLO), load with jax.export.deserialize(bytearray(data))",
        "input": {"shape": ["B" if not isinstance(d, int) else d for d in exported.in_avals[0].shape],
                  "dtype": "float32", "meaning": "films, grey levels in [0, 1], bright = dense"},
        "output": {"shape": ["B" if not isinstance(d, int) else d for d in exported.out_avals[0].shape],
                   "dtype": "float32", "meaning": "softmax probabilities; channel 0 = lung; mask = argmax == 0"},
        "platforms": list(exported.platforms),
        "input_shape": list(input_shape),
        "tta": tta,
        "preprocess": dataclasses.asdict(cfg),
        "model": model.cfg.to_dict(),
    }


def save_exported(exported: jax.export.Exported, path: str | pathlib.Path, info: dict[str, Any] | None = None) -> pathlib.Path:
    """Write the serialised artifact (and ``path + '.json'`` with ``info``)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(exported.serialize())
    if info is not None:
        pathlib.Path(str(path) + ".json").write_text(json.dumps(info, indent=2))
    return path


def load_exported(path: str | pathlib.Path) -> jax.export.Exported:
    """Read an artifact written by :func:`save_exported` (plain jax.export.deserialize)."""
    path = pathlib.Path(path)
    try:
        return jax.export.deserialize(bytearray(path.read_bytes()))
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - flatbuffer errors are obscure
        raise ValueError(f"{path}: not a jax.export artifact ({type(e).__name__}: {e}); write one with python -m crnet_jax.export") from e


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m crnet_jax.export",
        description="Serialise the inference function (resize + equalisation + network + resize back) with jax.export.")
    parser.add_argument("checkpoint", help="model directory or authors' Keras .h5")
    parser.add_argument("out", help="artifact to write, e.g. jms_300x340.jaxexport (plus a .json beside it)")
    parser.add_argument("--height", type=int, help="height of the films the artifact accepts (default: the network's)")
    parser.add_argument("--width", type=int, help="width of the films the artifact accepts (default: the network's)")
    parser.add_argument("--batch", type=int, help="fix the batch size (default: symbolic, any batch)")
    parser.add_argument("--platforms", default="cpu", help="comma-separated: cpu, cuda, rocm, tpu (default cpu)")
    parser.add_argument("--tta", action="store_true", help="include flip test-time augmentation")
    parser.add_argument("--contrast", choices=("equalize", "none"), help="override the model's contrast step")
    args = parser.parse_args(argv)
    from crnet_jax.predict import CheckpointError, load_checkpoint

    try:
        model, pre, _ = load_checkpoint(args.checkpoint)
        cfg = pre or PreprocessConfig()
        if args.contrast:
            cfg = dataclasses.replace(cfg, contrast=args.contrast)
        shape = (args.height or cfg.height, args.width or cfg.width)
        platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
        exported = export_model(model, shape, cfg, batch=args.batch, platforms=platforms, tta=args.tta)
    except (CheckpointError, NotImplementedError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = save_exported(exported, args.out, describe(exported, model, cfg, shape, args.tta))
    print(f"exported {args.checkpoint}: films {exported.in_avals[0].str_short()} -> probabilities "
          f"{exported.out_avals[0].str_short()} for {', '.join(exported.platforms)} -> {path} "
          f"({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
