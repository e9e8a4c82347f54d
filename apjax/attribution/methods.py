"""Every attribution method of the evaluation in one registry (SPEC section 7).

:data:`ATTRIBUTION_METHODS` maps a method's name to its :class:`AttributionMethod`: its label in tables and
its ``build(model, options) -> map_fn``, where ``map_fn(variables, x (B, H, W, 3), class_index int (B,),
example_id int (B,)) -> (B, h, w)`` is the attribution of each image for its class, from a one-hot seed
on that class's logit, with the model in eval mode (not jitted: the evaluators compose it into their own
sharded programs). ``example_id`` names each example (the evaluation passes ``image * K + class``) for
methods that draw noise (SmoothGrad folds it into its key), so a pair's map does not depend on the batch it
is computed in. Maps come at their method's own resolution (Grad-CAM and Excitation Backprop at the
Grad-CAM tap, the others at the input); the evaluation resizes them bilinearly to the input size.

Adding a method is one entry; validation, the configs, the sweep and the report read
:func:`attribution_methods` and :func:`method_label`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from apjax.attribution import gradients, rules
from apjax.attribution.maps import gradcam_map
from apjax.errors import ConfigError
from apjax.models import family_of, tap_gradients

MapFn = Callable[[Mapping[str, Any], jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class MethodOptions:
    """The methods' settings: Integrated Gradients' steps, SmoothGrad's samples, noise and seed."""

    ig_steps: int = 32
    smoothgrad_samples: int = 16
    smoothgrad_noise: float = 0.15
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class AttributionMethod:
    """One evaluation method: ``label`` in tables, ``build(model, MethodOptions) -> map_fn``."""

    label: str
    build: Callable[[Any, MethodOptions], MapFn]


def gradcam_tap(model) -> str:
    """The Grad-CAM layer of ``model``: its ``gradcam_tap`` (``conv5_3``, 14x14 at 227 for VGG16; ``layer4``
    for a ResNet)."""
    return model.gradcam_tap


def _tap_of(model) -> str:
    return gradcam_tap(model)


def _chain_widths(model, label: str):
    """The widths of a plain conv chain (what the rule-based methods walk); ``ConfigError`` for another
    family."""
    family = family_of(model)
    if not family.plain_chain:
        raise ConfigError(
            f"{label} walks a plain conv chain (the VGG family) and a {family.name} model has none; use "
            "gradcam or a gradient method."
        )
    return model.widths


def _gradcam(model, o: MethodOptions) -> MapFn:
    tap = _tap_of(model)

    def fn(v, x, cls, ids):
        seed = jax.nn.one_hot(cls, model.num_classes, dtype=jnp.float32)
        _, acts, grads, _ = tap_gradients(model, v, x, seed, [tap])
        return gradcam_map(acts[tap], grads[tap], reduce="sum", relu=True)

    return fn


def _excitation_bp(model, o: MethodOptions) -> MapFn:
    tap, widths = _tap_of(model), _chain_widths(model, "Excitation BP")
    return lambda v, x, cls, ids: rules.excitation_backprop(
        rules.fold_batchnorm(v, widths), x, cls, read_at=tap
    )


def _lrp(model, o: MethodOptions) -> MapFn:
    widths = _chain_widths(model, "LRP a1b0")
    return lambda v, x, cls, ids: rules.lrp_alpha1beta0(rules.fold_batchnorm(v, widths), x, cls)


def _rap(model, o: MethodOptions) -> MapFn:
    widths = _chain_widths(model, "RAP")
    return lambda v, x, cls, ids: rules.rap(rules.fold_batchnorm(v, widths), x, cls)


def _gradient(model, o: MethodOptions) -> MapFn:
    return lambda v, x, cls, ids: gradients.gradient_map(model, v, x, cls)


def _input_x_gradient(model, o: MethodOptions) -> MapFn:
    return lambda v, x, cls, ids: gradients.input_x_gradient_map(model, v, x, cls)


def _integrated_gradients(model, o: MethodOptions) -> MapFn:
    return lambda v, x, cls, ids: gradients.integrated_gradients_map(model, v, x, cls, steps=o.ig_steps)


def _smoothgrad(model, o: MethodOptions) -> MapFn:
    key = jax.random.key(o.seed)
    return lambda v, x, cls, ids: gradients.smoothgrad_map(
        model, v, x, cls, key, samples=o.smoothgrad_samples, noise=o.smoothgrad_noise, example_ids=ids
    )


ATTRIBUTION_METHODS: dict[str, AttributionMethod] = {
    "gradcam": AttributionMethod("Grad-CAM", _gradcam),
    "excitation_bp": AttributionMethod("Excitation BP", _excitation_bp),
    "lrp": AttributionMethod("LRP a1b0", _lrp),
    "rap": AttributionMethod("RAP", _rap),
    "gradient": AttributionMethod("Gradient", _gradient),
    "input_x_gradient": AttributionMethod("Input x Gradient", _input_x_gradient),
    "integrated_gradients": AttributionMethod("Integrated Gradients", _integrated_gradients),
    "smoothgrad": AttributionMethod("SmoothGrad", _smoothgrad),
}


def attribution_methods() -> tuple[str, ...]:
    """The registered evaluation methods, read when called (entries added at run time count)."""
    return tuple(ATTRIBUTION_METHODS)


def method_label(method: str) -> str:
    """A method's name in tables (the name itself for one no longer registered)."""
    spec = ATTRIBUTION_METHODS.get(method)
    return spec.label if spec else method


def check_methods(methods, what: str = "attribution methods") -> None:
    """Raises :class:`ConfigError` (one sentence) when a name of ``methods`` is not registered."""
    unknown = [m for m in methods if m not in ATTRIBUTION_METHODS]
    if unknown:
        raise ConfigError(f"unknown {what} {unknown}; choose from {list(attribution_methods())}.")


def map_fn(method: str, model, options: MethodOptions | None = None) -> MapFn:
    """The unjitted ``(variables, x, class_index, example_id) -> (B, h, w)`` map of ``method``."""
    check_methods([method])
    return ATTRIBUTION_METHODS[method].build(model, options or MethodOptions())


def attribution_fn(
    method: str,
    model,
    variables: Mapping[str, Any],
    *,
    ig_steps: int = 32,
    smoothgrad_samples: int = 16,
    smoothgrad_noise: float = 0.15,
    seed: int = 0,
) -> Callable[..., jax.Array]:
    """A jitted ``(x, class_index, example_id=None) -> (B, h, w)`` float32 map of ``method`` for these
    weights (``example_id`` defaults to the position in the batch)."""
    options = MethodOptions(ig_steps, smoothgrad_samples, smoothgrad_noise, seed)
    fn = map_fn(method, model, options)
    # The weights are an argument, not a constant baked into the compiled program.
    jitted = jax.jit(lambda v, x, cls, ids: fn(v, x, cls, ids).astype(jnp.float32))

    def ids_of(x, ids):
        return jnp.arange(x.shape[0], dtype=jnp.int32) if ids is None else jnp.asarray(ids, jnp.int32)

    def call(x, cls, example_id=None):
        return jitted(variables, x, cls, ids_of(x, example_id))

    # Ahead-of-time lowering with these weights (compile time and memory analysis in benchmarks).
    call.lower = lambda x, cls, example_id=None: jitted.lower(variables, x, cls, ids_of(x, example_id))
    return call
