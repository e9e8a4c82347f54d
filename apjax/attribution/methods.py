"""Every attribution method of the evaluation in one registry (SPEC section 7).

:data:`ATTRIBUTION_METHODS` maps a method's name to its :class:`AttributionMethod`: its label in tables and
its ``build(model, options) -> map_fn``, where ``map_fn(variables, x (B, H, W, 3), class_index int (B,),
example_id int (B,)) -> (B, h, w)`` is the attribution of each image for its class, with the model in
eval mode (not jitted: the evaluators compose it into their own sharded programs): the gradient and
rule-based methods start from a one-hot seed on that class's logit; RISE and occlusion read only the
model's class probabilities (black-box, :mod:`apjax.attribution.perturbation`). ``example_id`` names
each example (the evaluation passes ``image * K + class``) for methods that draw noise (SmoothGrad folds
it into its key), so a pair's map does not depend on the batch it is computed in. Maps come at their
method's own resolution (Grad-CAM and Excitation Backprop at the Grad-CAM tap, the others at the input);
the evaluation resizes them bilinearly to the input size.

Adding a method is one entry; validation, the configs, the sweep and the report read
:func:`attribution_methods` and :func:`method_label`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from apjax.attribution import gradients, perturbation, rules
from apjax.attribution.maps import gradcam_map
from apjax.errors import ConfigError
from apjax.models import family_of, tap_gradients

MapFn = Callable[[Mapping[str, Any], jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodOptions:
    """The methods' settings.

    Integrated Gradients' ``ig_steps``; SmoothGrad's ``smoothgrad_samples`` and ``smoothgrad_noise``; RISE's
    ``rise_masks`` (N), ``rise_cells`` (s), ``rise_keep`` (p) and ``rise_chunk`` (masks per forward pass,
    dividing N); occlusion's ``occlusion_size`` and ``occlusion_stride`` in pixels (None: an eighth of the
    image's shorter side, rounded up, and half the patch, rounded up) and ``occlusion_baseline``; ``seed``
    keys SmoothGrad's noise and RISE's masks.

    RISE's own code uses N = 6000, s = 8, p = 0.1 at 224 px; the default N = 1000 keeps s and p and costs a
    sixth of the forward passes (1000 per map), a CPU-sized choice: at N = 1000 a map's Monte-Carlo error
    per pixel is about 2.4 times that at 6000 (it falls as 1 / sqrt(N)).
    """

    ig_steps: int = 32
    smoothgrad_samples: int = 16
    smoothgrad_noise: float = 0.15
    rise_masks: int = 1000
    rise_cells: int = 8
    rise_keep: float = 0.1
    rise_chunk: int = 50
    occlusion_size: int | None = None
    occlusion_stride: int | None = None
    occlusion_baseline: float = 0.0
    seed: int = 0

    def __post_init__(self):
        counts = ("ig_steps", "smoothgrad_samples", "rise_masks", "rise_cells", "rise_chunk")
        bad = [f"{k}={getattr(self, k)}" for k in counts if getattr(self, k) < 1]
        bad += [f"{k}={getattr(self, k)}" for k in ("occlusion_size", "occlusion_stride")
                if getattr(self, k) is not None and getattr(self, k) < 1]  # fmt: skip
        if bad:
            raise ConfigError(f"attribution method options {bad} must be at least 1.")
        if not 0 < self.rise_keep <= 1:
            raise ConfigError(f"rise_keep={self.rise_keep} is RISE's keep probability; choose one in (0, 1].")
        if self.rise_masks % self.rise_chunk:
            raise ConfigError(
                f"rise_masks={self.rise_masks} does not split into chunks of rise_chunk={self.rise_chunk}; "
                "choose a chunk that divides the masks."
            )


def method_options(overrides: Mapping[str, Any] | None = None, **settings) -> MethodOptions:
    """:class:`MethodOptions` of ``settings`` updated by ``overrides`` (``config.method_options``, eval.py's
    ``--method_options``); strings are converted to the field's type. ``ConfigError`` names an unknown
    field or a value of the wrong type."""
    fields = {f.name: f for f in dataclasses.fields(MethodOptions)}
    values = dict(settings)
    for name, value in dict(overrides or {}).items():
        if name not in fields:
            raise ConfigError(f"unknown attribution method option {name!r}; choose from {list(fields)}.")
        default = getattr(MethodOptions(), name)
        kind = float if isinstance(default, float) else int
        if isinstance(value, str):
            if value.lower() == "none" and default is None:
                values[name] = None
                continue
            try:
                value = kind(value)
            except ValueError:
                raise ConfigError(f"attribution method option {name}={value!r} is not a number.") from None
        values[name] = value
    return MethodOptions(**values)


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


def probabilities_of(predict: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """A model answering with logits, ``predict(x (M, H, W, 3)) -> (M, K)``, as a black box of class
    probabilities, sigmoid of the logits in float32: what RISE and occlusion read, and all they read."""
    return lambda images: jax.nn.sigmoid(predict(images).astype(jnp.float32))


def occlusion_patch(o: MethodOptions, height: int, width: int) -> tuple[int, int]:
    """Occlusion's (size, stride) in pixels for ``height x width`` inputs: the options' or their
    defaults (an eighth of the shorter side, rounded up; half the patch, rounded up)."""
    size = o.occlusion_size or -(-min(height, width) // 8)
    return size, o.occlusion_stride or -(-size // 2)


def black_box_map(
    method: str,
    probabilities: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    cls: jax.Array,
    o: MethodOptions,
) -> jax.Array:
    """``method``'s (``'rise'`` or ``'occlusion'``) map (B, H, W) of each image ``x`` (B, H, W, 3) for its
    class ``cls`` (B,), from ``probabilities`` alone, with the settings ``o``. RISE's masks come from
    ``fold_in(key(o.seed), 1)``: the same masks for every image and batch."""
    if method == "rise":
        key = jax.random.fold_in(jax.random.key(o.seed), 1)
        masks = perturbation.rise_masks(key, o.rise_masks, x.shape[1], x.shape[2], o.rise_cells, o.rise_keep)
        return perturbation.rise_map(probabilities, x, cls, masks, o.rise_keep, o.rise_chunk)
    size, stride = occlusion_patch(o, x.shape[1], x.shape[2])
    return perturbation.occlusion_map(probabilities, x, cls, size, stride, o.occlusion_baseline)


def _black_box(method: str):
    def build(model, o: MethodOptions) -> MapFn:
        def fn(v, x, cls, ids):
            return black_box_map(method, probabilities_of(lambda images: model.apply(v, images)), x, cls, o)

        return fn

    return build


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
    "rise": AttributionMethod("RISE", _black_box("rise")),
    "occlusion": AttributionMethod("Occlusion", _black_box("occlusion")),
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
    options = MethodOptions(
        ig_steps=ig_steps, smoothgrad_samples=smoothgrad_samples, smoothgrad_noise=smoothgrad_noise, seed=seed
    )
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
