"""Rendering of the synthetic benchmark: shapes rasterised, textured and painted, background and cue.

Images here are channel-first float (3, H, W) in [0, 255] before the final rounding; a :class:`Shape` is a
boolean region on its bounding box with the parameters it was drawn with.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import math

import numpy as np

from apjax.data.synthetic_shapes import (
    CLASS_HUE,
    CLASS_TEXTURE,
    CUE_AMPLITUDE,
    CUE_TINT,
    FAMILIES,
    TEXTURE_KINDS,
    Inside,
    context_cue_params,
    frac,
    parity,
)

# ----------------------------------------------------------------------------------------
# Rasterisation and painting
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Shape:
    """A rasterised shape: ``region`` bool (y1 - y0, x1 - x0) on its bounding box ``[y0, y1) x [x0, x1)``,
    the unit-frame coordinates ``u``, ``v`` float32 of the same shape there, and the parameters it was
    drawn with."""

    class_id: int  # 0 for distractors
    y0: int
    y1: int
    x0: int
    x1: int
    region: np.ndarray  # bool (y1 - y0, x1 - x0)
    u: np.ndarray
    v: np.ndarray
    params: dict


def _rasterise(size: int, cy, cx, hx, hy, rot, inside: Inside, class_id: int, params: dict):
    """Boolean region of a shape on its bounding box, or None if it misses the image."""
    c, s = math.cos(rot), math.sin(rot)
    ex = abs(c) * hx + abs(s) * hy  # half-extent along image x of the rotated unit box
    ey = abs(s) * hx + abs(c) * hy
    # pixel j is covered when its centre j + 0.5 lies in [cx - ex, cx + ex]
    x0 = max(math.ceil(cx - ex - 0.5), 0)
    x1 = min(math.floor(cx + ex - 0.5) + 1, size)
    y0 = max(math.ceil(cy - ey - 0.5), 0)
    y1 = min(math.floor(cy + ey - 0.5) + 1, size)
    if x0 >= x1 or y0 >= y1:
        return None
    dx = (np.arange(x0, x1, dtype=np.float32) + np.float32(0.5 - cx))[None, :]
    dy = (np.arange(y0, y1, dtype=np.float32) + np.float32(0.5 - cy))[:, None]
    u = dx * (c / hx) + dy * (s / hx)
    v = dy * (c / hy) - dx * (s / hy)
    region = inside(u, v)
    if not region.any():
        return None
    return Shape(class_id, y0, y1, x0, x1, region, u, v, params)


def _texture(kind: str, freq: float, angle: float, u, v, rng) -> np.ndarray:
    """Texture value in [0, 1] on the shape's bounding box, in the shape's own frame."""
    two_pi = 2.0 * math.pi
    if kind == "stripes":
        t = 0.5 + 0.5 * np.sin((u * math.cos(angle) + v * math.sin(angle)) * (two_pi * freq))
    elif kind == "checks":
        t = parity(u * freq, v * freq)
    elif kind == "dots":
        fu = frac(u * freq) - 0.5
        fv = frac(v * freq) - 0.5
        t = (fu * fu + fv * fv <= 0.09).astype(np.float32)
    elif kind == "radial":
        t = np.minimum(np.hypot(u, v), 1.0)
    elif kind == "linear":
        t = np.clip(0.5 + 0.5 * (u * math.cos(angle) + v * math.sin(angle)), 0.0, 1.0)
    elif kind == "noise":
        t = rng.random(u.shape, dtype=np.float32)
    elif kind == "rings":
        t = 0.5 + 0.5 * np.cos(np.hypot(u, v) * (two_pi * freq))
    else:  # plaid
        t = 0.5 + 0.5 * np.sin(u * (two_pi * freq)) * np.sin(v * (two_pi * freq))
    return t


def _hsv255(h: float, s: float, v: float) -> np.ndarray:
    return (
        np.asarray(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)), np.float32)
        * 255.0
    )


def paint(image: np.ndarray, shape: Shape, rng) -> None:
    """Paint a shape's textured colour into a channel-first float image (3, H, W)."""
    p = shape.params
    region = shape.region
    t = _texture(p["texture"], p["freq"], p["angle"], shape.u[region], shape.v[region], rng)
    c1 = p["colour"]
    dc = p["colour2"] - c1
    t *= np.float32(p["depth"])
    pix = c1[:, None] + dc[:, None] * t[None, :]
    image[:, shape.y0 : shape.y1, shape.x0 : shape.x1][:, region] = pix


def sample_object(rng, class_id: int, size: int) -> Shape | None:
    i = class_id - 1
    r = rng.random(8).tolist()  # one call: per-call overhead dominates at small sizes
    half = max((0.12 + 0.16 * r[0]) * size, 4.0)
    sqrt_aspect = math.exp(0.5 * math.log(0.75) + r[1] * 0.5 * math.log(16.0 / 9.0))
    hx, hy = half * sqrt_aspect, half / sqrt_aspect
    rot = 2.0 * math.pi * r[2]
    cy, cx = (0.1 + 0.8 * r[3]) * size, (0.1 + 0.8 * r[4]) * size
    hue = CLASS_HUE[i] + 0.1 * rng.standard_normal()
    sat = 0.4 + 0.6 * r[5]
    val = 0.5 + 0.5 * r[6]
    kind, freq, angle, (dh, dv) = CLASS_TEXTURE[i]
    params = {
        "texture": kind,
        "freq": freq,
        "angle": angle,
        "colour": _hsv255(hue, sat, val),
        "colour2": _hsv255(hue + dh, sat, val * dv),
        "depth": 0.5 + 0.4 * r[7],
        "hue": hue % 1.0,
        "center": (cy, cx),
        "half_axes": (hx, hy),
        "rotation": rot,
    }
    return _rasterise(size, cy, cx, hx, hy, rot, FAMILIES[i][1], class_id, params)


def _distractor_inside(rng) -> tuple[str, Inside]:
    kind = int(rng.integers(4))
    if kind == 0:  # Fourier blob: r(phi) = 0.65 (1 + sum_k a_k cos(k phi + p_k))
        amps = rng.uniform(-0.18, 0.18, 3)
        phases = rng.uniform(0.0, 2.0 * math.pi, 3)

        def inside(u, v):
            phi = np.arctan2(v, u)
            r = 1.0 + sum(a * np.cos(k * phi + p) for k, a, p in zip((2, 3, 4), amps, phases, strict=True))
            return np.hypot(u, v) <= 0.65 * r

        return "blob", inside
    if kind == 1:  # capsule bar
        w = rng.uniform(0.12, 0.3)

        def inside(u, v):
            du = np.maximum(np.abs(u) - (1.0 - w), 0.0)
            return du * du + v * v <= w * w

        return "bar", inside
    if kind == 2:  # sine wave band
        amp = rng.uniform(0.2, 0.5)
        w = rng.uniform(0.1, 0.2)
        omega = rng.uniform(2.0, 6.0)
        phase = rng.uniform(0.0, 2.0 * math.pi)

        def inside(u, v):
            return (np.abs(v - amp * np.sin(omega * u + phase)) <= w) & (np.abs(u) <= 1.0)

        return "wave", inside
    # speckle cluster
    m = int(rng.integers(3, 8))
    centres = rng.uniform(-0.8, 0.8, (m, 2))
    radii = rng.uniform(0.12, 0.2, m)

    def inside(u, v):
        out = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
        for (cu, cv), r in zip(centres, radii, strict=True):
            out |= (u - cu) ** 2 + (v - cv) ** 2 <= r * r
        return out

    return "speckle", inside


def sample_distractor(rng, size: int) -> Shape | None:
    family, inside = _distractor_inside(rng)
    half = max(rng.uniform(0.06, 0.2) * size, 2.5)
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    hx, hy = half * math.sqrt(aspect), half / math.sqrt(aspect)
    rot = rng.uniform(0.0, 2.0 * math.pi)
    cy, cx = rng.uniform(0.0, size, 2)
    hue = rng.random()
    sat = rng.uniform(0.4, 1.0)
    val = rng.uniform(0.5, 1.0)
    params = {
        "family": family,
        "texture": TEXTURE_KINDS[int(rng.integers(len(TEXTURE_KINDS)))],
        "freq": rng.uniform(1.0, 2.5),
        "angle": rng.uniform(0.0, math.pi),
        "colour": _hsv255(hue, sat, val),
        "colour2": _hsv255(hue + rng.uniform(-0.5, 0.5), sat, val * rng.uniform(0.3, 0.8)),
        "depth": rng.uniform(0.3, 0.9),
    }
    return _rasterise(size, cy, cx, hx, hy, rot, inside, 0, params)


# ----------------------------------------------------------------------------------------
# Background and context cue
# ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _interp_matrix(size: int, n: int) -> np.ndarray:
    """(size, n) bilinear weights mapping an n-point grid spanning the image to pixels."""
    pos = (np.arange(size, dtype=np.float64) + 0.5) / size * (n - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), n - 2)
    frac = pos - lo
    w = np.zeros((size, n), dtype=np.float32)
    w[np.arange(size), lo] = 1.0 - frac
    w[np.arange(size), lo + 1] = frac
    w.setflags(write=False)
    return w


@functools.lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(size, dtype=np.float32) + 0.5
    ys, xs = c[:, None], c[None, :]
    ys.setflags(write=False)
    xs.setflags(write=False)
    return ys, xs


def background(rng, size: int) -> np.ndarray:
    """Channel-first float background (3, H, W) without the context cue."""
    ys, xs = _grid(size)
    base = _hsv255(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.25, 0.8))
    theta = rng.uniform(0.0, 2.0 * math.pi)
    grad_amp = rng.normal(0.0, 20.0, 3).astype(np.float32)
    # Base colour + linear gradient + smooth value noise all live on an n x n grid that is
    # bilinearly upsampled (bilinear interpolation reproduces the linear gradient exactly).
    n = int(rng.integers(3, 8))
    coarse = rng.normal(0.0, rng.uniform(4.0, 20.0), (3, n, n)).astype(np.float32)
    gpos = np.arange(n, dtype=np.float32) / (n - 1) - 0.5  # grid positions / size, centred
    g = gpos[None, :] * math.cos(theta) + gpos[:, None] * math.sin(theta)
    coarse += base[:, None, None] + grad_amp[:, None, None] * g[None]
    w = _interp_matrix(size, n)
    img = np.empty((3, size, size), dtype=np.float32)
    for c in range(3):
        np.matmul(w @ coarse[c], w.T, out=img[c])
    # low-contrast pattern (checks or dots) at a random scale and orientation
    inv_period = 1.0 / (rng.uniform(0.08, 0.25) * size)
    ang = rng.uniform(0.0, math.pi)
    ca, sa = math.cos(ang) * inv_period, math.sin(ang) * inv_period
    pu = xs * ca + ys * sa
    pv = ys * ca - xs * sa
    amp = rng.normal(0.0, 8.0, 3).astype(np.float32)
    if rng.random() < 0.5:
        pat = parity(pu, pv) - 0.5
    else:
        pu = frac(pu) - 0.5
        pv = frac(pv) - 0.5
        pat = (pu * pu + pv * pv <= 0.06).astype(np.float32) - 0.2
    for c in range(3):
        img[c] += pat * amp[c]
    return img


def add_context_cue(image: np.ndarray, class_id: int, phase: float) -> None:
    """Add the documented cue of ``class_id`` to a channel-first float image (3, H, W)."""
    size = image.shape[-1]
    theta, cycles, tint = context_cue_params(class_id)
    ys, xs = _grid(size)
    k = 2.0 * math.pi * cycles / size
    grating = np.sin(xs * (k * math.cos(theta)) + ys * (k * math.sin(theta)) + phase)
    offset = CUE_TINT * (tint - tint.mean())
    for c in range(3):
        image[c] += grating * (CUE_AMPLITUDE * tint[c]) + offset[c]
