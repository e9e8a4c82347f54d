"""Activations and gradients at named taps: the raw material of every attribution map.

``tap_gradients`` runs one forward pass that returns the logits and the activations A at the requested
taps, and the gradient of ``sum_b <seed_b, logits_b>`` with respect to each A: one ``jax.vjp`` through
zero offsets added at the taps (the gradient with respect to a zero offset is the gradient at the tap).
With a one-hot ``seed`` of class k this is d logit_k / d A per image (images are independent in eval
mode; in train mode BatchNorm's batch statistics couple them, as in the reference). The result is
differentiable again, which the matching loss needs (second order).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from apjax.errors import ConfigError


def tap_recorder(
    known: Sequence[str], taps: Sequence[str], offsets: Mapping[str, jax.Array] | None
) -> tuple[Callable[[str, jax.Array], jax.Array], dict[str, jax.Array]]:
    """What a model's forward pass calls at each named tap: ``(tap, acts)``.

    ``tap(name, y)`` adds ``offsets[name]`` to the activation ``y`` where given (zeros leave the function
    unchanged; their gradient is the tap gradient) and records it in ``acts`` when ``name`` is in ``taps``.
    ``ConfigError`` names any requested tap or offset the model does not have (``known``).
    """
    offsets = dict(offsets or {})
    unknown = [t for t in (*taps, *offsets) if t not in known]
    if unknown:
        raise ConfigError(f"unknown taps {unknown}; this net's taps are {list(known)}.")
    acts: dict[str, jax.Array] = {}

    def tap(name: str, y: jax.Array) -> jax.Array:
        if name in offsets:
            y = y + offsets[name].astype(y.dtype)
        if name in taps:
            acts[name] = y
        return y

    return tap, acts


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
    seed: jax.Array | Callable[[jax.Array], jax.Array],
    taps: Sequence[str],
    *,
    train: bool = False,
    rngs: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array], dict[str, Any]]:
    """Logits, tap activations and the gradients of the seeded logits with respect to them.

    One forward pass and one backward pass (``jax.vjp`` through zero offsets at the taps); the seed may
    depend on the logits of that same forward pass, e.g. a one-hot of each image's top-1 class.

    Args:
      model: a :class:`~apjax.models.vgg.VGG`.
      variables: ``{'params': ..., 'batch_stats': ...}``.
      x: images (B, H, W, 3).
      seed: (B, num_classes) weights on the logits, or a function logits -> such weights (its output is
        treated as a constant).
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

    def forward(offsets):
        out = model.apply(variables, x, train=train, taps=taps, offsets=offsets, rngs=rngs, mutable=mutable)
        (logits, acts), updates = out if train else (out, {})
        return logits, (acts, updates)

    logits, pullback, (acts, updates) = jax.vjp(forward, zeros, has_aux=True)
    weights = seed(logits) if callable(seed) else seed
    (grads,) = pullback(jax.lax.stop_gradient(weights).astype(logits.dtype))
    return logits, acts, grads, updates


def top1_seed(logits: jax.Array) -> jax.Array:
    """One-hot (B, K) of each image's largest logit: the class whose map the method matches."""
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=logits.dtype)
