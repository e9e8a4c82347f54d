"""Every attribution method of the evaluation behind one signature (SPEC section 7).

``attribution_fn(method, model, variables)`` returns a jitted ``(x (B, H, W, 3), class_index int (B,)) -> map
(B, h, w) float32``: the attribution of each image for its class, from a one-hot seed on that class's
logit, with the model in eval mode. Maps come at their method's own resolution (Grad-CAM and Excitation
Backprop at the Grad-CAM tap, the others at the input); the evaluation resizes them bilinearly to the input
size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from apjax.attribution.maps import gradcam_map
from apjax.errors import ConfigError
from apjax.models import family_of, tap_gradients

METHODS = (
    "gradcam",
    "excitation_bp",
    "lrp",
    "rap",
    "gradient",
    "input_x_gradient",
    "integrated_gradients",
    "smoothgrad",
)
LABELS = {
    "gradcam": "Grad-CAM",
    "excitation_bp": "Excitation BP",
    "lrp": "LRP a1b0",
    "rap": "RAP",
    "gradient": "Gradient",
    "input_x_gradient": "Input x Gradient",
    "integrated_gradients": "Integrated Gradients",
    "smoothgrad": "SmoothGrad",
}


def gradcam_tap(model) -> str:
    """The Grad-CAM layer of ``model``: its ``gradcam_tap`` (``conv5_3``, 14x14 at 227 for VGG16; ``layer4``
    for a ResNet)."""
    return model.gradcam_tap


def attribution_fn(
    method: str,
    model,
    variables: Mapping[str, Any],
    *,
    ig_steps: int = 32,
    smoothgrad_samples: int = 16,
    smoothgrad_noise: float = 0.15,
    seed: int = 0,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """A jitted ``(x, class_index) -> (B, h, w)`` map function of ``method`` for this model and weights."""
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {list(METHODS)}.")
    tap = gradcam_tap(model)
    num_classes = model.num_classes

    if method == "gradcam":

        def fn(v, x, cls):
            seed_ = jax.nn.one_hot(cls, num_classes, dtype=jnp.float32)
            _, acts, grads, _ = tap_gradients(model, v, x, seed_, [tap])
            return gradcam_map(acts[tap], grads[tap], reduce="sum", relu=True)

    elif method in ("excitation_bp", "lrp", "rap"):
        from apjax.attribution import folded_net, rap_rule, rules

        family = family_of(model)
        if not family.plain_chain:
            raise ConfigError(
                f"{LABELS[method]} walks a plain conv chain (the VGG family) and a {family.name} model has "
                "none; use gradcam or a gradient method."
            )
        widths = model.widths

        if method == "excitation_bp":

            def fn(v, x, cls):
                return rules.excitation_backprop(folded_net.fold_batchnorm(v, widths), x, cls, read_at=tap)

        elif method == "lrp":

            def fn(v, x, cls):
                return rules.lrp_alpha1beta0(folded_net.fold_batchnorm(v, widths), x, cls)

        else:

            def fn(v, x, cls):
                return rap_rule.rap(folded_net.fold_batchnorm(v, widths), x, cls)

    else:
        from apjax.attribution import gradients

        if method == "gradient":

            def fn(v, x, cls):
                return gradients.gradient_map(model, v, x, cls)

        elif method == "input_x_gradient":

            def fn(v, x, cls):
                return gradients.input_x_gradient_map(model, v, x, cls)

        elif method == "integrated_gradients":

            def fn(v, x, cls):
                return gradients.integrated_gradients_map(model, v, x, cls, steps=ig_steps)

        else:
            key = jax.random.key(seed)

            def fn(v, x, cls):
                return gradients.smoothgrad_map(
                    model, v, x, cls, key, samples=smoothgrad_samples, noise=smoothgrad_noise
                )

    # The weights are an argument, not a constant baked into the compiled program.
    jitted = jax.jit(lambda v, x, cls: fn(v, x, cls).astype(jnp.float32))

    def call(x, cls):
        return jitted(variables, x, cls)

    # Ahead-of-time lowering with these weights (compile time and memory analysis in benchmarks).
    call.lower = lambda x, cls: jitted.lower(variables, x, cls)
    return call
