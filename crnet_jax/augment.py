"""On-device data augmentation in JAX: one fused affine resample per batch.

The same random affine transform (rotation, shear, shift, independent x/y zoom, flips) is
applied to an image and its lung mask with a single set of sampling coordinates:
bilinear for the image, bilinear-then-threshold (or nearest) for the mask, so they stay
aligned. Out-of-image samples use ``reflect`` padding (half-sample symmetric, i.e.
``dcba|abcd|dcba``, what Keras' ImageDataGenerator does with ``fill_mode='reflect'``),
``nearest`` or ``constant`` (image 0, mask non-lung). Optional intensity changes follow
(gamma, contrast, brightness, Gaussian noise) on the image only.

Randomness is deterministic per (seed, step, example): the key of example i of step s is
``fold_in(fold_in(PRNGKey(seed), s), example_offset + i)``. Everything is jit- and
vmap-able; the config is a frozen (hashable) dataclass passed as a static argument.

Shapes: images (B, H, W, 1) float32, masks (B, H, W, 2) float32 [lung, non-lung].
Angles in degrees, shifts as fractions of the height (rows) / width (columns).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Augmentation settings. Defaults are mild and anatomically plausible for CXRs
    (no flips: a flipped film puts the heart on the wrong side). ``AugmentConfig.authors()``
    gives the Res-CR-Net authors' ranges; ``AugmentConfig.none()`` changes nothing."""

    rotation_deg: float = 10.0     # uniform in [-r, r]
    shear_deg: float = 0.0         # uniform in [-s, s]
    shift: float = 0.05            # uniform in [-f, f] of H (rows) and of W (cols), independently
    zoom: float = 0.1              # zx, zy uniform in [1 - z, 1 + z], independently
    hflip_prob: float = 0.0
    vflip_prob: float = 0.0
    fill_mode: Literal["reflect", "nearest", "constant"] = "reflect"
    mask_interp: Literal["bilinear", "nearest"] = "bilinear"  # bilinear = bilinear then threshold 0.5
    gamma: float = 0.1             # gamma = exp(u), u uniform in [-g, g]
    contrast: float = 0.1          # x -> mean + c (x - mean), c uniform in [1 - k, 1 + k]
    brightness: float = 0.0        # x -> x + b, b uniform in [-b, b]
    noise_std: float = 0.01        # Gaussian noise, std uniform in [0, noise_std]
    clip: bool = True              # clip images to [0, 1] after intensity changes

    def __post_init__(self) -> None:
        if self.fill_mode not in ("reflect", "nearest", "constant"):
            raise ValueError(f"AugmentConfig: fill_mode must be 'reflect', 'nearest' or 'constant', got {self.fill_mode!r}")
        if self.mask_interp not in ("bilinear", "nearest"):
            raise ValueError(f"AugmentConfig: mask_interp must be 'bilinear' or 'nearest', got {self.mask_interp!r}")
        for name in ("hflip_prob", "vflip_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"AugmentConfig: {name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.zoom < 1.0:
            raise ValueError(f"AugmentConfig: zoom must be in [0, 1), got {self.zoom}")
        for name in ("rotation_deg", "shear_deg", "shift", "gamma", "contrast", "brightness", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"AugmentConfig: {name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def authors(cls) -> "AugmentConfig":
        """The authors' Keras ImageDataGenerator ranges: rotation +-90 deg, shear 15 deg,
        shift 0.1, zoom 0.1, horizontal and vertical flips, reflect fill, no intensity changes."""
        return cls(rotation_deg=90.0, shear_deg=15.0, shift=0.1, zoom=0.1, hflip_prob=0.5, vflip_prob=0.5,
                   fill_mode="reflect", gamma=0.0, contrast=0.0, brightness=0.0, noise_std=0.0)

    @classmethod
    def none(cls) -> "AugmentConfig":
        """Identity: no geometric or intensity change."""
        return cls(rotation_deg=0.0, shear_deg=0.0, shift=0.0, zoom=0.0, hflip_prob=0.0, vflip_prob=0.0,
                   gamma=0.0, contrast=0.0, brightness=0.0, noise_std=0.0)


def example_keys(seed: int | jax.Array, step: int | jax.Array, batch_size: int, example_offset: int | jax.Array = 0) -> jax.Array:
    """Keys (B,) for the examples of one step: fold_in(fold_in(PRNGKey(seed), step), offset + i)."""
    base = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    idx = jnp.arange(batch_size, dtype=jnp.uint32) + jnp.asarray(example_offset, jnp.uint32)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(idx)


def sample_params(key: jax.Array, cfg: AugmentConfig) -> dict[str, jax.Array]:
    """Random transform parameters of one example (scalars): theta and shear in radians,
    shift as fractions, zoom factors, flip flags, gamma, contrast, brightness, noise std."""
    k = jax.random.split(key, 12)

    def sym(kk: jax.Array, r: float) -> jax.Array:
        return jax.random.uniform(kk, (), jnp.float32, -1.0, 1.0) * r

    return {
        "theta": jnp.deg2rad(sym(k[0], cfg.rotation_deg)),
        "shear": jnp.deg2rad(sym(k[1], cfg.shear_deg)),
        "ty": sym(k[2], cfg.shift),
        "tx": sym(k[3], cfg.shift),
        "zy": 1.0 + sym(k[4], cfg.zoom),
        "zx": 1.0 + sym(k[5], cfg.zoom),
        "hflip": jax.random.uniform(k[6]) < cfg.hflip_prob,
        "vflip": jax.random.uniform(k[7]) < cfg.vflip_prob,
        "gamma": jnp.exp(sym(k[8], cfg.gamma)),
        "contrast": 1.0 + sym(k[9], cfg.contrast),
        "brightness": sym(k[10], cfg.brightness),
        "noise": jax.random.uniform(k[11], (), jnp.float32) * cfg.noise_std,
    }


def affine_matrix(params: dict[str, jax.Array], height: int, width: int) -> jax.Array:
    """3x3 matrix mapping OUTPUT pixel (row, col, 1) to INPUT sampling position, about the
    image centre: input = centre + shift + R(theta) S(shear) Z(zy, zx) F(flips) (output - centre)."""
    c, s = jnp.cos(params["theta"]), jnp.sin(params["theta"])
    rot = jnp.array([[c, -s], [s, c]])
    sh = jnp.array([[1.0, -jnp.sin(params["shear"])], [0.0, jnp.cos(params["shear"])]])
    zoom = jnp.diag(jnp.stack([params["zy"], params["zx"]]))
    flip = jnp.diag(jnp.stack([jnp.where(params["vflip"], -1.0, 1.0), jnp.where(params["hflip"], -1.0, 1.0)]))
    a = rot @ sh @ zoom @ flip
    centre = jnp.array([(height - 1) / 2.0, (width - 1) / 2.0])
    shift = jnp.stack([params["ty"] * height, params["tx"] * width])
    t = centre + shift - a @ centre
    return jnp.concatenate([jnp.concatenate([a, t[:, None]], axis=1), jnp.array([[0.0, 0.0, 1.0]])], axis=0)


def _fold(idx: jax.Array, n: int, mode: str) -> tuple[jax.Array, jax.Array]:
    """Integer sample positions -> valid in-range indices and a validity weight."""
    if mode == "reflect":  # half-sample symmetric: ... b a | a b ... y z | z y ...
        m = jnp.mod(idx, 2 * n)
        return jnp.where(m < n, m, 2 * n - 1 - m), jnp.ones(idx.shape, jnp.float32)
    valid = ((idx >= 0) & (idx < n)).astype(jnp.float32)
    clipped = jnp.clip(idx, 0, n - 1)
    return clipped, (valid if mode == "constant" else jnp.ones(idx.shape, jnp.float32))


def warp(image: jax.Array, mask: jax.Array, matrix: jax.Array, fill_mode: str = "reflect",
         mask_interp: str = "bilinear") -> tuple[jax.Array, jax.Array]:
    """Resample one (image (H, W, C), mask (H, W, 2)) pair with a 3x3 output->input matrix.

    Image and lung channel go through one shared bilinear gather; the mask is then
    thresholded at 0.5 (or sampled nearest) and returned as [lung, 1 - lung].
    """
    h, w = image.shape[0], image.shape[1]
    rr, cc = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    r_in = matrix[0, 0] * rr + matrix[0, 1] * cc + matrix[0, 2]
    c_in = matrix[1, 0] * rr + matrix[1, 1] * cc + matrix[1, 2]
    stack = jnp.concatenate([image, mask[..., :1]], axis=-1)  # (H, W, C + 1)
    r0f, c0f = jnp.floor(r_in), jnp.floor(c_in)
    fr, fc = (r_in - r0f)[..., None], (c_in - c0f)[..., None]
    r0, c0 = r0f.astype(jnp.int32), c0f.astype(jnp.int32)
    ra, va_r = _fold(r0, h, fill_mode)
    rb, vb_r = _fold(r0 + 1, h, fill_mode)
    ca, va_c = _fold(c0, w, fill_mode)
    cb, vb_c = _fold(c0 + 1, w, fill_mode)
    out = (stack[ra, ca] * ((1 - fr) * (1 - fc) * (va_r * va_c)[..., None])
           + stack[ra, cb] * ((1 - fr) * fc * (va_r * vb_c)[..., None])
           + stack[rb, ca] * (fr * (1 - fc) * (vb_r * va_c)[..., None])
           + stack[rb, cb] * (fr * fc * (vb_r * vb_c)[..., None]))
    img = out[..., :-1]
    if mask_interp == "nearest":
        rn, vn_r = _fold(jnp.round(r_in).astype(jnp.int32), h, fill_mode)
        cn, vn_c = _fold(jnp.round(c_in).astype(jnp.int32), w, fill_mode)
        lung = (mask[rn, cn, 0] * vn_r * vn_c > 0.5).astype(mask.dtype)
    else:
        lung = (out[..., -1] > 0.5).astype(mask.dtype)
    return img.astype(image.dtype), jnp.stack([lung, 1.0 - lung], axis=-1)


def adjust_intensity(key: jax.Array, image: jax.Array, params: dict[str, jax.Array], clip: bool = True) -> jax.Array:
    """Gamma, contrast about the mean, brightness and Gaussian noise on one image (H, W, C)."""
    x = jnp.clip(image, 0.0, 1.0) ** params["gamma"] if clip else image
    mean = jnp.mean(x)
    x = mean + params["contrast"] * (x - mean) + params["brightness"]
    x = x + params["noise"] * jax.random.normal(key, x.shape, x.dtype)
    return jnp.clip(x, 0.0, 1.0) if clip else x


def augment_example(key: jax.Array, image: jax.Array, mask: jax.Array, cfg: AugmentConfig) -> tuple[jax.Array, jax.Array]:
    """Augment one pair: image (H, W, C) float, mask (H, W, 2) -> same shapes."""
    params = sample_params(key, cfg)
    matrix = affine_matrix(params, image.shape[0], image.shape[1])
    img, msk = warp(image, mask, matrix, cfg.fill_mode, cfg.mask_interp)
    if cfg.gamma or cfg.contrast or cfg.brightness or cfg.noise_std:
        img = adjust_intensity(jax.random.fold_in(key, 1), img, params, cfg.clip)
    return img, msk


@functools.partial(jax.jit, static_argnames=("cfg",))
def augment_batch(image: jax.Array, mask: jax.Array, seed: int | jax.Array, step: int | jax.Array,
                  cfg: AugmentConfig = AugmentConfig(), example_offset: int | jax.Array = 0) -> tuple[jax.Array, jax.Array]:
    """Augment a batch on device: image (B, H, W, 1), mask (B, H, W, 2) -> same shapes.

    Deterministic per (seed, step, example_offset + i). Pass a different example_offset
    per JAX process (e.g. process_index * local_batch) so hosts do not repeat each other.
    """
    if image.ndim != 4 or mask.ndim != 4 or mask.shape[-1] != 2 or image.shape[:3] != mask.shape[:3]:
        raise ValueError(f"augment_batch expects image (B, H, W, C) and mask (B, H, W, 2) of the same B, H, W; "
                         f"got {image.shape} and {mask.shape}")
    keys = example_keys(seed, step, image.shape[0], example_offset)
    return jax.vmap(lambda k, x, m: augment_example(k, x, m, cfg))(keys, image, mask)
