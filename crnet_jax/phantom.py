"""Procedural chest X-ray phantoms with exact lung masks (synthetic data, NumPy only).

Every phantom is SYNTHETIC: ids start with ``synthetic_`` and the source is
``synthetic-phantom``. They exist so that the package trains, tests and demonstrates
end to end without any real (licensed) data; they are no substitute for real films.

A phantom is drawn in normalised coordinates (u = x / W, v = y / H, origin top left,
y down, the patient's right on the image left as in a PA film) and rasterised at any
H x W. It has: a body outline with shoulders, two lung fields built from jittered
control points (apex, lateral wall, sharp costophrenic angle, diaphragm dome, medial
border) with the heart and aortic knob cut out of them, a heart shadow, mediastinum,
spine with vertebrae, trachea, posterior and anterior ribs, clavicles, optional breast
shadows and gastric bubble, vessel texture that thins towards the periphery, exposure
variation, quantum noise and a little blur. Intensities are in [0, 1], bright = dense
(bone), dark = air, like a displayed radiograph.

The lung mask is exact: it is the rasterised lung polygon (pixel centre inside) minus
the heart and aortic knob, i.e. the dark lung field that the image shows (SCR/JSRT
convention: heart excluded).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

SOURCE = "synthetic-phantom"
ID_PREFIX = "synthetic_"

# Right lung (image left) control points in clockwise order: (dx, t), with dx the
# horizontal offset from the midline in units of the thorax half width (negative =
# image left) and t the vertical position from apex (0) to diaphragm dome (1).
_RIGHT_LUNG = np.array(
    [
        (-0.40, 0.00),   # apex
        (-0.60, 0.05),
        (-0.80, 0.24),   # lateral wall, upper
        (-0.92, 0.50),
        (-0.965, 0.78),
        (-0.985, 1.07),  # costophrenic angle (below the dome)
        (-0.80, 1.01),
        (-0.55, 0.955),  # diaphragm dome
        (-0.28, 0.985),
        (-0.14, 1.02),   # cardiophrenic angle
        (-0.14, 0.66),   # medial border
        (-0.15, 0.30),
        (-0.22, 0.04),
    ],
    dtype=np.float64,
)


@dataclasses.dataclass(frozen=True)
class PhantomSpec:
    """Random anatomy of one phantom (normalised units); drawn by :func:`sample_spec`."""

    cx: float            # midline u
    half_width: float    # thorax half width (lateral lung walls), in u
    apex_v: float        # lung apex v
    dome_v: float        # right hemidiaphragm dome v
    left_drop: float     # left dome lower by this much (v)
    lung_pts_r: np.ndarray  # (13, 2) jittered (dx, t) for the right lung
    lung_pts_l: np.ndarray  # (13, 2) jittered (dx, t) for the left lung (dx > 0)
    heart: tuple[float, float, float, float, float]  # cu, cv, ru, rv, angle
    knob: tuple[float, float, float]                 # cu, cv, r
    rib_v0: float        # first posterior rib v at the spine
    rib_gap: float       # posterior rib spacing (v)
    rib_thick: float
    rib_slope: float     # how far ribs drop from spine to lateral wall (v)
    breast: float        # breast shadow strength (0 = none)
    bubble: float        # gastric bubble size (0 = none)
    lung_dark: float     # how much darker the lungs are than soft tissue
    gamma: float
    noise: float
    tissue: float        # soft tissue base brightness


def sample_spec(rng: np.random.Generator) -> PhantomSpec:
    """Draw a random anatomy. Ranges keep every phantom a plausible adult PA film."""
    u = rng.uniform
    cx = 0.5 + rng.normal(0.0, 0.012)
    half_width = u(0.33, 0.39)
    apex_v = u(0.10, 0.17)
    dome_v = u(0.66, 0.77)
    jit = 0.018
    pr = _RIGHT_LUNG + rng.normal(0.0, jit, _RIGHT_LUNG.shape)
    pl = _RIGHT_LUNG * np.array([-1.0, 1.0]) + rng.normal(0.0, jit, _RIGHT_LUNG.shape)
    # Keep a mediastinum between the lungs (medial points: cardiophrenic angle to apex).
    pr[9:, 0] = np.minimum(pr[9:, 0], -0.12)
    pl[9:, 0] = np.maximum(pl[9:, 0], 0.12)
    # Keep the costophrenic angles sharp and below the domes.
    pr[5, 1] = max(pr[5, 1], pr[7, 1] + 0.08)
    pl[5, 1] = max(pl[5, 1], pl[7, 1] + 0.08)
    ctr = u(0.40, 0.52)  # cardiothoracic ratio
    ru = ctr * half_width
    rv = u(0.10, 0.135)
    heart = (cx + u(0.25, 0.45) * ru, dome_v + 0.05 - 0.75 * rv, ru, rv, u(0.20, 0.45))
    knob = (cx + u(0.05, 0.08), apex_v + u(0.14, 0.19), u(0.025, 0.04))
    return PhantomSpec(
        cx=cx,
        half_width=half_width,
        apex_v=apex_v,
        dome_v=dome_v,
        left_drop=u(0.0, 0.04),
        lung_pts_r=pr,
        lung_pts_l=pl,
        heart=heart,
        knob=knob,
        rib_v0=apex_v - u(0.01, 0.03),
        rib_gap=(dome_v - apex_v) * u(0.15, 0.17),
        rib_thick=u(0.016, 0.024),
        rib_slope=u(0.10, 0.16),
        breast=u(0.03, 0.08) if rng.random() < 0.4 else 0.0,
        bubble=u(0.025, 0.05) if rng.random() < 0.6 else 0.0,
        lung_dark=u(0.30, 0.42),
        gamma=np.exp(rng.normal(0.0, 0.15)),
        noise=u(0.008, 0.025),
        tissue=u(0.50, 0.62),
    )


def _catmull_rom_closed(points: np.ndarray, samples: int = 16) -> np.ndarray:
    """Closed uniform Catmull-Rom curve through (N, 2) points -> (N * samples, 2) points."""
    p0 = np.roll(points, 1, axis=0)
    p1 = points
    p2 = np.roll(points, -1, axis=0)
    p3 = np.roll(points, -2, axis=0)
    t = np.linspace(0.0, 1.0, samples, endpoint=False)[None, :, None]
    a, b, c, d = (x[:, None, :] for x in (p0, p1, p2, p3))
    curve = 0.5 * (
        2 * b
        + (-a + c) * t
        + (2 * a - 5 * b + 4 * c - d) * t**2
        + (-a + 3 * b - 3 * c + d) * t**3
    )
    return curve.reshape(-1, 2)


def fill_polygon(xy: np.ndarray, height: int, width: int) -> np.ndarray:
    """Rasterise a closed polygon given in pixel coordinates (x, y) -> bool (H, W).

    A pixel is inside when its centre (j, i) is inside (even-odd rule); exact, no
    anti-aliasing. Vectorised scanline fill: O(H * vertices).
    """
    x0, y0 = xy[:, 0], xy[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    rows = np.arange(height, dtype=np.float64)[:, None]  # (H, 1)
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    crosses = (rows >= lo) & (rows < hi)  # (H, E), half-open so vertices count once
    dy = np.where(y1 == y0, 1.0, y1 - y0)
    xs = x0 + (rows - y0) * (x1 - x0) / dy  # (H, E)
    r_idx, e_idx = np.nonzero(crosses)
    # Pixel j is right of the crossing when j > x: toggle starts at floor(x) + 1.
    start = np.clip(np.floor(xs[r_idx, e_idx]).astype(np.int64) + 1, 0, width)
    toggles = np.zeros((height, width + 1), dtype=np.int32)
    np.add.at(toggles, (r_idx, start), 1)
    return (np.cumsum(toggles[:, :width], axis=1) & 1).astype(bool)


def _gauss_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3.0 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D float array with reflect borders; sigma in pixels."""
    if sigma <= 0:
        return img
    k = _gauss_kernel(sigma)
    r = len(k) // 2
    out = img.astype(np.float32, copy=False)
    for axis in (0, 1):
        r_ax = min(r, out.shape[axis] - 1)
        kk = k if r_ax == r else _gauss_kernel(max(r_ax / 3.0, 1e-3))
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r_ax, r_ax)
        padded = np.pad(out, pad, mode="reflect")
        win = np.lib.stride_tricks.sliding_window_view(padded, len(kk), axis=axis)
        out = win @ kk
    return out


def _smooth_noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """Unit-variance smooth Gaussian random field, correlation length ~sigma pixels."""
    # Draw at a coarser grid and upsample bilinearly: much cheaper for large sigma.
    step = max(1, int(sigma // 2))
    gh, gw = h // step + 3, w // step + 3
    coarse = gaussian_blur(rng.standard_normal((gh, gw)).astype(np.float32), sigma / step)
    yi = np.arange(h) / step + 1.0
    xi = np.arange(w) / step + 1.0
    y0 = np.floor(yi).astype(int)
    x0 = np.floor(xi).astype(int)
    fy = (yi - y0)[:, None].astype(np.float32)
    fx = (xi - x0)[None, :].astype(np.float32)
    c00 = coarse[y0][:, x0]
    c01 = coarse[y0][:, x0 + 1]
    c10 = coarse[y0 + 1][:, x0]
    c11 = coarse[y0 + 1][:, x0 + 1]
    f = (c00 * (1 - fx) + c01 * fx) * (1 - fy) + (c10 * (1 - fx) + c11 * fx) * fy
    return (f - f.mean()) / (f.std() + 1e-6)


def _lung_outline(spec: PhantomSpec, pts: np.ndarray, dome_v: float) -> np.ndarray:
    """Control points (dx, t) -> smooth closed outline in normalised (u, v)."""
    u = spec.cx + pts[:, 0] * spec.half_width
    v = spec.apex_v + pts[:, 1] * (dome_v - spec.apex_v)
    return _catmull_rom_closed(np.stack([u, v], axis=1), samples=12)


def _ramp(x: np.ndarray, width: float) -> np.ndarray:
    """Soft 0 -> 1 step centred at x = 0 over the given width (cheap clipped ramp)."""
    return np.clip(x * (1.0 / max(width, 1e-6)) + 0.5, 0.0, 1.0)


def _splat_bands(img: np.ndarray, v_curves: np.ndarray, cols: np.ndarray, thick: float, amp: np.ndarray) -> None:
    """Draw K bright bands (ribs, clavicles) into img in place, keeping the max.

    v_curves: (K, C) band centre (normalised v) at columns ``cols`` (C,); thick: half
    thickness (normalised v); amp: (K, C) peak value. The band profile is a rounded
    bone with a brighter cortex. Costs O(K * C * thickness) instead of O(K * H * W).
    """
    h = img.shape[0]
    r = int(np.ceil(thick * h)) + 1
    offs = np.arange(-r, r + 1)[:, None]
    for k in range(v_curves.shape[0]):
        centre = v_curves[k] * h - 0.5  # row coordinate of the band centre
        rows = np.floor(centre).astype(np.int64)[None, :] + offs  # (2r+1, C)
        dist = np.abs(rows - centre[None, :]) / (thick * h)
        prof = np.clip(1.0 - dist**2, 0.0, 1.0) * (0.6 + 0.4 * np.clip(1.6 * dist, 0.0, 1.0))
        val = (amp[k][None, :] * prof).astype(np.float32)
        ok = (rows >= 0) & (rows < h) & (val > 0)
        rr, cc = rows[ok], np.broadcast_to(cols[None, :], rows.shape)[ok]
        img[rr, cc] = np.maximum(img[rr, cc], val[ok])


def _vessel_density(rng: np.random.Generator, hila: list[tuple[float, float, int]], h: int, w: int) -> np.ndarray:
    """Branching vessel trees grown from the hila, splatted as points -> density (H, W).

    Three generations (trunks, branches, twigs), each a batch of random walks whose
    direction diffuses slowly; vectorised per generation. Weights taper along each
    vessel and per generation, so vessels thin towards the lung periphery.
    """
    step = 0.5 / max(h, w)  # half a pixel per step: continuous lines
    trunk = np.array([-95.0, -122.0, -148.0, 178.0, 152.0, 125.0, 102.0])
    u0, v0, ang0 = [], [], []
    for hu, hv, side in hila:
        a = trunk if side < 0 else 180.0 - trunk
        ang0.append(np.deg2rad(a + rng.normal(0.0, 7.0, a.shape)))
        u0.append(np.full(a.shape, hu) + rng.normal(0.0, 0.01, a.shape))
        v0.append(np.full(a.shape, hv) + rng.normal(0.0, 0.015, a.shape))
    u0, v0, ang0 = np.concatenate(u0), np.concatenate(v0), np.concatenate(ang0)
    us, vs, ws = [], [], []
    weight = 1.0
    for length in (rng.uniform(0.13, 0.18), rng.uniform(0.08, 0.11), rng.uniform(0.05, 0.07)):
        n = max(2, int(length / step))
        b = len(u0)
        angs = ang0[:, None] + np.cumsum(rng.normal(0.0, 0.35 * np.sqrt(step / 0.1), (b, n)), axis=1)
        pu = u0[:, None] + np.cumsum(step * np.cos(angs), axis=1)
        pv = v0[:, None] + np.cumsum(step * np.sin(angs), axis=1)
        us.append(pu.ravel()), vs.append(pv.ravel())
        ws.append(np.broadcast_to(weight * np.linspace(1.0, 0.5, n), (b, n)).ravel())
        # Two children per vessel, branching off somewhere in its outer two thirds.
        idx = rng.integers(n // 3, n, (b, 2))
        rows = np.repeat(np.arange(b), 2)
        u0, v0 = pu[rows, idx.ravel()], pv[rows, idx.ravel()]
        turn = rng.choice([-1.0, 1.0], 2 * b) * rng.uniform(0.3, 0.7, 2 * b)
        ang0 = angs[rows, idx.ravel()] + turn
        weight *= 0.6
    pu, pv, wt = np.concatenate(us), np.concatenate(vs), np.concatenate(ws)
    cols = np.floor(pu * w).astype(np.int64)
    rows = np.floor(pv * h).astype(np.int64)
    ok = (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)
    dens = np.zeros((h, w), np.float32)
    np.add.at(dens, (rows[ok], cols[ok]), wt[ok].astype(np.float32))
    return dens


def render_phantom(spec: PhantomSpec, rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise a phantom at H x W. Returns (image float32 (H, W) in [0, 1], mask uint8 (H, W) in {0, 1})."""
    h, w = height, width
    px = 1.0 / min(h, w)  # one pixel in normalised units (approx.)
    f32 = np.float32
    v = ((np.arange(h, dtype=f32) + 0.5) / h)[:, None]  # (H, 1)
    u = ((np.arange(w, dtype=f32) + 0.5) / w)[None, :]  # (1, W)
    du = u - f32(spec.cx)
    adu = np.abs(du)

    # --- lungs (exact masks) -------------------------------------------------------
    dome_l = spec.dome_v + spec.left_drop
    scale_xy = np.array([w, h])
    lung_r = fill_polygon(_lung_outline(spec, spec.lung_pts_r, spec.dome_v) * scale_xy - 0.5, h, w)
    lung_l = fill_polygon(_lung_outline(spec, spec.lung_pts_l, dome_l) * scale_xy - 0.5, h, w)
    hcu, hcv, hru, hrv, hang = spec.heart
    ca, sa = np.cos(hang), np.sin(hang)
    hx, hy = u - f32(hcu), v - f32(hcv)
    heart_r = np.sqrt(((ca * hx + sa * hy) / hru) ** 2 + ((-sa * hx + ca * hy) / hrv) ** 2)
    kcu, kcv, kr = spec.knob
    knob_r = np.sqrt((u - f32(kcu)) ** 2 + (v - f32(kcv)) ** 2) / f32(kr)
    lungs = (lung_r | lung_l) & (heart_r > 1.0) & (knob_r > 1.0)

    # --- body and central densities -------------------------------------------------
    shoulder_v = spec.apex_v - 0.03
    body_hw = f32(0.10) + f32(spec.half_width + 0.11 - 0.10) * _ramp(v - f32(shoulder_v), 0.09)
    body = _ramp(body_hw - adu, 3.0 * px + 0.01)
    thickness = np.clip(1.0 - (du / (body_hw + f32(1e-3))) ** 2, 0.0, 1.0)
    img = f32(0.03) + body * (f32(spec.tissue - 0.03) + f32(0.10) * thickness)
    # Mediastinum, heart, aortic knob and abdomen share one density (they silhouette).
    med_hw = f32(0.06) + f32(0.03) * np.clip(v - f32(spec.apex_v), 0.0, 1.0)
    central = _ramp(med_hw - adu, 0.015) * _ramp(v - f32(spec.apex_v - 0.06), 0.04)
    central = np.maximum(central, _ramp(1.0 - heart_r, 0.08))
    central = np.maximum(central, _ramp(1.0 - knob_r, 0.2))
    central = np.maximum(central, _ramp(v - f32(spec.dome_v + 0.01), 0.05))
    img += f32(0.16) * body * central

    # --- lung fields ---------------------------------------------------------------
    lung_f = gaussian_blur(lungs.astype(f32), max(0.6, 0.004 * min(h, w)))
    hilum_v = spec.apex_v + 0.42 * (spec.dome_v - spec.apex_v)
    # Lower zones overlap more soft tissue (diaphragm recesses, breasts): less dark.
    depth = f32(1.0) - f32(0.2) * np.clip((v - f32(hilum_v)) / f32(spec.dome_v - hilum_v + 1e-3), 0.0, 1.0)
    mottle = _smooth_noise(rng, h, w, 0.02 / px)
    img -= lung_f * (f32(spec.lung_dark) * depth - f32(0.02) * mottle)
    hila = [(spec.cx - 0.10, hilum_v, -1), (spec.cx + 0.10, hilum_v + 0.01, 1)]
    vessels = gaussian_blur(_vessel_density(rng, hila, h, w), max(0.6, 0.0035 * min(h, w)))
    vessels = np.clip(vessels * f32(0.5 * max(h, w) * px * 2.0), 0.0, 1.0)
    d_hilum = np.sqrt((adu - f32(0.10)) ** 2 + (v - f32(hilum_v)) ** 2)
    img += lung_f * (f32(0.13) * vessels + f32(0.07) * np.exp(-d_hilum / f32(0.05)))

    # --- bones ---------------------------------------------------------------------
    disc = f32(0.5) + f32(0.5) * np.cos(f32(2 * np.pi) * (v - f32(spec.apex_v)) / f32(spec.rib_gap * 0.95))
    img += (_ramp(f32(0.036) - adu, 0.008) * (f32(0.03) + f32(0.03) * disc) * _ramp(v - f32(0.02), 0.02))
    carina_v = spec.apex_v + 0.17
    img -= f32(0.12) * _ramp(f32(0.013) - adu, 0.006) * (_ramp(f32(carina_v) - v, 0.02) * _ramp(v - f32(0.01), 0.02))

    bones = np.zeros((h, w), f32)
    cols = np.arange(w)
    uc = (cols + 0.5) / w
    d = np.abs(uc - spec.cx) / spec.half_width  # 0 midline .. 1 lateral lung wall
    # Posterior ribs: from the spine out and slightly up, then curving down laterally.
    k = np.arange(10)[:, None]
    v_post = (spec.rib_v0 + k * spec.rib_gap + spec.rib_slope * (d**2 - 0.25 * d)
              + 0.4 * np.maximum(d - 0.85, 0.0) ** 2 + 0.03 * (k / 9.0) * d)
    reach = _ramp(d - 0.12, 0.06) * _ramp(1.12 - d, 0.08)
    _splat_bands(bones, v_post, cols, spec.rib_thick, np.broadcast_to(reach, v_post.shape))
    # Anterior ribs: fainter, sloping down towards the sternum.
    ka = np.arange(6)[:, None]
    v_ant = spec.rib_v0 + 0.08 + ka * spec.rib_gap * 1.2 + 0.18 * (1.0 - d)
    reach_a = 0.45 * _ramp(d - 0.35, 0.1) * _ramp(1.02 - d, 0.08)
    _splat_bands(bones, v_ant, cols, spec.rib_thick * 1.15, np.broadcast_to(reach_a, v_ant.shape))
    # Clavicles: from the sternal end up and out to the shoulder, gentle S-curve.
    cd = np.clip((np.abs(uc - spec.cx) - 0.04) / 0.30, 0.0, 1.2)
    v_clav = (spec.apex_v + 0.05 - 0.075 * cd + 0.015 * np.sin(np.pi * cd))[None, :]
    amp_c = (1.6 * _ramp(np.abs(uc - spec.cx) - 0.045, 0.02) * _ramp(0.37 - np.abs(uc - spec.cx), 0.04))[None, :]
    # Bone contrast is high against lung air, low against soft tissue.
    img += bones * body * (f32(0.03) + f32(0.08) * lung_f)
    clav = np.zeros((h, w), f32)
    _splat_bands(clav, v_clav, cols, 0.016, amp_c)
    img += f32(0.08) * clav

    # --- extras --------------------------------------------------------------------
    if spec.breast > 0:
        bd = ((adu - f32(0.55 * spec.half_width)) / f32(0.17)) ** 2 + ((v - f32(spec.dome_v - 0.03)) / f32(0.10)) ** 2
        img += f32(spec.breast) * body * np.exp(-bd)
    if spec.bubble > 0:
        bu = ((du - f32(0.17)) / f32(1.4 * spec.bubble)) ** 2 + ((v - f32(dome_l + 0.055)) / f32(spec.bubble)) ** 2
        img -= f32(0.14) * _ramp(1.0 - bu, 0.4)

    # --- exposure, blur, noise -----------------------------------------------------
    img = np.clip(img, 0.0, 1.0) ** f32(spec.gamma)
    img = gaussian_blur(img, max(0.5, 0.002 * min(h, w)))
    grain = rng.random((h, w), dtype=f32) - f32(0.5)
    img = img + f32(spec.noise * 3.46) * grain * np.sqrt(img + f32(0.05))
    return np.clip(img, 0.0, 1.0).astype(f32), lungs.astype(np.uint8)


def make_phantom(seed: int, height: int = 256, width: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic CXR phantom, deterministic per seed.

    Args:
      seed: any non-negative int; the same seed always gives the same phantom.
      height, width: output size in pixels (>= 16).

    Returns:
      image: float32 (height, width) in [0, 1] (bright = dense).
      mask: uint8 (height, width), 1 = lung (heart excluded), 0 = elsewhere.
    """
    if height < 16 or width < 16:
        raise ValueError(f"phantom size must be at least 16 x 16, got {height} x {width}")
    if seed < 0:
        raise ValueError(f"phantom seed must be >= 0, got {seed}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    spec = sample_spec(rng)
    return render_phantom(spec, rng, height, width)


def phantom_id(seed: int) -> str:
    """The id of phantom ``seed``: ``synthetic_phantom_<seed:06d>``."""
    return f"{ID_PREFIX}phantom_{seed:06d}"


def phantom_record(seed: int, height: int = 256, width: int = 256) -> dict[str, Any]:
    """A phantom as a dataset record, in the same layout as the TFDS builders' examples.

    Returns a dict: image uint16 (H, W, 1) (0..65535), mask uint8 (H, W, 1) (0 or 255),
    id (str), patient_id (str), source ``"synthetic-phantom"``, finding ``"normal"``,
    finding_detail ``"synthetic"``, pixel_spacing float32 (2,) = NaN (unknown),
    original_shape int32 (2,).
    """
    image, mask = make_phantom(seed, height, width)
    pid = phantom_id(seed)
    return {
        "image": np.round(image * 65535.0).astype(np.uint16)[..., None],
        "mask": (mask * 255).astype(np.uint8)[..., None],
        "id": pid,
        "patient_id": pid,
        "source": SOURCE,
        "finding": "normal",
        "finding_detail": "synthetic",
        "pixel_spacing": np.full((2,), np.nan, np.float32),
        "original_shape": np.array([height, width], np.int32),
    }


class PhantomSource:
    """Random-access data source of N phantoms (grain ``RandomAccessDataSource`` protocol).

    Phantoms are generated on demand (a few ms each), so the set costs no memory.
    Record ``i`` is phantom ``seed_offset + i``; see :func:`phantom_record` for the layout.
    """

    def __init__(self, num_examples: int, height: int = 256, width: int = 256, seed_offset: int = 0):
        if num_examples < 1:
            raise ValueError(f"PhantomSource needs num_examples >= 1, got {num_examples}")
        self.num_examples = int(num_examples)
        self.height = int(height)
        self.width = int(width)
        self.seed_offset = int(seed_offset)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"phantom index {index} out of range [0, {self.num_examples})")
        return phantom_record(self.seed_offset + index, self.height, self.width)

    def __repr__(self) -> str:
        return (f"PhantomSource(num_examples={self.num_examples}, height={self.height}, "
                f"width={self.width}, seed_offset={self.seed_offset})")


def make_phantom_dataset(num_examples: int, height: int = 256, width: int = 256, seed: int = 0) -> dict[str, np.ndarray]:
    """N phantoms in memory.

    Returns a dict: image float32 (N, H, W) in [0, 1], mask uint8 (N, H, W) in {0, 1},
    id (N,) str (``synthetic_phantom_<seed>``), source (N,) str ``synthetic-phantom``.
    Phantom i uses seed ``seed + i``.
    """
    if num_examples < 1:
        raise ValueError(f"make_phantom_dataset needs num_examples >= 1, got {num_examples}")
    images = np.empty((num_examples, height, width), np.float32)
    masks = np.empty((num_examples, height, width), np.uint8)
    for i in range(num_examples):
        images[i], masks[i] = make_phantom(seed + i, height, width)
    ids = np.array([phantom_id(seed + i) for i in range(num_examples)])
    return {"image": images, "mask": masks, "id": ids, "source": np.array([SOURCE] * num_examples)}


def save_phantom_grid(path: str, seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5), height: int = 256, width: int = 256) -> None:
    """Write a PNG grid of phantoms with their lung-mask outlines in red (for eyeballing)."""
    from PIL import Image  # local: only this helper needs it

    tiles = []
    for s in seeds:
        img, mask = make_phantom(s, height, width)
        rgb = np.repeat((img * 255).astype(np.uint8)[..., None], 3, axis=-1)
        m = mask.astype(bool)
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        rgb[edge] = (255, 40, 40)
        tiles.append(np.concatenate([np.repeat((img * 255).astype(np.uint8)[..., None], 3, -1), rgb], axis=1))
    cols = 2
    rows = [np.concatenate(tiles[i:i + cols], axis=1) for i in range(0, len(tiles), cols)]
    if rows and rows[-1].shape != rows[0].shape:
        pad = np.zeros_like(rows[0])
        pad[:, : rows[-1].shape[1]] = rows[-1]
        rows[-1] = pad
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
