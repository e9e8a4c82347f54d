"""Quantization of a model (issue 15 part 2): quantization-aware training through qwix, and model sizes.

A scheme (``config.quant.bits``) names what is quantized, and how, in :data:`QUANT_SCHEMES`:

- ``int8``: int8 weights AND int8 activations (the input of every conv and of the Dense head);
- ``int4w``: int4 weights, float activations (weight-only).

Weights: symmetric, one scale per output channel, absmax calibration (qwix's default: the scale is
``max |w| / (qmax + 0.5)``, values rounded and clipped to ``[-2^(b-1), 2^(b-1) - 1]``). Activations
(``int8``): symmetric, absmax, computed on the fly per image (qwix's dynamic-range quantization, its
default in XLA), so an image's output does not depend on the batch it is in. Conv biases, BatchNorm and
the head's bias stay float32.

:func:`quantize_model` wraps any Flax model of apjax with ``qwix.quantize_model(model,
qwix.QtProvider([qwix.QtRule(...)]))``: every ``jax.lax.conv_general_dilated`` and ``jax.lax.dot_general``
inside the model's modules is intercepted and replaced by qwix's quantized-training op (fake quantization
in the forward pass, a custom VJP behind it). The parameters stay the float "latent" weights that
training updates; the model's class is a subclass of the original, so its taps, ``tap_names``,
``gradcam_tap`` and family carry over. Gradients (qwix's custom VJPs, straight-through):

- conv: the backward pass uses the QUANTIZED residuals (int weights and int activations times their
  scales): d out / d input uses the int weights, d out / d weight the quantized input; rounding counts as
  the identity (straight-through). Those integer residuals are constants to a second derivative: the
  gradient of a tap gradient with respect to a conv's weights reaches them through their scales only;
- Dense head: qwix keeps the ORIGINAL float residuals when only the forward pass is quantized, so d logit /
  d input uses the float head weights (which differ from the int ones by at most half a step).

So tap gradients (and the SWA maps built on them) run through the quantized forward pass with qwix's
straight-through backward pass. :func:`model_size_bytes` counts what a deployed model stores.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import qwix
from flax import traverse_util

from apjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """One quantization scheme: weight type and bits, activation type (None: float activations)."""

    label: str
    weight_qtype: str
    weight_bits: int
    act_qtype: str | None


QUANT_SCHEMES: dict[str, QuantScheme] = {
    "int8": QuantScheme("int8 weights + int8 activations", "int8", 8, "int8"),
    "int4w": QuantScheme("int4 weights (float activations)", "int4", 4, None),
}
FLOAT_BYTES = 4  # a float32 scale per output channel of every quantized kernel


def scheme(bits: str) -> QuantScheme:
    """The scheme named ``bits``; ``ConfigError`` (one sentence) for an unknown name."""
    if bits not in QUANT_SCHEMES:
        raise ConfigError(f"unknown config.quant.bits {bits!r}; choose one of {list(QUANT_SCHEMES)}.")
    return QUANT_SCHEMES[bits]


def quant_bits_of(config: ml_collections.ConfigDict) -> str | None:
    """The scheme of a run's config (``config.quant.bits``), or None for a float run."""
    quant = config.get("quant")
    return quant.bits if quant else None


def qt_rules(bits: str) -> list[qwix.QtRule]:
    """qwix's quantized-training rules of a scheme: every module (``module_path='.*'``), every conv and
    dot_general in it."""
    s = scheme(bits)
    return [qwix.QtRule(module_path=".*", weight_qtype=s.weight_qtype, act_qtype=s.act_qtype)]


def quantize_model(model: nn.Module, bits: str) -> nn.Module:
    """``model`` with quantization-aware training of scheme ``bits`` (qwix's ``QtProvider``); the same
    variables (float latent weights, BatchNorm statistics) apply to both."""
    return qwix.quantize_model(model, qwix.QtProvider(qt_rules(bits)))


def is_quantized_kernel(path: tuple[str, ...], leaf: Any) -> bool:
    """Whether a parameter is a kernel that the scheme quantizes: every conv kernel (4-D) and Dense kernel
    (2-D) named ``kernel``; biases and BatchNorm stay float."""
    return path[-1] == "kernel" and np.ndim(leaf) in (2, 4)


def model_size_bytes(variables: Mapping[str, Any], bits: str | None) -> dict[str, int]:
    """What a model stores, in bytes: ``size_bytes`` (each quantized kernel packed at its bits, plus one
    float32 scale per output channel; every other parameter and BatchNorm statistic as stored, float32),
    ``float_size_bytes`` (everything as stored, unquantized) and ``quantized_weights`` (the number of
    quantized kernel entries). ``bits`` None: a float model (``size_bytes`` = ``float_size_bytes``).

    ``variables``: ``{'params': ..., 'batch_stats': ...}`` of the model.
    """
    wbits = scheme(bits).weight_bits if bits else None
    size = floats = quantized = 0
    for collection in ("params", "batch_stats"):
        tree = dict(variables.get(collection) or {})
        for path, leaf in traverse_util.flatten_dict(tree).items():
            n, stored = int(np.size(leaf)), int(np.size(leaf)) * jax.numpy.dtype(leaf.dtype).itemsize
            floats += stored
            if wbits and collection == "params" and is_quantized_kernel(path, leaf):
                size += math.ceil(n * wbits / 8) + FLOAT_BYTES * int(np.shape(leaf)[-1])
                quantized += n
            else:
                size += stored
    return {"size_bytes": size, "float_size_bytes": floats, "quantized_weights": quantized}
