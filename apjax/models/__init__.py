"""The VGG family: named variants, construction, initialisation and parameter counts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from apjax.errors import ConfigError
from apjax.models.taps import tap_gradients, tap_shapes, top1_seed
from apjax.models.vgg import (
    INITS,
    VGG,
    VGG16_WIDTHS,
    check_input_size,
    conv_names,
    feature_size,
    tap_names,
)


def _divide(widths: Sequence[int | str], d: int) -> tuple:
    return tuple(w if w == "M" else int(w) // d for w in widths)


VARIANTS: dict[str, tuple] = {
    "vgg16": VGG16_WIDTHS,
    "vgg16/2": _divide(VGG16_WIDTHS, 2),
    "vgg16/4": _divide(VGG16_WIDTHS, 4),
    "vgg16/8": _divide(VGG16_WIDTHS, 8),
}


def variant_widths(name: str) -> tuple:
    """The widths of a named variant (``'vgg16/8'``) or of an explicit list (``'8,8,M,16,M'``).

    ``ValueError`` listing the choices for an unknown name or a malformed list.
    """
    if "," in name:
        items = [w.strip() for w in name.split(",")]
        if all(w == "M" or w.isdigit() and int(w) > 0 for w in items) and any(w != "M" for w in items):
            return tuple(w if w == "M" else int(w) for w in items)
        raise ConfigError(f"model {name!r} is not a list of positive conv widths and 'M' pools.")
    if name not in VARIANTS:
        raise ConfigError(
            f"unknown model {name!r}; choose one of {sorted(VARIANTS)} or give widths like '8,8,M,16,M'."
        )
    return VARIANTS[name]


def widths_string(widths) -> str:
    """The config form of a widths list: ``(8, 8, 'M')`` -> ``'8,8,M'``."""
    return ",".join(str(w) for w in widths)


def create_model(
    model: str | Sequence[int | str],
    num_classes: int = 20,
    dtype: Any = jnp.float32,
    dropout_rate: float = 0.5,
    init: str = "pytorch_default",
) -> VGG:
    """A :class:`VGG` from a variant name (``'vgg16/8'``) or an explicit widths list; ``init`` is the
    weight initialisation, ``'pytorch_default'`` (the reference's) or ``'torchvision'``."""
    widths = variant_widths(model) if isinstance(model, str) else tuple(model)
    for w in widths:
        if w != "M" and (not isinstance(w, int) or w < 1):
            raise ConfigError(f"widths must be positive integers or 'M', got {w!r} in {widths}.")
    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}; choose one of {list(INITS)}.")
    return VGG(
        widths=widths, num_classes=num_classes, dtype=dtype, dropout_rate=dropout_rate, weight_init=init
    )


def init_variables(model: VGG, key: jax.Array, image_size: int) -> dict[str, Any]:
    """``{'params', 'batch_stats'}`` for square inputs of side ``image_size`` (checked against the pools)."""
    check_input_size(model.widths, image_size)
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = jax.jit(lambda k: model.init(k, x))(key)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def count_params(params: Any) -> int:
    """Number of trainable parameters (BN running statistics excluded, as torch counts them)."""
    return sum(int(p.size) for p in jax.tree.leaves(params))


__all__ = [
    "INITS",
    "VARIANTS",
    "VGG",
    "VGG16_WIDTHS",
    "check_input_size",
    "conv_names",
    "count_params",
    "create_model",
    "feature_size",
    "init_variables",
    "tap_gradients",
    "tap_names",
    "tap_shapes",
    "top1_seed",
    "variant_widths",
    "widths_string",
]
