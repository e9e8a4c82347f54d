"""Synthetic attribution benchmark with exact per-pixel ground truth.

What it is
----------
Multi-label images whose segmentation mask is known exactly, laid out like PASCAL VOC:
the mask holds 0 for background, ``k`` (1..K) for class ``k`` and 255 ("void") on the
border band of every object, and the labels are a multi-hot vector of the classes that are
visible.  Because the mask is painted from the very same boolean pixel regions as the image,
an attribution map can be scored against it without any annotation noise.  Everything is
pure numpy and deterministic: ``(config.seed, split, index)`` fixes every pixel.

Classes
-------
Each class is one analytic shape family (``CLASS_NAMES``; class ``k`` is
``CLASS_NAMES[k - 1]``), rasterised by an inside-test on the pixel-centre grid: pixel
``(i, j)`` has centre ``(y, x) = (i + 0.5, j + 0.5)``, which is mapped into the shape's unit
frame ``(u, v)`` (translation, rotation, per-axis scale) and tested against the family's
closed-form region inside ``[-1, 1]^2``.  The test only runs on the shape's bounding box.
Per instance:

* centre uniform in ``[0.1, 0.9] * image_size`` (objects may be cut by the image edge);
* half-size ``max(U(0.12, 0.28) * image_size, 4 px)``, aspect ratio log-uniform in
  ``[0.75, 4/3]`` (the two half-axes are ``size * sqrt(a)`` and ``size / sqrt(a)``),
  rotation uniform in ``[0, 2 pi)``;
* colour: hue = the class's preferred hue (golden-ratio spaced over the classes) plus a
  normal offset of std 0.1 turns, saturation ``U(0.4, 1)``, value ``U(0.5, 1)``.  Preferred
  hues of neighbouring classes are only 0.02-0.09 turns apart, so hue ranges overlap widely
  and the shape (and texture) is needed to tell classes apart;
* texture: a class-specific pattern (stripes, checks, dots, radial gradient, linear
  gradient, noise, rings or plaid, with a class-specific frequency and orientation) in the
  shape's own frame, blending the instance colour with a class-specific second colour
  (hue shift / darkening) at a random depth ``U(0.5, 0.9)``.

Objects per image
-----------------
``U{min_objects..max_objects}`` objects of *distinct* classes (sampled without
replacement; so ``max_objects <= num_classes``), painted in order: a later object covers the
earlier ones, and the pre-void mask holds the class of the topmost object at every pixel.
An object is then dropped (not drawn at all, so the image shows what lies beneath it)
when it has fewer than ``MIN_VISIBLE_PIXELS`` (12) visible pixels or fewer than
``MIN_INTERIOR_PIXELS`` (4) non-void pixels; this is repeated until every remaining object
passes.  If fewer than ``min_objects`` objects remain, new objects of classes not yet in the
image are added on top (and the dropping repeated) until ``min_objects`` remain, so the
visible count is always in ``[min_objects, max_objects]`` (``min_objects`` is limited to
``image_size // 4`` so that this stays quick).  Hence ``labels[k - 1] == 1`` iff class ``k``
occurs in the mask, and every labelled class has at least ``MIN_INTERIOR_PIXELS`` interior
(non-void) pixels.

Void rule
---------
Let ``M`` be the mask before the void band (values 0..K).  Pixel ``p`` becomes 255 iff
``M[p] > 0`` and at least one of its 4-neighbours *inside the image* has a different ``M``
value.  That is a 1-pixel band on the inner side of the boundary of every visible object
region (against background, distractors, which are background, and other objects); the
image edge is not a boundary and background pixels are never void.  Labels are computed
from ``M``.

Background and clutter
----------------------
A random low-saturation base colour, a linear colour gradient, smooth value noise
(bilinear upsampling of a 3x3..7x7 random grid), a random low-contrast checks or dots
pattern, and ``U{0..num_distractors}`` distractor shapes from families used by no class
(Fourier blobs, capsule bars, sine waves, speckle clusters) with random colours and
textures.  Distractors are painted over the background and under all objects, and are 0 in
the mask.  Finally, uniform pixel noise (std ``U(1, 5)``) is added to the whole image.

Context cue (a deliberate shortcut)
-----------------------------------
Per image, with probability ``context_prob`` the background (under distractors and
objects) gets the cue of one of the image's classes, chosen uniformly among the labelled
ones.  Otherwise, with probability ``context_noise``, it gets the cue of a class that is
*not* in the image (uniform among the absent classes; none if every class is present).  So
at most one cue per image.  The cue of class ``k`` (see ``context_cue_params``) is a
sinusoidal grating with a class-specific orientation ``theta_k`` and frequency ``c_k``
(cycles per image side), tinted with a class-specific colour ``t_k`` (RGB in [0.4, 1]):
``background += CUE_AMPLITUDE * sin(2 pi c_k (x cos theta_k + y sin theta_k) / S + phase) * t_k
+ CUE_TINT * (t_k - mean(t_k))`` per RGB channel, with ``(x, y)`` the pixel centres
``(j + 0.5, i + 0.5)``, ``S`` the image size and a random phase (``context_phase`` of
``generate_example(..., return_instances=True)``).  The random draws that decide the cue
are made whatever the probabilities, so for the same seed an image with and without the
cue differs only in its background pixels (outside objects and distractors).

Splits
------
``SPLITS = ("train", "val", "segmentation_val")``; ``segmentation_val`` is the localisation
split.  All splits share the generator; they differ only in the random stream, seeded with
``np.random.SeedSequence([seed, crc32(split), index])``.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import math
import numbers
import zlib
from collections.abc import Callable, Iterable

import numpy as np

from apjax.errors import ConfigError

__all__ = [
    "CLASS_NAMES",
    "CUE_AMPLITUDE",
    "CUE_TINT",
    "MIN_INTERIOR_PIXELS",
    "MIN_VISIBLE_PIXELS",
    "N_FAMILIES",
    "SPLITS",
    "VOID",
    "SyntheticConfig",
    "context_cue_params",
    "generate_batch",
    "generate_example",
    "void_band",
]

SPLITS = ("train", "val", "segmentation_val")
VOID = 255
MIN_VISIBLE_PIXELS = 12
MIN_INTERIOR_PIXELS = 4
MAX_TOP_UPS = 1000
CUE_AMPLITUDE = 22.0
CUE_TINT = 10.0
MIN_IMAGE_SIZE = 16

Inside = Callable[[np.ndarray, np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------------------
# Analytic shape families: each maps unit-frame coordinates (u, v), u to the right and v
# downwards, to a boolean region contained in [-1, 1]^2.
# ----------------------------------------------------------------------------------------


def _frac(x: np.ndarray) -> np.ndarray:
    """``x mod 1`` (np.remainder on floats is an order of magnitude slower)."""
    return x - np.floor(x)


def _parity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(floor(a) + floor(b)) mod 2`` as floats 0/1: a checkerboard."""
    t = np.floor(a) + np.floor(b)
    return t - 2.0 * np.floor(0.5 * t)


def _sector_angle(u, v, n: int) -> np.ndarray:
    """Polar angle folded into the sector ``[-pi/n, pi/n)`` around the nearest multiple of 2 pi/n."""
    step = 2.0 * math.pi / n
    return _frac(np.arctan2(v, u) * (1.0 / step) + 0.5) * step - 0.5 * step


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


_FAMILIES: tuple[tuple[str, Inside], ...] = (
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

N_FAMILIES: int = len(_FAMILIES)
CLASS_NAMES: tuple[str, ...] = tuple(name for name, _ in _FAMILIES)

# Per-family appearance tables (index i = class - 1), closed-form so they never drift.
_TEXTURE_KINDS = ("stripes", "checks", "dots", "radial", "linear", "noise", "rings", "plaid")
_GOLDEN = 0.6180339887498949
_CLASS_HUE = tuple((i * _GOLDEN) % 1.0 for i in range(N_FAMILIES))
_CLASS_TEXTURE = tuple(
    (
        _TEXTURE_KINDS[i % len(_TEXTURE_KINDS)],
        (1.25, 1.75, 2.25)[i // len(_TEXTURE_KINDS)],  # cycles per unit half-size
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


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------


def _is_int(x) -> bool:
    return type(x) is int or (isinstance(x, numbers.Integral) and not isinstance(x, bool))


def _is_real(x) -> bool:
    return type(x) in (float, int) or (isinstance(x, numbers.Real) and not isinstance(x, bool))


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Settings of the synthetic benchmark (see the module docstring)."""

    num_classes: int = 20
    image_size: int = 64  # square images, image_size x image_size
    min_objects: int = 1
    max_objects: int = 4
    num_distractors: int = 3  # max distractor shapes per image (0..num_distractors drawn)
    context_prob: float = 0.0
    context_noise: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` (one sentence) on impossible settings."""
        for name in ("num_classes", "image_size", "min_objects", "max_objects", "num_distractors", "seed"):
            value = getattr(self, name)
            if not _is_int(value):
                raise ConfigError(f"{name}={value!r} must be an integer.")
        if self.num_classes < 1 or self.num_classes > N_FAMILIES:
            if self.num_classes < 1:
                raise ConfigError(f"num_classes={self.num_classes} must be at least 1.")
            raise ConfigError(
                f"num_classes={self.num_classes} exceeds the {N_FAMILIES} shape families of "
                f"the synthetic benchmark; use at most {N_FAMILIES}."
            )
        if self.image_size < MIN_IMAGE_SIZE:
            raise ConfigError(
                f"image_size={self.image_size} is too small for the shapes to be recognisable; "
                f"use at least {MIN_IMAGE_SIZE}."
            )
        if self.min_objects < 1:
            raise ConfigError(
                f"min_objects={self.min_objects} must be at least 1, since every image needs a "
                "labelled object."
            )
        if self.min_objects > self.max_objects:
            raise ConfigError(
                f"min_objects={self.min_objects} is larger than max_objects={self.max_objects}; "
                "set min_objects <= max_objects."
            )
        if self.max_objects > self.num_classes:
            raise ConfigError(
                f"max_objects={self.max_objects} exceeds num_classes={self.num_classes}, but "
                "the objects of an image have distinct classes; use max_objects <= num_classes."
            )
        if self.min_objects > self.image_size // 4:
            raise ConfigError(
                f"min_objects={self.min_objects} objects cannot all stay visible in a "
                f"{self.image_size}x{self.image_size} image; use at most image_size // 4 = "
                f"{self.image_size // 4} or a larger image_size."
            )
        if self.num_distractors < 0:
            raise ConfigError(
                f"num_distractors={self.num_distractors} is negative; use 0 for no distractors."
            )
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed} is negative; use a non-negative integer seed.")
        for name in ("context_prob", "context_noise"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"{name}={value!r} is not a probability; use a value in [0, 1].")


# ----------------------------------------------------------------------------------------
# Rasterisation and painting
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Shape:
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
    return _Shape(class_id, y0, y1, x0, x1, region, u, v, params)


def _texture(kind: str, freq: float, angle: float, u, v, rng) -> np.ndarray:
    """Texture value in [0, 1] on the shape's bounding box, in the shape's own frame."""
    two_pi = 2.0 * math.pi
    if kind == "stripes":
        t = 0.5 + 0.5 * np.sin((u * math.cos(angle) + v * math.sin(angle)) * (two_pi * freq))
    elif kind == "checks":
        t = _parity(u * freq, v * freq)
    elif kind == "dots":
        fu = _frac(u * freq) - 0.5
        fv = _frac(v * freq) - 0.5
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


def _paint(image: np.ndarray, shape: _Shape, rng) -> None:
    """Paint a shape's textured colour into a channel-first float image (3, H, W)."""
    p = shape.params
    region = shape.region
    t = _texture(p["texture"], p["freq"], p["angle"], shape.u[region], shape.v[region], rng)
    c1 = p["colour"]
    dc = p["colour2"] - c1
    t *= np.float32(p["depth"])
    pix = c1[:, None] + dc[:, None] * t[None, :]
    image[:, shape.y0 : shape.y1, shape.x0 : shape.x1][:, region] = pix


def _sample_object(rng, class_id: int, size: int) -> _Shape | None:
    i = class_id - 1
    r = rng.random(8).tolist()  # one call: per-call overhead dominates at small sizes
    half = max((0.12 + 0.16 * r[0]) * size, 4.0)
    sqrt_aspect = math.exp(0.5 * math.log(0.75) + r[1] * 0.5 * math.log(16.0 / 9.0))
    hx, hy = half * sqrt_aspect, half / sqrt_aspect
    rot = 2.0 * math.pi * r[2]
    cy, cx = (0.1 + 0.8 * r[3]) * size, (0.1 + 0.8 * r[4]) * size
    hue = _CLASS_HUE[i] + 0.1 * rng.standard_normal()
    sat = 0.4 + 0.6 * r[5]
    val = 0.5 + 0.5 * r[6]
    kind, freq, angle, (dh, dv) = _CLASS_TEXTURE[i]
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
    return _rasterise(size, cy, cx, hx, hy, rot, _FAMILIES[i][1], class_id, params)


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


def _sample_distractor(rng, size: int) -> _Shape | None:
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
        "texture": _TEXTURE_KINDS[int(rng.integers(len(_TEXTURE_KINDS)))],
        "freq": rng.uniform(1.0, 2.5),
        "angle": rng.uniform(0.0, math.pi),
        "colour": _hsv255(hue, sat, val),
        "colour2": _hsv255(hue + rng.uniform(-0.5, 0.5), sat, val * rng.uniform(0.3, 0.8)),
        "depth": rng.uniform(0.3, 0.9),
    }
    return _rasterise(size, cy, cx, hx, hy, rot, inside, 0, params)


def void_band(premask: np.ndarray) -> np.ndarray:
    """The documented void rule: object pixels with a 4-neighbour of a different value."""
    diff = np.zeros(premask.shape, dtype=bool)
    ne = premask[1:] != premask[:-1]
    diff[1:] |= ne
    diff[:-1] |= ne
    ne = premask[:, 1:] != premask[:, :-1]
    diff[:, 1:] |= ne
    diff[:, :-1] |= ne
    return diff & (premask > 0)


def _premask(shapes: list[_Shape], size: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=np.uint8)
    for sh in shapes:
        m[sh.y0 : sh.y1, sh.x0 : sh.x1][sh.region] = sh.class_id
    return m


def _resolve(shapes: list[_Shape], size: int, num_classes: int):
    """Drop objects with too few visible or interior pixels until all pass."""
    while True:
        m = _premask(shapes, size)
        void = void_band(m)
        visible = np.bincount(m.ravel(), minlength=num_classes + 1)
        interior = np.bincount(m[~void], minlength=num_classes + 1)
        keep = [
            sh
            for sh in shapes
            if visible[sh.class_id] >= MIN_VISIBLE_PIXELS and interior[sh.class_id] >= MIN_INTERIOR_PIXELS
        ]
        if len(keep) == len(shapes):
            return shapes, m, void
        shapes = keep


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


def _background(rng, size: int) -> np.ndarray:
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
        pat = _parity(pu, pv) - 0.5
    else:
        pu = _frac(pu) - 0.5
        pv = _frac(pv) - 0.5
        pat = (pu * pu + pv * pv <= 0.06).astype(np.float32) - 0.2
    for c in range(3):
        img[c] += pat * amp[c]
    return img


def _add_context_cue(image: np.ndarray, class_id: int, phase: float) -> None:
    """Add the documented cue of ``class_id`` to a channel-first float image (3, H, W)."""
    size = image.shape[-1]
    theta, cycles, tint = context_cue_params(class_id)
    ys, xs = _grid(size)
    k = 2.0 * math.pi * cycles / size
    grating = np.sin(xs * (k * math.cos(theta)) + ys * (k * math.sin(theta)) + phase)
    offset = CUE_TINT * (tint - tint.mean())
    for c in range(3):
        image[c] += grating * (CUE_AMPLITUDE * tint[c]) + offset[c]


def _rng_for(config: SyntheticConfig, split: str, index: int) -> np.random.Generator:
    ss = np.random.SeedSequence([int(config.seed), zlib.crc32(split.encode()), int(index)])
    return np.random.default_rng(ss)


def _check_split_index(split: str, index) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a synthetic split; use one of {SPLITS}.")
    if not _is_int(index) or index < 0:
        raise ValueError(f"index={index!r} must be a non-negative integer.")


def _generate(config: SyntheticConfig, split: str, index: int, return_instances: bool) -> dict:
    size, k = config.image_size, config.num_classes
    rng = _rng_for(config, split, index)
    # Drawn whatever the probabilities, so that the cue never changes the rest of the image.
    ctx_u, noise_u, pick_present, pick_absent, phase = rng.random(5)
    phase *= 2.0 * math.pi

    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    classes = rng.choice(k, size=n, replace=False) + 1
    shapes = [_sample_object(rng, int(c), size) for c in classes]
    objects, premask, void = _resolve([sh for sh in shapes if sh is not None], size, k)
    top_ups = 0
    while len(objects) < config.min_objects:
        # Too many objects were dropped: add new objects of unused classes on top.
        top_ups += 1
        if top_ups > MAX_TOP_UPS:
            raise RuntimeError(
                f"could not place {config.min_objects} visible objects in a {size}x{size} "
                "image; lower min_objects or raise image_size."
            )
        used = {sh.class_id for sh in objects}
        unused = np.array([c for c in range(1, k + 1) if c not in used])
        extra = rng.choice(unused, size=config.min_objects - len(objects), replace=False)
        shapes = objects + [_sample_object(rng, int(c), size) for c in extra]
        objects, premask, void = _resolve([sh for sh in shapes if sh is not None], size, k)

    counts = np.bincount(premask.ravel(), minlength=k + 1)[1:]
    labels = (counts > 0).astype(np.uint8)
    mask = premask.copy()
    mask[void] = VOID

    image = _background(rng, size)
    context_class = 0
    present = np.flatnonzero(labels) + 1
    if ctx_u < config.context_prob:
        context_class = int(present[int(pick_present * len(present))])
    elif noise_u < config.context_noise:
        absent = np.flatnonzero(labels == 0) + 1
        if len(absent):
            context_class = int(absent[int(pick_absent * len(absent))])
    if context_class:
        _add_context_cue(image, context_class, phase)

    distractors = []
    for _ in range(int(rng.integers(0, config.num_distractors + 1))):
        sh = _sample_distractor(rng, size)
        if sh is not None:
            distractors.append(sh)
            _paint(image, sh, rng)
    for sh in objects:
        _paint(image, sh, rng)
    # uniform pixel noise of std sigma, from random bytes (much cheaper than normals)
    half_width = rng.uniform(1.0, 5.0) * math.sqrt(3.0)
    noise = np.frombuffer(rng.bytes(image.size), dtype=np.uint8).reshape(image.shape)
    image += noise * np.float32(2.0 * half_width / 255.0)
    image += np.float32(0.5 - half_width)  # the 0.5 rounds to nearest in the cast below
    np.clip(image, 0.0, 255.0, out=image)
    image = np.ascontiguousarray(image.astype(np.uint8).transpose(1, 2, 0))

    out = {"image": image, "mask": mask, "labels": labels, "image_id": f"{split}_{index:06d}"}
    if return_instances:

        def full(sh: _Shape) -> np.ndarray:
            r = np.zeros((size, size), dtype=bool)
            r[sh.y0 : sh.y1, sh.x0 : sh.x1] = sh.region
            return r

        out["instances"] = [
            {
                "class_id": sh.class_id,
                "family": CLASS_NAMES[sh.class_id - 1],
                "region": full(sh),
                "center": sh.params["center"],
                "half_axes": sh.params["half_axes"],
                "rotation": sh.params["rotation"],
                "hue": sh.params["hue"],
            }
            for sh in objects
        ]
        out["distractors"] = [{"family": sh.params["family"], "region": full(sh)} for sh in distractors]
        out["context_class"] = context_class
        out["context_phase"] = float(phase)
    return out


def generate_example(config: SyntheticConfig, split: str, index: int, return_instances: bool = False) -> dict:
    """One example of the synthetic benchmark.

    Returns ``{'image': uint8 (H, W, 3), 'mask': uint8 (H, W) with values in {0..K, 255},
    'labels': uint8 (K,) multi-hot, 'image_id': str (e.g. 'train_000042')}``.  With
    ``return_instances=True`` it also returns ``'instances'`` (the drawn objects in painting
    order, each a dict with ``class_id``, ``family``, the full boolean ``region`` (H, W) the
    object was painted on, ``center``, ``half_axes``, ``rotation`` and ``hue``),
    ``'distractors'`` (dicts with ``family`` and ``region``, painted before the objects) and
    ``'context_class'`` (the class whose cue is in the background, 0 for none) and
    ``'context_phase'`` (the grating phase the cue has, or would have).
    """
    config.validate()
    _check_split_index(split, index)
    return _generate(config, split, int(index), return_instances)


def generate_batch(config: SyntheticConfig, split: str, indices: Iterable[int]) -> dict:
    """``generate_example`` for each index, stacked along axis 0 (``image_id`` a list)."""
    config.validate()
    indices = list(indices)
    for index in indices:
        _check_split_index(split, index)
    examples = [_generate(config, split, int(i), False) for i in indices]
    size, k = config.image_size, config.num_classes
    if not examples:
        return {
            "image": np.zeros((0, size, size, 3), np.uint8),
            "mask": np.zeros((0, size, size), np.uint8),
            "labels": np.zeros((0, k), np.uint8),
            "image_id": [],
        }
    return {
        "image": np.stack([e["image"] for e in examples]),
        "mask": np.stack([e["mask"] for e in examples]),
        "labels": np.stack([e["labels"] for e in examples]),
        "image_id": [e["image_id"] for e in examples],
    }
