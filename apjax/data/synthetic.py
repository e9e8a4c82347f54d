"""Synthetic attribution benchmark with exact per-pixel ground truth: its config and generator.

The shape families and each class's appearance are in :mod:`apjax.data.synthetic_shapes`, the painting
of shapes, background and cue in :mod:`apjax.data.synthetic_render`; this module composes the scenes.

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

import dataclasses
import math
import numbers
import zlib
from collections.abc import Iterable

import numpy as np

from apjax.data.synthetic_render import (
    Shape,
    add_context_cue,
    background,
    paint,
    sample_distractor,
    sample_object,
)
from apjax.data.synthetic_shapes import CLASS_NAMES, CUE_AMPLITUDE, CUE_TINT, N_FAMILIES, context_cue_params
from apjax.errors import ConfigError

# CLASS_NAMES, N_FAMILIES and the context cue (amplitude, tint, parameters) come from synthetic_shapes.
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
MIN_IMAGE_SIZE = 16


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


def _premask(shapes: list[Shape], size: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=np.uint8)
    for sh in shapes:
        m[sh.y0 : sh.y1, sh.x0 : sh.x1][sh.region] = sh.class_id
    return m


def _resolve(shapes: list[Shape], size: int, num_classes: int):
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


def _rng_for(config: SyntheticConfig, split: str, index: int) -> np.random.Generator:
    ss = np.random.SeedSequence([int(config.seed), zlib.crc32(split.encode()), int(index)])
    return np.random.default_rng(ss)


def _check_split_index(split: str, index) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a synthetic split; use one of {SPLITS}.")
    if not _is_int(index) or index < 0:
        raise ValueError(f"index={index!r} must be a non-negative integer.")


def _place_objects(rng, config: SyntheticConfig) -> tuple[list[Shape], np.ndarray, np.ndarray]:
    """The visible objects (painting order), the pre-void mask uint8 (H, W) and the void band bool (H, W).

    ``U{min_objects..max_objects}`` objects of distinct classes, those too hidden dropped
    (:func:`_resolve`), then objects of unused classes added on top until ``min_objects`` remain.
    """
    size, k = config.image_size, config.num_classes
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    classes = rng.choice(k, size=n, replace=False) + 1
    shapes = [sample_object(rng, int(c), size) for c in classes]
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
        shapes = objects + [sample_object(rng, int(c), size) for c in extra]
        objects, premask, void = _resolve([sh for sh in shapes if sh is not None], size, k)
    return objects, premask, void


def _context_class(config: SyntheticConfig, labels: np.ndarray, draws) -> int:
    """The class whose cue goes into the background (0 for none), from ``labels`` uint8 (K,) and the
    image's four uniform draws ``(ctx_u, noise_u, pick_present, pick_absent)``."""
    ctx_u, noise_u, pick_present, pick_absent = draws
    present = np.flatnonzero(labels) + 1
    if ctx_u < config.context_prob:
        return int(present[int(pick_present * len(present))])
    if noise_u < config.context_noise:
        absent = np.flatnonzero(labels == 0) + 1
        if len(absent):
            return int(absent[int(pick_absent * len(absent))])
    return 0


def _paint_shapes(rng, num_distractors: int, image: np.ndarray, objects: list[Shape]) -> list[Shape]:
    """Paints ``U{0..num_distractors}`` distractors, then ``objects``, into ``image`` float (3, H, W);
    returns the distractors drawn."""
    size = image.shape[-1]
    distractors = []
    for _ in range(int(rng.integers(0, num_distractors + 1))):
        sh = sample_distractor(rng, size)
        if sh is not None:
            distractors.append(sh)
            paint(image, sh, rng)
    for sh in objects:
        paint(image, sh, rng)
    return distractors


def _finish_image(rng, image: np.ndarray) -> np.ndarray:
    """Uniform pixel noise added to ``image`` float (3, H, W), rounded: uint8 (H, W, 3)."""
    # uniform pixel noise of std sigma, from random bytes (much cheaper than normals)
    half_width = rng.uniform(1.0, 5.0) * math.sqrt(3.0)
    noise = np.frombuffer(rng.bytes(image.size), dtype=np.uint8).reshape(image.shape)
    image += noise * np.float32(2.0 * half_width / 255.0)
    image += np.float32(0.5 - half_width)  # the 0.5 rounds to nearest in the cast below
    np.clip(image, 0.0, 255.0, out=image)
    return np.ascontiguousarray(image.astype(np.uint8).transpose(1, 2, 0))


def _instance_records(objects: list[Shape], distractors: list[Shape], size: int) -> dict:
    """``'instances'`` and ``'distractors'`` of :func:`generate_example`, regions bool (H, W)."""

    def full(sh: Shape) -> np.ndarray:
        r = np.zeros((size, size), dtype=bool)
        r[sh.y0 : sh.y1, sh.x0 : sh.x1] = sh.region
        return r

    instances = [
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
    return {
        "instances": instances,
        "distractors": [{"family": sh.params["family"], "region": full(sh)} for sh in distractors],
    }


def _generate(config: SyntheticConfig, split: str, index: int, return_instances: bool) -> dict:
    """One example (see :func:`generate_example`), the arguments already checked."""
    size, k = config.image_size, config.num_classes
    rng = _rng_for(config, split, index)
    # Drawn whatever the probabilities, so that the cue never changes the rest of the image.
    ctx_u, noise_u, pick_present, pick_absent, phase = rng.random(5)
    phase *= 2.0 * math.pi

    objects, premask, void = _place_objects(rng, config)
    counts = np.bincount(premask.ravel(), minlength=k + 1)[1:]
    labels = (counts > 0).astype(np.uint8)
    mask = premask.copy()
    mask[void] = VOID

    image = background(rng, size)
    context_class = _context_class(config, labels, (ctx_u, noise_u, pick_present, pick_absent))
    if context_class:
        add_context_cue(image, context_class, phase)
    distractors = _paint_shapes(rng, config.num_distractors, image, objects)
    image = _finish_image(rng, image)

    out = {"image": image, "mask": mask, "labels": labels, "image_id": f"{split}_{index:06d}"}
    if return_instances:
        out.update(_instance_records(objects, distractors, size))
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
