"""Jitted on-device image augmentation for the host uint8 cache.

The input pipeline keeps each split on the host as a uint8 cache (:mod:`apjax.data.cache`): each image
in a square slot of side ``S`` at ``[0:h, 0:w]`` (zeros elsewhere), with its original size ``(H, W)``
(``sizes``) and the extent ``(h, w)`` it fills (``extents``). By default images are stored at their
original resolution, ``(h, w) = (H, W)``, so that, as in the reference (SPEC section 3), a training crop
is cut from the original pixels and resized ONCE, and an eval image is the original resized once; a
squashed cache (``(h, w) = (S, S)``, every image resized to ``S x S`` first) is an explicit DEVIATION
that resamples twice. Shapes are static (``S``, ``out_size``); the sizes and extents are data, so one
compilation serves every batch. A batch is augmented on the device by one jitted function keyed by a
PRNG key:

* ``sample_crop_boxes`` draws torchvision ``RandomResizedCrop`` boxes in the ORIGINAL image's pixel
  geometry (so the box statistics are exactly torchvision's), vectorised over the batch: all tries
  are drawn at once, the first valid one is taken, else the centre-crop fallback.
* ``crop_resize`` maps each box to the stored image by the fractions extent/size (the identity at
  original resolution) and resamples it with a separable triangle (bilinear) filter, antialiased when
  downscaling like PIL / torchvision (``antialias=True``): for an output size ``n`` and a box
  ``[y0, y0 + L)`` in stored pixels, output pixel ``i`` sits at the continuous source position
  ``c_i = y0 + (i + 0.5) * L / n`` (half-pixel centres, ``align_corners=False``) and source pixel ``j``
  (centre ``j + 0.5``) gets the weight ``max(0, 1 - |j + 0.5 - c_i| / f)`` with ``f = max(L / n, 1)``;
  the weights over the pixels inside the image (``j < h``: never the slot's padding) are normalised to
  sum to one (this is PIL's ``Image.resize(..., box=...)`` rule, and
  ``jax.image.scale_and_translate(..., antialias=True)``'s). Both axes are applied as dense per-image
  interpolation matrices with float32 einsums at HIGHEST precision.
* ``normalize`` maps pixel/255 to ``(x - MEAN) / STD``.

``train_augment`` chains them (random crop, horizontal flip with p=0.5, normalise);
``eval_preprocess`` resizes each stored image whole (aspect not kept); ``resize_masks_nearest`` resizes
each stored label mask with PIL's NEAREST pixel-centre convention. Everything is jittable with
``out_size`` (and ``dtype``) static, e.g. ``jax.jit(train_augment, static_argnames=("out_size", "dtype"))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

MEAN = (0.4589, 0.4355, 0.4032)
STD = (0.2239, 0.2186, 0.2206)

_HIGHEST = jax.lax.Precision.HIGHEST


def _centre_crop_fallback(
    size_h: jax.Array, size_w: jax.Array, ratio: Sequence[float]
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The centre crop with the aspect ratio clamped into ``ratio``: int32 (B,) top, left, height, width.

    ``size_h``, ``size_w``: int32 (B,) original image sizes.
    """
    hf = size_h.astype(jnp.float32)
    wf = size_w.astype(jnp.float32)
    in_ratio = wf / hf
    too_tall = in_ratio < ratio[0]
    too_wide = in_ratio > ratio[1]
    h_fb = jnp.where(too_tall, jnp.round(wf / ratio[0]).astype(jnp.int32), size_h)
    w_fb = jnp.where(too_wide, jnp.round(hf * ratio[1]).astype(jnp.int32), size_w)
    h_fb = jnp.clip(h_fb, 1, size_h)
    w_fb = jnp.clip(w_fb, 1, size_w)
    return (size_h - h_fb) // 2, (size_w - w_fb) // 2, h_fb, w_fb


def sample_crop_boxes(
    key: jax.Array,
    sizes: jax.Array,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    tries: int = 10,
) -> jax.Array:
    """torchvision ``RandomResizedCrop.get_params`` boxes, vectorised over a batch.

    Args:
      key: PRNG key.
      sizes: int (B, 2) original image sizes ``(H, W)``.
      scale: range of the crop area as a fraction of the image area.
      ratio: range of the crop aspect ratio (width / height); sampled log-uniformly.
      tries: number of random tries before the centre-crop fallback.

    Returns:
      int32 (B, 4) boxes ``(top, left, height, width)`` in original pixels, always inside the image
      with height, width >= 1.
    """
    sizes = jnp.asarray(sizes)
    batch = sizes.shape[0]
    size_h = sizes[:, 0].astype(jnp.int32)
    size_w = sizes[:, 1].astype(jnp.int32)
    hf = size_h.astype(jnp.float32)[:, None]
    wf = size_w.astype(jnp.float32)[:, None]

    k_scale, k_ratio, k_top, k_left = jax.random.split(key, 4)
    area = hf * wf
    target_area = area * jax.random.uniform(
        k_scale, (batch, tries), jnp.float32, minval=scale[0], maxval=scale[1]
    )
    log_aspect = jax.random.uniform(
        k_ratio, (batch, tries), jnp.float32, minval=math.log(ratio[0]), maxval=math.log(ratio[1])
    )
    aspect = jnp.exp(log_aspect)
    # jnp.round rounds half to even, like Python's round().
    w_try = jnp.round(jnp.sqrt(target_area * aspect))
    h_try = jnp.round(jnp.sqrt(target_area / aspect))
    valid = (w_try > 0) & (w_try <= wf) & (h_try > 0) & (h_try <= hf)
    found = jnp.any(valid, axis=1)
    first = jnp.argmax(valid, axis=1)  # index of the first valid try (0 when none is valid)
    h_rand = jnp.take_along_axis(h_try, first[:, None], axis=1)[:, 0].astype(jnp.int32)
    w_rand = jnp.take_along_axis(w_try, first[:, None], axis=1)[:, 0].astype(jnp.int32)
    # Where no try is valid h_rand/w_rand are garbage; clamp so randint gets a sane range.
    h_rand = jnp.clip(h_rand, 1, size_h)
    w_rand = jnp.clip(w_rand, 1, size_w)
    top_rand = jax.random.randint(k_top, (batch,), 0, size_h - h_rand + 1, dtype=jnp.int32)
    left_rand = jax.random.randint(k_left, (batch,), 0, size_w - w_rand + 1, dtype=jnp.int32)

    fallback = _centre_crop_fallback(size_h, size_w, ratio)
    randoms = (top_rand, left_rand, h_rand, w_rand)
    boxes = [jnp.where(found, r, f) for r, f in zip(randoms, fallback, strict=True)]
    return jnp.stack(boxes, axis=1).astype(jnp.int32)


def _axis_weights(
    start: jax.Array, length: jax.Array, extent: jax.Array, in_size: int, out_size: int
) -> jax.Array:
    """Interpolation matrices (B, out_size, in_size) for boxes ``[start, start + length)``.

    ``start``, ``length`` and ``extent`` are float32 (B,) in source pixels; the image fills the first
    ``extent`` of the ``in_size`` source pixels (the rest is slot padding). Triangle filter with half-pixel
    centres, widened by the scale factor when downscaling, renormalised over the source pixels inside
    ``[0, extent)``: the padding never contributes.
    """
    step = length / out_size  # source pixels per output pixel
    support = jnp.maximum(step, 1.0)
    out_pos = jnp.arange(out_size, dtype=jnp.float32) + 0.5
    src_pos = jnp.arange(in_size, dtype=jnp.float32) + 0.5
    centres = start[:, None] + out_pos * step[:, None]  # (B, out)
    dist = (src_pos - centres[..., None]) / support[:, None, None]  # (B, out, in)
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(dist))
    weights = jnp.where(src_pos < extent[:, None, None], weights, 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    return weights / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)


def _resample(images: jax.Array, wy: jax.Array, wx: jax.Array) -> jax.Array:
    """Separable resampling of (B, Sh, Sw, C) images with (B, out_h, Sh) and (B, out_w, Sw)."""
    x = images.astype(jnp.float32)
    cols = jnp.einsum("bpw,bhwc->bhpc", wx, x, precision=_HIGHEST)
    out = jnp.einsum("boh,bhpc->bopc", wy, cols, precision=_HIGHEST)
    return jnp.clip(out, 0.0, 255.0)


def crop_resize(
    images: jax.Array,
    boxes: jax.Array,
    sizes: jax.Array,
    extents: jax.Array,
    out_size: int,
    flip: jax.Array | None = None,
) -> jax.Array:
    """Crop boxes out of cached images and resample them to ``out_size x out_size``.

    Args:
      images: uint8 (B, S, S, C) cache slots (a non-square (B, Sh, Sw, C) works too); image b fills
        ``[0:extents[b, 0], 0:extents[b, 1]]``.
      boxes: int (B, 4) ``(top, left, height, width)`` in ORIGINAL pixels.
      sizes: int (B, 2) original ``(H, W)``.
      extents: int (B, 2) ``(h, w)`` of the slot the stored image fills: ``sizes`` for an image stored at
        its original resolution (the box is then cut from the original pixels), ``(S, S)`` for a squashed
        cache (the box is mapped to the copy by the fractions h/H, w/W).
      out_size: static output side.
      flip: optional bool (B,): flip those outputs horizontally.

    Returns:
      float32 (B, out_size, out_size, C) in [0, 255]: the box resampled bilinearly with half-pixel
      centres, antialiased when downscaling (see the module docstring for the exact filter), from the
      pixels inside the extent only.
    """
    _, s_h, s_w, _ = images.shape
    boxes = jnp.asarray(boxes).astype(jnp.float32)
    sizes = jnp.asarray(sizes).astype(jnp.float32)
    extents = jnp.asarray(extents).astype(jnp.float32)
    size_h, size_w = sizes[:, 0], sizes[:, 1]
    ext_h, ext_w = extents[:, 0], extents[:, 1]
    # (v * h) / H rather than v * (h / H): exact when h == H (original resolution) and for v == H.
    y0 = boxes[:, 0] * ext_h / size_h
    x0 = boxes[:, 1] * ext_w / size_w
    box_h = boxes[:, 2] * ext_h / size_h
    box_w = boxes[:, 3] * ext_w / size_w
    wy = _axis_weights(y0, box_h, ext_h, s_h, out_size)
    wx = _axis_weights(x0, box_w, ext_w, s_w, out_size)
    if flip is not None:
        flip = jnp.asarray(flip, dtype=bool)
        wx = jnp.where(flip[:, None, None], wx[:, ::-1, :], wx)
    return _resample(images, wy, wx)


def normalize(images_0_255: jax.Array) -> jax.Array:
    """float32 ``(x / 255 - MEAN) / STD`` over the last (channel) axis."""
    x = jnp.asarray(images_0_255).astype(jnp.float32) / 255.0
    mean = jnp.asarray(MEAN, dtype=jnp.float32)
    std = jnp.asarray(STD, dtype=jnp.float32)
    return (x - mean) / std


def train_augment(
    key: jax.Array,
    images: jax.Array,
    sizes: jax.Array,
    extents: jax.Array,
    out_size: int,
    dtype=jnp.float32,
    scale: Sequence[float] = (0.08, 1.0),
) -> jax.Array:
    """Training augmentation: RandomResizedCrop(out_size), horizontal flip (p=0.5), normalise.

    Args:
      key: PRNG key (one per batch).
      images: uint8 (B, S, S, 3) cache slots.
      sizes: int (B, 2) original ``(H, W)``: the geometry the crop boxes are drawn in.
      extents: int (B, 2) ``(h, w)`` of each slot the stored image fills (see :func:`crop_resize`).
      out_size: static output side (227 in the paper's setup).
      dtype: static output dtype.
      scale: static range of the crop's area fraction (torchvision's default (0.08, 1)).

    Returns:
      (B, out_size, out_size, 3) normalised images of ``dtype``.
    """
    k_box, k_flip = jax.random.split(key)
    boxes = sample_crop_boxes(k_box, sizes, scale=tuple(scale))
    flip = jax.random.bernoulli(k_flip, 0.5, (images.shape[0],))
    return normalize(crop_resize(images, boxes, sizes, extents, out_size, flip)).astype(dtype)


def draw_keys(key: jax.Array, index: jax.Array, draw: jax.Array) -> jax.Array:
    """The key of augmentation draw ``draw`` of image ``index``: ``fold_in(fold_in(key, index), draw)``, a
    function of the run's key, the image and the draw alone (not of the batch or the step).

    ``index``: int (B,) image indices; ``draw``: int scalar or (B,). Returns (B,) keys.
    """
    draw = jnp.broadcast_to(jnp.asarray(draw, jnp.int32), jnp.shape(index))
    return jax.vmap(lambda i, e: jax.random.fold_in(jax.random.fold_in(key, i), e))(index, draw)


def draw_augment(
    key: jax.Array,
    index: jax.Array,
    draw: jax.Array,
    images: jax.Array,
    sizes: jax.Array,
    extents: jax.Array,
    out_size: int,
    dtype=jnp.float32,
    scale: Sequence[float] = (0.08, 1.0),
) -> jax.Array:
    """:func:`train_augment` with each image's crop and flip drawn from its own key, :func:`draw_keys`
    ``(key, index, draw)``: the same image and draw give the same crop in any batch, so a cache of the
    teacher's outputs on that crop (:mod:`apjax.compress.teacher_cache`) can stand in for the teacher.

    Args:
      key: the run's augmentation key.
      index: int (B,) the images' indices in the training split.
      draw: int scalar or (B,), the draw (epoch mod the number of cached draws).
      images, sizes, extents, out_size, dtype, scale: as in :func:`train_augment`.

    Returns:
      (B, out_size, out_size, 3) normalised images of ``dtype``.
    """
    keys = draw_keys(key, index, draw)

    def one(k, size):
        k_box, k_flip = jax.random.split(k)
        return sample_crop_boxes(k_box, size[None], scale=tuple(scale))[0], jax.random.bernoulli(k_flip, 0.5)

    boxes, flip = jax.vmap(one)(keys, jnp.asarray(sizes))
    return normalize(crop_resize(images, boxes, sizes, extents, out_size, flip)).astype(dtype)


def eval_preprocess(images: jax.Array, extents: jax.Array, out_size: int, dtype=jnp.float32) -> jax.Array:
    """The stored image of each slot resized once (bilinear, antialiased) to out_size x out_size, normalised.

    Args:
      images: uint8 (B, S, S, 3) cache slots.
      extents: int (B, 2) ``(h, w)`` of each slot the stored image fills; only those pixels are read
        (at original resolution this is the original image resized once, aspect not kept).
      out_size: static output side.
      dtype: static output dtype.

    Returns:
      (B, out_size, out_size, 3) normalised images of ``dtype``.
    """
    extents = jnp.asarray(extents)
    boxes = jnp.concatenate([jnp.zeros_like(extents), extents], axis=1)
    return normalize(crop_resize(images, boxes, extents, extents, out_size)).astype(dtype)


def resize_masks_nearest(masks: jax.Array, extents: jax.Array, out_size: int) -> jax.Array:
    """Nearest-neighbour resize of each stored uint8 mask (B, S, S) or (B, S, S, 1) to (B, out, out).

    Args:
      masks: uint8 cache slots of class-index masks.
      extents: int (B, 2) ``(h, w)`` of each slot the stored mask fills (the original mask at original
        resolution); only those pixels are read.
      out_size: static output side.

    Output row ``i`` reads source row ``floor((i + 0.5) * h / out_size)`` (PIL's NEAREST convention,
    computed in integers: ``((2i + 1) * h) // (2 * out_size)``), so only values present in the input
    (including the 255 "ignore" label) appear in the output. (PIL computes the same position by repeated
    float addition and so, where ``(i + 0.5) * h / out_size`` is an exact integer, sometimes takes the
    pixel one lower; everywhere else the two agree.)
    """
    masks = jnp.asarray(masks)
    if masks.ndim == 4:
        masks = masks[..., 0]
    extents = jnp.asarray(extents).astype(jnp.int32)
    odd = 2 * jnp.arange(out_size, dtype=jnp.int32) + 1

    def index(extent: jax.Array) -> jax.Array:  # (B,) -> (B, out_size) source indices
        return jnp.minimum((odd * extent[:, None]) // (2 * out_size), extent[:, None] - 1)

    rows, cols = index(extents[:, 0]), index(extents[:, 1])
    return jax.vmap(lambda m, r, c: m[r][:, c])(masks, rows, cols)
