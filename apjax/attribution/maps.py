"""Attribution maps at named taps: SWA, SSWA (with its two channel-mask samplers), EWA and Grad-CAM.

All functions are batched and jittable. Activations and their gradients are NHWC, shape (B, h, w, C), as
returned by :func:`apjax.models.tap_gradients`; a map is (B, h, w). Maps are computed in float32, or in
the inputs' precision when that is wider (float64 under ``jax.enable_x64``), so bfloat16 activations give
float32 maps.

SPEC section 5 (the paper's notation): ``M = V(sum_c R_c u_c T(A_c))`` with ``u_c`` the sum over space of
d logit_k / d A_c, ``T`` the identity and ``V`` a ReLU (SWA); ``R_c`` a random 0/1 keep mask on the
teacher's channels (SSWA); EWA is the channel mean of ``A_c^2``. Every map here is differentiable in the
activations and in the gradients, so a student map built from :func:`~apjax.models.tap_gradients` is
differentiable in the student's parameters (second order).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp

METHODS = ("swa", "sswa", "ewa", "gradcam")
REDUCTIONS = ("sum", "mean")


def _float(x: Any) -> jax.Array:
    """``x`` as a float array of at least float32 precision (float64 stays float64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def channel_weights(grads: jax.Array, reduce: str = "sum") -> jax.Array:
    """Per-channel weights ``u_c``: sum (SWA) or mean (Grad-CAM's paper) of d score / d A_c over h, w.

    Args:
      grads: (B, h, w, C) gradients of the class score with respect to the activation.
      reduce: ``'sum'`` or ``'mean'`` over the spatial positions.

    Returns:
      (B, C) weights.
    """
    grads = _float(grads)
    if reduce == "sum":
        return jnp.sum(grads, axis=(1, 2))
    if reduce == "mean":
        return jnp.mean(grads, axis=(1, 2))
    raise ValueError(f"unknown reduce {reduce!r}; choose one of {list(REDUCTIONS)}.")


def gradcam_map(
    acts: jax.Array,
    grads: jax.Array,
    reduce: str = "sum",
    relu: bool = True,
    channel_mask: jax.Array | None = None,
) -> jax.Array:
    """Grad-CAM style map ``M = V(sum_c R_c u_c A_c)``.

    Args:
      acts: (B, h, w, C) activations A.
      grads: (B, h, w, C) gradients d score / d A (or their spatial sum, (B, 1, 1, C), with
        ``reduce='sum'``).
      reduce: how :func:`channel_weights` pools the gradients over space (``'sum'`` or ``'mean'``).
      relu: ``V`` is a ReLU when True, the identity when False.
      channel_mask: optional 0/1 keep mask ``R_c``, (B, C) per image or (C,) shared by the batch.

    Returns:
      (B, h, w) map.
    """
    chex.assert_rank([acts, grads], 4)
    if grads.shape[1:3] != (1, 1):  # (B, 1, 1, C): gradients already summed over space
        chex.assert_equal_shape([acts, grads])
    acts = _float(acts)
    weights = channel_weights(grads, reduce).astype(acts.dtype)
    if channel_mask is not None:
        mask = jnp.asarray(channel_mask).astype(weights.dtype)
        if mask.ndim not in (1, 2) or mask.shape[-1] != weights.shape[-1]:
            raise ValueError(
                f"channel_mask must have shape (C,) or (B, C) with C={weights.shape[-1]}, got {mask.shape}."
            )
        weights = weights * mask  # (C,) broadcasts over the batch
    m = jnp.einsum("bhwc,bc->bhw", acts, weights)
    return jax.nn.relu(m) if relu else m


def swa_map(acts: jax.Array, grads: jax.Array, channel_mask: jax.Array | None = None) -> jax.Array:
    """SWA (SPEC section 5): ``ReLU(sum_c u_c A_c)`` with ``u_c`` the spatial SUM of the gradient.

    With a ``channel_mask`` (teacher side only) this is SSWA.
    """
    return gradcam_map(acts, grads, reduce="sum", relu=True, channel_mask=channel_mask)


def ewa_map(acts: jax.Array) -> jax.Array:
    """EWA (SPEC section 5): mean over channels of ``A_c^2``, (B, h, w, C) -> (B, h, w)."""
    chex.assert_rank(acts, 4)
    acts = _float(acts)
    return jnp.mean(jnp.square(acts), axis=-1)


def bernoulli_channel_mask(key: jax.Array, batch: int, channels: int, keep_prob: float) -> jax.Array:
    """The paper's SSWA mask: ``R_c ~ Bernoulli(keep_prob)``, independently per image and channel.

    Returns:
      float32 (batch, channels) of 0/1.
    """
    return jax.random.bernoulli(key, keep_prob, (batch, channels)).astype(jnp.float32)


def fixed_count_channel_mask(key: jax.Array, channels: int, drop: float) -> jax.Array:
    """The reference's SSWA mask: exactly ``int(channels * drop)`` channels set to 0.

    The dropped channels are drawn uniformly without replacement; one mask serves the whole batch
    (pass it as a (C,) ``channel_mask``, which broadcasts over images). ``channels`` and ``drop`` are
    static.

    Returns:
      float32 (channels,) of 0/1.
    """
    if not 0.0 <= drop <= 1.0:
        raise ValueError(f"drop must lie in [0, 1], got {drop}.")
    n_drop = int(channels * drop)
    dropped = jax.random.permutation(key, channels)[:n_drop]
    return jnp.ones((channels,), jnp.float32).at[dropped].set(0.0)


def tap_maps(
    method: str,
    acts: Mapping[str, jax.Array],
    grads: Mapping[str, jax.Array] | None,
    channel_masks: Mapping[str, jax.Array] | None = None,
) -> dict[str, jax.Array]:
    """The attribution map of ``method`` at every tap in ``acts``.

    Args:
      method: ``'ewa'`` (needs no gradients), ``'swa'`` or ``'sswa'`` (:func:`swa_map`, masked by
        ``channel_masks[tap]`` where given), ``'gradcam'`` (:func:`gradcam_map` with its defaults).
      acts: tap name -> (B, h, w, C) activation.
      grads: tap name -> (B, h, w, C) gradient of the class score (ignored for ``'ewa'``).
      channel_masks: optional tap name -> (C,) or (B, C) keep mask, for SSWA on the teacher side.

    Returns:
      tap name -> (B, h, w) map.
    """
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {list(METHODS)}.")
    if method == "ewa":
        return {t: ewa_map(a) for t, a in acts.items()}
    if grads is None:
        raise ValueError(f"method {method!r} needs the gradients at the taps; got grads=None.")
    missing = [t for t in acts if t not in grads]
    if missing:
        raise ValueError(f"no gradients for taps {missing}.")
    masks = dict(channel_masks or {})
    if method == "gradcam":
        return {t: gradcam_map(a, grads[t], channel_mask=masks.get(t)) for t, a in acts.items()}
    return {t: swa_map(a, grads[t], channel_mask=masks.get(t)) for t, a in acts.items()}


def _flatten(m: jax.Array) -> jax.Array:
    m = _float(m)
    return m.reshape(m.shape[0], -1)


def _safe_norm(x: jax.Array, eps: float) -> jax.Array:
    """``max(||x||_2, eps)`` over the last axis, with a finite gradient everywhere (also at x = 0)."""
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return jnp.sqrt(jnp.maximum(sq, eps * eps))


def normalize_map(m: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Flattens each map and divides it by ``max(||m||_2, eps)`` (torch's ``F.normalize``): -> (B, h*w).

    An all-zero map stays zero and has a finite gradient.
    """
    flat = _flatten(m)
    return flat / _safe_norm(flat, eps)


def map_cosine_similarity(m1: jax.Array, m2: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Cosine similarity of the flattened maps, (B,); 0 where either map is all zero."""
    return jnp.sum(normalize_map(m1, eps) * normalize_map(m2, eps), axis=-1)


def upsample_map(m: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """Bilinear resize of (B, h, w) maps to (B, size, size) (or (B, *size)) for evaluation and figures."""
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    m = _float(m)
    return jax.image.resize(m, (m.shape[0], height, width), method="bilinear")
