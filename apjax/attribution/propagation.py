"""The backward steps the rules share: relevance through one layer of the folded net, output to input.

A ReLU passes relevance unchanged (the relevance of a unit and of its pre-activation are the same number).
The steps are written with explicit transposes: ``W^T s`` of a conv is :func:`jax.linear_transpose` of the
conv (no forward pass is run for it), of the Dense head a matrix product, and of a max-pool the VJP of the
max-pool, which sends everything to the one arg-max input of each window (winner-take-all; XLA's
select-and-scatter picks a single winner also under ties, so a pool conserves relevance exactly; the rows
and columns that a floor-ing pool drops, e.g. the last of 227, get nothing).

Division guard: ``safe_div(num, den) = num / den`` where ``|den| > eps`` and ``0`` elsewhere (``eps = 1e-9``
by default): a unit whose denominator is (numerically) zero passes nothing down. In the z+ family the
denominator is ``z+_j = sum_i a_i w+_ij >= 0``; in a bias-free net ``z+_j = 0`` forces ``a_j = 0`` and thus
zero relevance at ``j``, so nothing is lost there.

Pixel bounds of the z^B rule: the normalised image of a pixel value in [0, 1] lies in
``[l_c, h_c] = [(0 - mean_c) / std_c, (1 - mean_c) / std_c]`` per channel (:data:`PIXEL_LOW`,
:data:`PIXEL_HIGH`, from :mod:`apjax.data.augment`'s MEAN/STD). The conv's zero padding is applied to the
bound images as well: padded positions are not pixels and take no relevance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from apjax.attribution.folded_net import conv, pool
from apjax.data.augment import MEAN, STD

PIXEL_LOW = tuple((0.0 - m) / s for m, s in zip(MEAN, STD, strict=True))
PIXEL_HIGH = tuple((1.0 - m) / s for m, s in zip(MEAN, STD, strict=True))
EPS = 1e-9


def safe_div(num: jax.Array, den: jax.Array, eps: float = EPS) -> jax.Array:
    """``num / den`` where ``|den| > eps``, else 0 (also NaN-free in its gradient)."""
    ok = jnp.abs(den) > eps
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def conv_t(s: jax.Array, kernel: jax.Array, like: jax.Array) -> jax.Array:
    """``W^T s``: the transpose of :func:`conv` with ``kernel``, applied to ``s``, shaped like ``like``."""
    spec = jax.ShapeDtypeStruct(like.shape, s.dtype)
    (out,) = jax.linear_transpose(lambda a: conv(a, kernel), spec)(s)
    return out


def pool_wta(a: jax.Array, r: jax.Array) -> jax.Array:
    """Winner-take-all through a max-pool: each output's relevance goes to its window's arg-max input."""
    _, pullback = jax.vjp(pool, a)
    (out,) = pullback(r.astype(a.dtype))
    return out


def class_one_hot(class_index: Any, batch: int, num_classes: int, dtype: Any) -> jax.Array:
    """One-hot (B, K) of ``class_index``, an int (B,) or a scalar broadcast to the batch."""
    idx = jnp.broadcast_to(jnp.asarray(class_index, jnp.int32), (batch,))
    return jax.nn.one_hot(idx, num_classes, dtype=dtype)


def pixel_bounds(low: Any, high: Any, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """The z^B bounds as arrays: ``low`` and ``high`` (default :data:`PIXEL_LOW`, :data:`PIXEL_HIGH`)."""
    low = jnp.asarray(PIXEL_LOW if low is None else low, dtype)
    high = jnp.asarray(PIXEL_HIGH if high is None else high, dtype)
    return low, high


def sum_per_image(r: jax.Array) -> jax.Array:
    """Sum over all but the batch axis: (B, ...) -> (B,)."""
    return jnp.sum(r.reshape(r.shape[0], -1), axis=-1)


def zplus_conv(a: jax.Array, kernel: jax.Array, r: jax.Array, eps: float) -> jax.Array:
    """z+ rule through a conv with input ``a >= 0``: ``R_i = a_i sum_j w+_ij R_j / z+_j`` (no bias)."""
    wp = jnp.maximum(kernel.astype(a.dtype), 0)
    s = safe_div(r, conv(a, wp), eps)
    return a * conv_t(s, wp, a)


def zplus_dense(a: jax.Array, kernel: jax.Array, r: jax.Array, eps: float) -> jax.Array:
    """z+ rule through the Dense head on the flattened ``a >= 0``; returns relevance shaped like ``a``."""
    flat = a.reshape(a.shape[0], -1)
    wp = jnp.maximum(kernel.astype(a.dtype), 0)
    s = safe_div(r, flat @ wp, eps)
    return (flat * (s @ wp.T)).reshape(a.shape)


def zb_conv(
    x: jax.Array, kernel: jax.Array, r: jax.Array, low: jax.Array, high: jax.Array, eps: float
) -> jax.Array:
    """z^B rule through the first conv: ``R_i = sum_j (x_i w_ij - l_i w+_ij - h_i w-_ij) / z_j R_j`` with
    ``z_j = sum_i (x_i w_ij - l_i w+_ij - h_i w-_ij)`` (every term >= 0 for ``l <= x <= h``)."""
    k = kernel.astype(x.dtype)
    wp, wn = jnp.maximum(k, 0), jnp.minimum(k, 0)
    lo, hi = jnp.broadcast_to(low, x.shape), jnp.broadcast_to(high, x.shape)
    z = conv(x, k) - conv(lo, wp) - conv(hi, wn)
    s = safe_div(r, z, eps)
    return x * conv_t(s, k, x) - lo * conv_t(s, wp, x) - hi * conv_t(s, wn, x)


def input_name(layers: Sequence[Mapping[str, Any]], i: int) -> str:
    """Name of the tensor that ``layers[i]`` reads: the previous layer's output, or ``'input'``."""
    return "input" if i == 0 else layers[i - 1]["name"]


def zplus_backward(
    layers: Sequence[Mapping[str, Any]],
    acts: Sequence[jax.Array],
    r_logits: jax.Array,
    stop: int,
    eps: float,
    record: dict[str, jax.Array],
) -> jax.Array:
    """z+ / winner-take-all propagation from the logits down to the input of ``layers[stop]`` (stop >= 1)."""
    r = r_logits
    for i in range(len(layers) - 1, stop - 1, -1):
        layer, a = layers[i], acts[i]
        if layer["type"] == "dense":
            r = zplus_dense(a, layer["kernel"], r, eps)
        elif layer["type"] == "pool":
            r = pool_wta(a, r)
        else:
            r = zplus_conv(a, layer["kernel"], r, eps)
        record[input_name(layers, i)] = r
    return r
