"""The synthetic benchmark's classes: one analytic shape family per class and its appearance.

Each family maps unit-frame coordinates ``(u, v)`` (u to the right, v downwards) to a boolean region inside
``[-1, 1]^2`` (``FAMILIES``; class ``k`` is ``FAMILIES[k - 1]``); beside it, the per-class hue, texture and
context cue (:func:`context_cue_params`) that :mod:`apjax.data.synthetic` documents.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable

import numpy as np

CUE_AMPLITUDE = 22.0
CUE_TINT = 10.0

Inside = Callable[[np.ndarray, np.ndarray], np.ndarray]

# ----------------------------------------------------------------------------------------
# Analytic shape families: each maps unit-frame coordinates (u, v), u to the right and v
# downwards, to a boolean region contained in [-1, 1]^2.
# ----------------------------------------------------------------------------------------


def frac(x: np.ndarray) -> np.ndarray:
    """``x mod 1`` (np.remainder on floats is an order of magnitude slower)."""
    return x - np.floor(x)


def parity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(floor(a) + floor(b)) mod 2`` as floats 0/1: a checkerboard."""
    t = np.floor(a) + np.floor(b)
    return t - 2.0 * np.floor(0.5 * t)


def _sector_angle(u, v, n: int) -> np.ndarray:
    """Polar angle folded into the sector ``[-pi/n, pi/n)`` around the nearest multiple of 2 pi/n."""
    step = 2.0 * math.pi / n
    return frac(np.arctan2(v, u) * (1.0 / step) + 0.5) * step - 0.5 * step


def _regular_polygon(n: int) -> Inside:
    half = math.pi / n
    apothem = math.cos(half)

    def inside(u, v):
        psi = _sector_angle(u, v, n)
        return np.hypot(u, v) * np.cos(psi) <= apothem

    return inside


def _star(n: int, inner: float) -> Inside:
    half = math.pi / n
    ex = inner * math.cos(half) - 1.0  # edge from the outer vertex (1, 0) to the inner one
    ey = inner * math.sin(half)

    def inside(u, v):
        psi = np.abs(_sector_angle(u, v, n))
        r = np.hypot(u, v)
        return ex * (r * np.sin(psi)) - ey * (r * np.cos(psi) - 1.0) >= 0.0

    return inside


def _polygon(points: list[tuple[float, float]]) -> Inside:
    """Even-odd inside-test of a simple polygon given by (u, v) vertices."""
    edges = []
    for (x1, y1), (x2, y2) in zip(points, points[1:] + points[:1], strict=True):
        if y1 != y2:
            edges.append((x1, y1, y2, (x2 - x1) / (y2 - y1)))

    def inside(u, v):
        out = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
        for x1, y1, y2, slope in edges:
            out ^= ((y1 > v) != (y2 > v)) & (u < x1 + (v - y1) * slope)
        return out

    return inside


def _box(u, v, u0, u1, v0, v1):
    return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


def _disc(u, v):
    return u * u + v * v <= 1.0


def _ring(u, v):
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.55**2)


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) <= 0.85


def _cross(u, v):
    d = np.minimum(np.abs(u - v), np.abs(u + v))
    return (d <= 0.45) & (np.maximum(np.abs(u), np.abs(v)) <= 0.9)


def _crescent(u, v):
    return (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v > 0.8**2)


def _ellipse(u, v):
    return u * u + (v / 0.5) ** 2 <= 1.0


def _heart(u, v):
    x = u * 1.15
    y = 0.135 - v * 1.14
    a = x * x + y * y - 1.0
    return a * a * a - x * x * y * y * y <= 0.0


def _l_shape(u, v):
    return _box(u, v, -0.9, -0.35, -0.9, 0.9) | _box(u, v, -0.9, 0.9, 0.35, 0.9)


def _t_shape(u, v):
    return _box(u, v, -0.9, 0.9, -0.9, -0.4) | _box(u, v, -0.27, 0.27, -0.9, 0.9)


def _diamond(u, v):
    return np.abs(u) / 0.6 + np.abs(v) <= 1.0


def _hourglass(u, v):
    av = np.abs(v)
    return (av <= 0.9) & (np.abs(u) <= 0.08 + 0.8 * av)


def _semicircle(u, v):
    return (u * u + (v - 0.45) ** 2 <= 1.0) & (v <= 0.45)


def _trapezoid(u, v):
    return (np.abs(v) <= 0.6) & (np.abs(u) <= 0.675 + 0.4583 * v)


def _holed_plus(u, v):
    au, av = np.abs(u), np.abs(v)
    plus = ((au <= 0.36) & (av <= 0.95)) | ((av <= 0.36) & (au <= 0.95))
    return plus & (np.maximum(au, av) > 0.22)


def _square_frame(u, v):
    m = np.maximum(np.abs(u), np.abs(v))
    return (m <= 0.9) & (m >= 0.5)


def _u_shape(u, v):
    au = np.abs(u)
    return _box(u, v, -0.9, 0.9, 0.45, 0.9) | ((au >= 0.45) & (au <= 0.9) & (np.abs(v) <= 0.9))


def _dumbbell(u, v):
    v2 = v * v
    return (
        ((u + 0.5) ** 2 + v2 <= 0.45**2)
        | ((u - 0.5) ** 2 + v2 <= 0.45**2)
        | ((np.abs(u) <= 0.5) & (np.abs(v) <= 0.15))
    )


FAMILIES: tuple[tuple[str, Inside], ...] = (
    ("disc", _disc),
    ("ring", _ring),
    ("square", _square),
    ("triangle", _regular_polygon(3)),
    ("star", _star(5, 0.42)),
    ("cross", _cross),
    ("crescent", _crescent),
    ("ellipse", _ellipse),
    ("hexagon", _regular_polygon(6)),
    ("heart", _heart),
    (
        "arrow",
        _polygon([(-1, -0.22), (0.1, -0.22), (0.1, -0.7), (1, 0), (0.1, 0.7), (0.1, 0.22), (-1, 0.22)]),
    ),
    ("l_shape", _l_shape),
    ("t_shape", _t_shape),
    ("diamond", _diamond),
    ("pentagon", _regular_polygon(5)),
    ("hourglass", _hourglass),
    ("semicircle", _semicircle),
    ("trapezoid", _trapezoid),
    ("holed_plus", _holed_plus),
    (
        "lightning",
        _polygon(
            [(-0.1, -1.0), (0.55, -1.0), (0.15, -0.25), (0.6, -0.25), (-0.35, 1.0), (-0.05, 0.1), (-0.5, 0.1)]
        ),
    ),
    ("square_frame", _square_frame),
    (
        "chevron",
        _polygon([(-1, -0.75), (-0.5, -0.75), (0, 0.05), (0.5, -0.75), (1, -0.75), (0, 0.85)]),
    ),
    ("u_shape", _u_shape),
    ("dumbbell", _dumbbell),
)

N_FAMILIES: int = len(FAMILIES)
CLASS_NAMES: tuple[str, ...] = tuple(name for name, _ in FAMILIES)

# Per-family appearance tables (index i = class - 1), closed-form so they never drift.
TEXTURE_KINDS = ("stripes", "checks", "dots", "radial", "linear", "noise", "rings", "plaid")
_GOLDEN = 0.6180339887498949
CLASS_HUE = tuple((i * _GOLDEN) % 1.0 for i in range(N_FAMILIES))
CLASS_TEXTURE = tuple(
    (
        TEXTURE_KINDS[i % len(TEXTURE_KINDS)],
        (1.25, 1.75, 2.25)[i // len(TEXTURE_KINDS)],  # cycles per unit half-size
        (i * 0.7) % math.pi,  # orientation in the shape frame
        ((0.0, 0.3), (0.5, 0.8), (0.15, 0.55), (-0.15, 0.55))[(i * 3 + i // 4) % 4],  # dh, dv
    )
    for i in range(N_FAMILIES)
)
_CUE_CYCLES = (2.5, 3.5, 4.5, 5.5)


def context_cue_params(class_id: int) -> tuple[float, float, np.ndarray]:
    """Documented context cue of class ``class_id`` (1-based).

    Returns ``(theta, cycles, tint)``: grating orientation (radians, the grating varies along
    ``x cos theta + y sin theta``), frequency in cycles per image side, and the RGB tint
    (float32 (3,), components in [0.4, 1]).
    """
    i = int(class_id) - 1
    if not 0 <= i < N_FAMILIES:
        raise ValueError(f"class_id={class_id} is outside 1..{N_FAMILIES}; pass a class index.")
    theta = (i % 6) * math.pi / 6.0
    cycles = _CUE_CYCLES[i // 6]
    tint = np.asarray(colorsys.hsv_to_rgb((i * 0.27 + 0.13) % 1.0, 0.6, 1.0), np.float32)
    return theta, cycles, tint
