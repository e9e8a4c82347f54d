"""Activations and gradients at named taps: the raw material of every attribution map.

``tap_gradients`` runs one forward pass that returns the logits and the activations A at the requested
taps, and the gradient of ``sum_b <seed_b, logits_b>`` with respect to each A, all in one ``jax.grad``
through zero offsets added at the taps. With a one-hot ``seed`` of class k this is d logit_k / d A per
image (images are independent in eval mode; in train mode BatchNorm's batch statistics couple them, as
in the reference). The result is differentiable again, which the matching loss needs (second order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def tap_shapes(
    model: nn.Module, variables: Mapping[str, Any], x: jax.Array, taps: Sequence[str]
) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of the activations at ``taps`` for input ``x`` (no computation)."""
    _, acts = jax.eval_shape(lambda v, x: model.apply(v, x, taps=tuple(taps)), variables, x)
    return acts


def tap_gradients(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: jax.Array,
    seed: jax.Array,
    taps: Sequence[str],
    *,
    train: bool = False,
    rngs: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array], dict[str, Any]]:
    """Logits, tap activations and the gradients of the seeded logits with respect to them.

    Args:
      model: a :class:`~apjax.models.vgg.VGG`.
      variables: ``{'params': ..., 'batch_stats': ...}``.
      x: images (B, H, W, 3).
      seed: (B, num_classes) weights on the logits, e.g. a one-hot of each image's class.
      taps: tap names (see :func:`apjax.models.vgg.tap_names`).
      train: training mode (batch statistics, dropout; needs ``rngs={'dropout': key}``).
      rngs: PRNG keys for ``apply``.

    Returns:
      ``(logits, acts, grads, updates)``: logits (B, num_classes); ``acts[t]`` and ``grads[t]`` of
      shape (B, h, w, c) for each tap ``t``, where ``grads[t] = d sum_b <seed_b, logits_b> / d acts[t]``;
      ``updates`` holds the new ``batch_stats`` in train mode (else empty).
    """
    taps = tuple(taps)
    shapes = tap_shapes(model, variables, x, taps)
    zeros = {t: jnp.zeros(s.shape, s.dtype) for t, s in shapes.items()}
    mutable = ["batch_stats"] if train else False

    def seeded(offsets):
        out = model.apply(variables, x, train=train, taps=taps, offsets=offsets, rngs=rngs, mutable=mutable)
        (logits, acts), updates = out if train else (out, {})
        score = jnp.sum(logits * seed.astype(logits.dtype))
        return score, (logits, acts, updates)

    grads, (logits, acts, updates) = jax.grad(seeded, has_aux=True)(zeros)
    return logits, acts, grads, updates
