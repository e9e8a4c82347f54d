"""Model families and the registry that finds one from ``config.model``.

``FAMILIES`` maps a family's name to its record (:class:`apjax.models.family.ModelFamily`); a new family
is its own module plus one line here. :func:`family_of` finds the family of a ``config.model`` string
(``'vgg16/8'``, ``'8,8,M,16,M'``, ``'resnet50/4'``) and :func:`create_model` builds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from apjax.errors import ConfigError
from apjax.models import resnet, vgg
from apjax.models.family import ModelFamily, conv_kernels
from apjax.models.family import init_variables as _init
from apjax.models.taps import apply_with_taps, tap_gradients, tap_shapes, top1_seed
from apjax.models.vgg import (
    INITS,
    VARIANTS,
    VGG,
    VGG16_WIDTHS,
    check_input_size,
    conv_names,
    feature_size,
    tap_names,
    variant_widths,
    widths_string,
)

FAMILIES: dict[str, ModelFamily] = {
    "vgg": vgg.FAMILY,
    "resnet": resnet.FAMILY,
}


def family_of(model: str | Sequence[int | str] | nn.Module) -> ModelFamily:
    """The family of a ``config.model`` string, of a VGG widths list, or of a built model.

    ``ConfigError`` listing the families and examples when no family recognises it.
    """
    if isinstance(model, nn.Module):
        for family in FAMILIES.values():
            if isinstance(model, family.module):
                return family
        raise ConfigError(f"{type(model).__name__} belongs to no registered model family ({list(FAMILIES)}).")
    if not isinstance(model, str):
        return FAMILIES["vgg"]  # a widths list
    for family in FAMILIES.values():
        if family.recognizes(model):
            return family
    examples = [e for f in FAMILIES.values() for e in f.examples]
    raise ConfigError(
        f"unknown model {model!r}; give a model of one of the families {list(FAMILIES)}, e.g. {examples}."
    )


def create_model(
    model: str | Sequence[int | str],
    num_classes: int = 20,
    dtype: Any = jnp.float32,
    dropout_rate: float | None = None,
    init: str = "pytorch_default",
) -> nn.Module:
    """The model named by ``model`` (a ``config.model`` string, or a VGG widths list) with ``num_classes``
    outputs; ``dropout_rate`` None keeps the family's default (0.5 before VGG's head, none in ResNet)."""
    family = family_of(model)
    kwargs = {} if dropout_rate is None else {"dropout_rate": dropout_rate}
    return family.build(model, num_classes=num_classes, dtype=dtype, init=init, **kwargs)


def init_variables(model: nn.Module, key: jax.Array, image_size: int) -> dict[str, Any]:
    """``{'params', 'batch_stats'}`` for square inputs of side ``image_size`` (checked by the family)."""
    family_of(model).check_input(model, image_size)
    return _init(model, key, image_size)


def count_params(params: Any) -> int:
    """Number of trainable parameters (BN running statistics excluded, as torch counts them)."""
    return sum(int(p.size) for p in jax.tree.leaves(params))


__all__ = [
    "FAMILIES",
    "INITS",
    "VARIANTS",
    "VGG",
    "VGG16_WIDTHS",
    "ModelFamily",
    "apply_with_taps",
    "check_input_size",
    "conv_kernels",
    "conv_names",
    "count_params",
    "create_model",
    "family_of",
    "feature_size",
    "init_variables",
    "tap_gradients",
    "tap_names",
    "tap_shapes",
    "top1_seed",
    "variant_widths",
    "widths_string",
]
