"""Quantized models: the quantization schemes and a model with quantization-aware training through qwix.

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
straight-through backward pass. What a deployed model stores is counted in
:mod:`apjax.compress.quantize`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import ml_collections
import qwix

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
