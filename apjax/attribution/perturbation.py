"""Black-box attribution: RISE and occlusion, from a model's class scores alone (no taps, no gradients).

Both take ``score_fn(x (M, H, W, 3)) -> (M, K)``, the model's class scores of a batch of inputs, and so
work on any model that answers with scores, also one apjax cannot open (a served model, another
framework's). The evaluation's entries (:mod:`apjax.attribution.methods`) pass the model's probabilities,
``sigmoid(logits)`` (the classifiers here are multi-label), in eval mode. Inputs are the normalised images
the model reads: a pixel set to 0 there takes the data's mean colour.

RISE (Petsiuk, Das and Saenko, BMVC 2018). ``N`` binary ``s x s`` grids, each cell kept (1) with
probability ``p``, are upsampled bilinearly to ``(s + 1) * ceil(H / s)`` by ``(s + 1) * ceil(W / s)`` and
cropped to ``H x W`` at a random shift in ``[0, ceil(H / s)) x [0, ceil(W / s))`` (integer pixels); then
for class ``k`` of an image ``I``::

    RISE(I, k)[l] = 1 / (N p) * sum_i f_k(I * M_i) * M_i[l]

an unbiased Monte-Carlo estimate of ``E[f_k(I * M) M[l]] / p`` (the expected score given that pixel ``l``
is kept, times ``P(M[l] = 1) = p`` over ``p``). The masks come from one PRNG key and are the same for every
image: a map depends on its image, class and key only, not on its batch or device.

Occlusion (Zeiler and Fergus, ECCV 2014). A ``size x size`` patch of ``baseline`` slides over the image
with ``stride`` (top-left corners ``0, stride, 2 stride, ...`` and a last one at ``H - size``, so that
every pixel is covered); a pixel's attribution is the mean, over the patches that cover it, of the drop
of the class score ``f_k(I) - f_k(I with the patch occluded)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from apjax.errors import ConfigError

ScoreFn = Callable[[jax.Array], jax.Array]


def rise_masks(
    key: jax.Array, n: int, height: int, width: int, cells: int = 8, keep: float = 0.1
) -> jax.Array:
    """RISE's ``n`` masks for ``height x width`` inputs, float32 (n, height, width) in [0, 1].

    Args:
      key: the PRNG key the grids and shifts are drawn from.
      n: the number of masks.
      height, width: the input's size.
      cells: ``s``, the grid is ``s x s``.
      keep: ``p``, the probability that a grid cell is kept.
    """
    cell_h, cell_w = math.ceil(height / cells), math.ceil(width / cells)
    k_grid, k_dy, k_dx = jax.random.split(key, 3)
    grids = jax.random.bernoulli(k_grid, keep, (n, cells, cells)).astype(jnp.float32)
    dy = jax.random.randint(k_dy, (n,), 0, cell_h)
    dx = jax.random.randint(k_dx, (n,), 0, cell_w)
    return upsample_and_crop(grids, dy, dx, height, width)


def upsample_and_crop(grids: jax.Array, dy: jax.Array, dx: jax.Array, height: int, width: int) -> jax.Array:
    """Grids (n, s, s) upsampled bilinearly (half-pixel centres, edges clamped) to ``(s + 1) * ceil(H /
    s)`` by ``(s + 1) * ceil(W / s)``, each cropped to ``height x width`` from row ``dy`` (n,) and column
    ``dx`` (n,): (n, height, width)."""
    n, cells = grids.shape[0], grids.shape[1]
    cell_h, cell_w = math.ceil(height / cells), math.ceil(width / cells)
    up = jax.image.resize(grids, (n, (cells + 1) * cell_h, (cells + 1) * cell_w), "linear")
    crop = lambda m, y, x: jax.lax.dynamic_slice(m, (y, x), (height, width))  # noqa: E731
    return jax.vmap(crop)(up, dy, dx)


def rise_map(
    score_fn: ScoreFn,
    x: jax.Array,
    class_index: jax.Array,
    masks: jax.Array,
    keep: float,
    chunk: int = 50,
) -> jax.Array:
    """RISE saliency of each image for its class, float32 (B, H, W).

    Args:
      score_fn: ``(M, H, W, 3) -> (M, K)`` class scores.
      x: the images, (B, H, W, 3).
      class_index: int (B,), each image's class ``k``.
      masks: (N, H, W), :func:`rise_masks`.
      keep: the masks' ``p`` (the estimator divides by ``N p``).
      chunk: masks per forward pass (``B * chunk`` inputs at once); must divide ``N``.
    """
    n, h, w = masks.shape
    b = x.shape[0]
    if n % chunk:
        raise ConfigError(
            f"RISE's {n} masks do not split into chunks of {chunk}; choose a chunk that divides them."
        )
    cls = jnp.broadcast_to(jnp.asarray(class_index, jnp.int32), (b,))

    def accumulate(total, m):  # m: (chunk, H, W)
        masked = x[:, None] * m[None, :, :, :, None]  # (B, chunk, H, W, 3)
        scores = score_fn(masked.reshape(b * chunk, h, w, x.shape[-1])).reshape(b, chunk, -1)
        s_k = jnp.take_along_axis(scores, cls[:, None, None], axis=-1)[..., 0].astype(
            jnp.float32
        )  # (B, chunk)
        return total + jnp.einsum("bc,chw->bhw", s_k, m), None

    total, _ = jax.lax.scan(
        accumulate, jnp.zeros((b, h, w), jnp.float32), masks.reshape(n // chunk, chunk, h, w)
    )
    return total / (n * keep)


def occlusion_corners(length: int, size: int, stride: int) -> list[int]:
    """The patch's first pixels along an axis of ``length``: ``0, stride, ...`` up to ``length - size``,
    and ``length - size`` itself, so that the patches cover every pixel."""
    if not 0 < size <= length or stride < 1:
        raise ConfigError(
            f"an occlusion patch of {size} pixels with stride {stride} does not fit {length} pixels; "
            "choose an occlusion_size of at most the image side."
        )
    return sorted(set(range(0, length - size + 1, stride)) | {length - size})


def occlusion_map(
    score_fn: ScoreFn,
    x: jax.Array,
    class_index: jax.Array,
    size: int,
    stride: int,
    baseline: float = 0.0,
) -> jax.Array:
    """Occlusion sensitivity of each image for its class, float32 (B, H, W): per pixel, the mean drop of
    ``f_k`` over the patches that cover it (one forward pass per patch position, batched over the images).

    Args:
      score_fn: ``(M, H, W, 3) -> (M, K)`` class scores.
      x: the images, (B, H, W, 3).
      class_index: int (B,).
      size, stride: the square patch's side and step, in pixels.
      baseline: the occluded pixels' value (in the normalised input: 0 is the data's mean colour).
    """
    b, h, w, _ = x.shape
    cls = jnp.broadcast_to(jnp.asarray(class_index, jnp.int32), (b,))

    def score_k(images):
        scores = score_fn(images)
        return jnp.take_along_axis(scores, cls[:, None], axis=-1)[:, 0].astype(jnp.float32)

    rows, cols = occlusion_corners(h, size, stride), occlusion_corners(w, size, stride)
    corners = jnp.asarray([(r, c) for r in rows for c in cols], jnp.int32)  # (P, 2)
    yy, xx = jnp.arange(h)[:, None], jnp.arange(w)[None, :]

    def patch(corner):  # (H, W) 1 inside the patch at ``corner``
        r, c = corner[0], corner[1]
        return ((yy >= r) & (yy < r + size) & (xx >= c) & (xx < c + size)).astype(jnp.float32)

    reference = score_k(x)

    def accumulate(carry, corner):
        total, count = carry
        m = patch(corner)
        occluded = x * (1.0 - m[None, :, :, None]) + baseline * m[None, :, :, None]
        drop = reference - score_k(occluded)  # (B,)
        return (total + drop[:, None, None] * m, count + m), None

    zeros = jnp.zeros((b, h, w), jnp.float32)
    (total, count), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros((h, w), jnp.float32)), corners)
    return total / count
