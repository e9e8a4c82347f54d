"""The VGG family used by the paper: conv widths from a config, BatchNorm, a Dropout + Dense head.

Layout (SPEC section 2): every entry of ``widths`` is either a number ``c`` (Conv 3x3, padding 1, with bias
-> BatchNorm -> ReLU) or ``"M"`` (MaxPool 2x2, stride 2). The head is Dropout(0.5) -> Dense(num_classes)
on the flattened last map; no FC6/FC7 and no global pooling. Images are NHWC, so the head flattens in
(H, W, C) order (torchvision flattens (C, H, W); see :mod:`apjax.models.torch_import`).

Named taps. Every conv output after its ReLU is a tap named ``conv{b}_{i}`` (block ``b`` counted from 1,
conv ``i`` within the block from 1) and every pool output is ``pool{b}``. For VGG16 at 227x227 the taps
are ``conv1_1 .. conv5_3`` and ``pool1 .. pool5``; ``pool5`` (C x 7 x 7) is the layer the reference
matches and ``conv5_3`` (14 x 14) is the Grad-CAM layer of the evaluation. A pruned net with uneven
widths is the same class with another ``widths`` tuple, so the names carry over.

A call returns the requested taps beside the logits, as big_vision's models return their named
intermediates (jit drops what nobody reads). For gradients, a call also takes
``offsets``, a dict tap name -> array added to that activation: the gradient of any scalar of the logits
with respect to a tap is then one ``jax.grad`` with respect to a zero offset, a pure mechanism with no
extra variable collection (see :func:`apjax.models.taps.tap_gradients`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from apjax.errors import ConfigError
from apjax.models.taps import tap_recorder

VGG16_WIDTHS: tuple = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip

# Two initialisations (SPEC section 2); BN scale 1 and bias 0 in both.
# - "pytorch_default": what torch's Conv2d and Linear do when nothing re-initialises them, as in the
#   reference's VGG class (its students and the teacher's new head): weights kaiming_uniform(a=sqrt(5)),
#   i.e. U(-b, b) with b = sqrt(6 / ((1 + 5) * fan_in)) = 1 / sqrt(fan_in), and biases U(-b, b) too.
# - "torchvision": torchvision's VGG init: kaiming normal (fan_out, ReLU) convs with zero bias, Linear
#   N(0, 0.01) with zero bias.
INITS = ("pytorch_default", "torchvision")


def _uniform_bias(fan_in: int):
    """torch's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def layer_inits(init: str, fan_in: int, kind: str) -> dict[str, Any]:
    """``kernel_init`` and ``bias_init`` of a conv (``kind='conv'``) or the head (``'dense'``) under
    ``init``; ``fan_in`` is the layer's inputs per output (3 * 3 * C_in for a conv)."""
    if init == "pytorch_default":
        return {
            "kernel_init": nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
            "bias_init": _uniform_bias(fan_in),
        }
    if init == "torchvision":
        if kind == "conv":
            return {"kernel_init": nn.initializers.variance_scaling(2.0, "fan_out", "normal")}
        return {"kernel_init": nn.initializers.normal(stddev=0.01)}
    raise ConfigError(f"unknown init {init!r}; choose one of {list(INITS)}.")


def tap_names(widths: Sequence[int | str]) -> tuple[str, ...]:
    """All tap names of a net with these widths, in forward order (convs after ReLU, then pools)."""
    names, block, conv = [], 1, 1
    for w in widths:
        if w == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 1
        else:
            names.append(f"conv{block}_{conv}")
            conv += 1
    return tuple(names)


def conv_names(widths: Sequence[int | str]) -> tuple[str, ...]:
    """The conv layer names (``conv1_1``, ...) in order: also the parameter sub-tree names."""
    return tuple(n for n in tap_names(widths) if n.startswith("conv"))


def feature_size(widths: Sequence[int | str], image_size: int) -> int:
    """Spatial side of the last map for a square input (each pool floors: 227 -> 113 -> ... -> 7)."""
    side = image_size
    for w in widths:
        if w == "M":
            side //= 2
    return side


def check_input_size(widths: Sequence[int | str], image_size: int) -> None:
    """Raises ``ConfigError`` when the image is too small for the net's pools."""
    pools = sum(1 for w in widths if w == "M")
    if feature_size(widths, image_size) < 1:
        raise ConfigError(
            f"image_size={image_size} is too small for a net with {pools} max-pools "
            f"(each halves the map); use an image size of at least {2**pools}."
        )


class VGG(nn.Module):
    """VGG with BN and a Dropout + Dense head, returning the logits and the requested taps.

    Attributes:
      widths: conv widths and ``"M"`` pools, e.g. :data:`VGG16_WIDTHS`.
      num_classes: outputs of the head (20 for VOC).
      dropout_rate: dropout before the head (0.5 in the paper).
      dtype: computation dtype (``jnp.bfloat16`` for mixed precision); parameters stay float32.
      weight_init: ``'pytorch_default'`` (the reference's) or ``'torchvision'`` (see :data:`INITS`).
    """

    widths: Sequence[int | str] = VGG16_WIDTHS
    num_classes: int = 20
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32
    weight_init: str = "pytorch_default"

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        train: bool = False,
        taps: Sequence[str] = (),
        offsets: Mapping[str, jnp.ndarray] | None = None,
    ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        """Forward pass.

        Args:
          x: images, float (B, H, W, 3), normalised.
          train: batch statistics and dropout on (True) or running statistics, no dropout (False).
          taps: names of the activations to return (see :func:`tap_names`).
          offsets: optional dict tap name -> array of that tap's shape, added to the activation there
            (zeros leave the function unchanged; differentiate with respect to them for tap gradients).

        Returns:
          ``(logits, acts)``: logits float32 (B, num_classes) and a dict tap name -> activation
          (B, h, w, c) holding exactly the requested taps.
        """
        known = tap_names(self.widths)
        tap, acts = tap_recorder(known, taps, offsets)

        x = x.astype(self.dtype)
        names = iter(known)
        for w in self.widths:
            name = next(names)
            if w == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            else:
                inits = layer_inits(self.weight_init, 9 * x.shape[-1], "conv")
                x = nn.Conv(int(w), (3, 3), padding=1, dtype=self.dtype, name=name, **inits)(x)
                x = nn.BatchNorm(
                    use_running_average=not train,
                    momentum=0.9,  # torch's momentum 0.1
                    epsilon=1e-5,
                    dtype=self.dtype,
                    name=f"{name}_bn",
                )(x)
                x = nn.relu(x)
            x = tap(name, x)
        x = x.reshape(x.shape[0], -1)  # (H, W, C) order
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        inits = layer_inits(self.weight_init, x.shape[-1], "dense")
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head", **inits)(x)
        # float32 logits under bfloat16 computation; float64 stays float64 (finite-difference tests).
        return logits.astype(jnp.promote_types(self.dtype, jnp.float32)), acts
