"""Named taps through Flax's own intermediates: the raw material of every attribution map.

A model exposes an activation ``x`` as tap ``name`` by calling ``x = tap(self, name, x)`` in its forward
pass. That is two Flax calls on the variable ``'tap:' + name`` (the prefix keeps it apart from any
submodule called ``name``):

- ``self.perturb(...)``: when a ``'perturbations'`` collection is passed to ``apply``, its entry is added to
  the activation; the gradient of any function of the logits with respect to a zero perturbation is the
  gradient at the tap (Flax's documented way to get intermediate gradients). Without the collection the
  call does nothing.
- ``self.sow('intermediates', ...)``: the activation, read back with ``mutable=['intermediates']``.

A tap sown inside a submodule is named by its module path (``'block1/out'``). Any Flax model joins by
sowing its taps this way (and naming them in ``tap_names``, its Grad-CAM layer in ``gradcam_tap``; see
:mod:`apjax.models.family`); nothing else of apjax reads the model's code.

:func:`tap_gradients` runs one forward pass that returns the logits, the activations A at the requested
taps and the gradient of ``sum_b <seed_b, logits_b>`` with respect to each A: one ``jax.vjp`` with
respect to the zero perturbations of those taps. With a one-hot ``seed`` of class k this is
d logit_k / d A per image (images are independent in eval mode; in train mode BatchNorm's batch
statistics couple them, as in the reference). The result is differentiable again, which the matching
loss needs (second order).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from apjax.errors import ConfigError

TAP_PREFIX = "tap:"


def tap(module: nn.Module, name: str, x: jax.Array) -> jax.Array:
    """Exposes ``x`` (B, h, w, c) as tap ``name`` of ``module``: perturbed (for gradients), then sown (the
    activation). Returns ``x`` plus the perturbation when one is given, else ``x`` itself."""
    x = module.perturb(TAP_PREFIX + name, x)
    module.sow("intermediates", TAP_PREFIX + name, x)
    return x


def _by_tap(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A nested collection of tap variables -> ``{tap name: value}`` (the module path joined with '/')."""
    out = {}
    for path, value in traverse_util.flatten_dict(dict(tree)).items():
        if path[-1].startswith(TAP_PREFIX):
            out["/".join((*path[:-1], path[-1].removeprefix(TAP_PREFIX)))] = value
    return out


def _to_tree(values: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`_by_tap`: ``{tap name: value}`` -> the nested collection."""
    flat = {}
    for name, value in values.items():
        *path, leaf = name.split("/")
        flat[(*path, TAP_PREFIX + leaf)] = value
    return traverse_util.unflatten_dict(flat)


def check_taps(model: nn.Module, taps: Sequence[str]) -> None:
    """Raises ``ConfigError`` naming any of ``taps`` that ``model`` does not have (``model.tap_names``)."""
    known = tuple(model.tap_names)
    unknown = [t for t in taps if t not in known]
    if unknown:
        raise ConfigError(f"unknown taps {unknown}; this net's taps are {list(known)}.")


def tap_shapes(
    model: nn.Module, variables: Mapping[str, Any], x: jax.Array
) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of every tap's activation for input ``x`` (B, H, W, 3), in ``model.tap_names``'s
    order (no computation)."""
    params = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    _, state = jax.eval_shape(lambda v, x: model.apply(v, x, mutable=["perturbations"]), params, x)
    shapes = _by_tap(state["perturbations"])
    return {t: shapes[t] for t in sorted(shapes, key=list(model.tap_names).index)}  # forward order


def with_perturbations(
    model: nn.Module, variables: Mapping[str, Any], x: jax.Array, perturbations: Mapping[str, jax.Array]
) -> dict[str, Any]:
    """``variables`` plus the ``'perturbations'`` collection adding ``perturbations[t]`` (the shape of tap
    ``t`` for input ``x``) at each given tap and zeros at the others (Flax needs every one once the
    collection is given)."""
    check_taps(model, tuple(perturbations))
    shapes = tap_shapes(model, variables, x) if set(perturbations) != set(model.tap_names) else {}
    zeros = {t: jnp.zeros(s.shape, s.dtype) for t, s in shapes.items() if t not in perturbations}
    return {**variables, "perturbations": _to_tree({**zeros, **perturbations})}


def apply_with_taps(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: jax.Array,
    taps: Sequence[str],
    *,
    train: bool = False,
    rngs: Mapping[str, jax.Array] | None = None,
    perturbations: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], dict[str, Any]]:
    """One forward pass returning the logits and the activations at ``taps``.

    Args:
      model: a Flax model whose forward pass calls :func:`tap` (e.g. :class:`apjax.models.vgg.VGG`).
      variables: ``{'params': ..., 'batch_stats': ...}``.
      x: images (B, H, W, 3).
      taps: tap names (``model.tap_names``).
      train: training mode (batch statistics, dropout; needs ``rngs={'dropout': key}``).
      rngs: PRNG keys for ``apply``.
      perturbations: optional ``{tap: array of the tap's shape}`` added to the activations at those taps
        (differentiate with respect to zeros for tap gradients); the other taps get zeros, since Flax
        needs every one once the collection is given.

    Returns:
      ``(logits (B, K), acts, updates)``: ``acts[t]`` (B, h, w, c) for each requested tap ``t``;
      ``updates`` holds the new ``batch_stats`` in train mode (else empty).
    """
    check_taps(model, taps)
    chex.assert_rank(x, 4)
    if perturbations is not None:
        variables = with_perturbations(model, variables, x, perturbations)
    mutable = ["intermediates", "batch_stats"] if train else ["intermediates"]
    logits, state = model.apply(variables, x, train=train, rngs=rngs, mutable=mutable)
    state = dict(state)
    sown = _by_tap(state.pop("intermediates", {}))
    return logits, {t: sown[t][-1] for t in taps}, state


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

    One forward pass and one backward pass (``jax.vjp`` with respect to the zero perturbations of
    ``taps``; the other taps' zeros are constants); the seed may depend on the logits of that same forward
    pass, e.g. a one-hot of each image's top-1 class.

    Args:
      model, variables, x, taps, train, rngs: as in :func:`apply_with_taps`.
      seed: (B, num_classes) weights on the logits, or a function logits -> such weights (its output is
        treated as a constant).

    Returns:
      ``(logits, acts, grads, updates)``: logits (B, num_classes); ``acts[t]`` and ``grads[t]`` of
      shape (B, h, w, c) for each tap ``t``, where ``grads[t] = d sum_b <seed_b, logits_b> / d acts[t]``;
      ``updates`` holds the new ``batch_stats`` in train mode (else empty).
    """
    taps = tuple(taps)
    check_taps(model, taps)
    chex.assert_rank(x, 4)
    zeros = {t: jnp.zeros(s.shape, s.dtype) for t, s in tap_shapes(model, variables, x).items()}

    def forward(offsets):
        perturbations = {**zeros, **offsets}
        logits, acts, updates = apply_with_taps(
            model, variables, x, taps, train=train, rngs=rngs, perturbations=perturbations
        )
        return logits, (acts, updates)

    logits, pullback, (acts, updates) = jax.vjp(forward, {t: zeros[t] for t in taps}, has_aux=True)
    weights = seed(logits) if callable(seed) else seed
    chex.assert_shape(weights, logits.shape)
    (grads,) = pullback(jax.lax.stop_gradient(weights).astype(logits.dtype))
    return logits, acts, grads, updates


def top1_seed(logits: jax.Array) -> jax.Array:
    """One-hot (B, K) of each image's largest logit: the class whose map the method matches."""
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=logits.dtype)
