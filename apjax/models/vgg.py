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

Each tap is exposed through Flax's intermediates (:func:`apjax.models.taps.tap`: ``perturb`` for
gradients, ``sow`` for the activation); a call returns the logits alone. The module also holds the VGG
family's record (:data:`FAMILY`: named variants ``vgg16``, ``vgg16/2`` ..., widths lists, students) and the
import of torchvision ``vgg16_bn`` weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from apjax.errors import ConfigError
from apjax.models.family import ModelFamily
from apjax.models.taps import tap
from apjax.models.torch_import import take_entry

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
    """VGG with BN and a Dropout + Dense head; taps at every conv (after ReLU) and pool.

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

    @property
    def tap_names(self) -> tuple[str, ...]:
        """Every tap, in forward order (see :func:`tap_names`)."""
        return tap_names(self.widths)

    @property
    def gradcam_tap(self) -> str:
        """The Grad-CAM layer: the last conv (``conv5_3`` for VGG16)."""
        return [t for t in self.tap_names if t.startswith("conv")][-1]

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Forward pass: images float (B, H, W, 3), normalised -> logits float32 (B, num_classes).

        ``train``: batch statistics and dropout on (True) or running statistics, no dropout (False). Every
        conv output after its ReLU and every pool output is exposed as a tap (:func:`apjax.models.taps.tap`).
        """
        x = x.astype(self.dtype)
        names = iter(tap_names(self.widths))
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
            x = tap(self, name, x)
        x = x.reshape(x.shape[0], -1)  # (H, W, C) order
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        inits = layer_inits(self.weight_init, x.shape[-1], "dense")
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head", **inits)(x)
        # float32 logits under bfloat16 computation; float64 stays float64 (finite-difference tests).
        return logits.astype(jnp.promote_types(self.dtype, jnp.float32))


# ------------------------------------------------------------------------------------------------
# The family: named variants, construction, students.
# ------------------------------------------------------------------------------------------------


def _divide(widths: Sequence[int | str], d: int) -> tuple:
    return tuple(w if w == "M" else max(1, int(w) // d) for w in widths)


VARIANTS: dict[str, tuple] = {
    "vgg16": VGG16_WIDTHS,
    "vgg16/2": _divide(VGG16_WIDTHS, 2),
    "vgg16/4": _divide(VGG16_WIDTHS, 4),
    "vgg16/8": _divide(VGG16_WIDTHS, 8),
}


def variant_widths(name: str) -> tuple:
    """The widths of a named variant (``'vgg16/8'``) or of an explicit list (``'8,8,M,16,M'``).

    ``ConfigError`` listing the choices for an unknown name or a malformed list.
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


def create_vgg(
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


def vgg_student(spec: str, divisor: int) -> str:
    """The widths list of a student: every conv width of ``spec`` divided by ``divisor`` (at least 1)."""
    return widths_string(_divide(variant_widths(spec), divisor))


# ------------------------------------------------------------------------------------------------
# torchvision vgg16_bn weight import.
# ------------------------------------------------------------------------------------------------


def torchvision_conv_indices(widths: Sequence[int | str]) -> tuple[int, ...]:
    """Index of each conv in torchvision's ``features`` Sequential for VGG with BN: each conv takes three
    slots (Conv2d, BatchNorm2d, ReLU) and each pool one, so VGG16's convs sit at ``features.{0,3,7,...}``."""
    indices, i = [], 0
    for w in widths:
        if w == "M":
            i += 1
        else:
            indices.append(i)
            i += 3
    return tuple(indices)


def import_torchvision_vgg_bn(
    state_dict: Mapping[str, np.ndarray],
    variables: Mapping[str, Any],
    widths: Sequence[int | str],
    head_prefix: str | None = None,
) -> dict[str, Any]:
    """Copies torchvision VGG-BN weights into apjax variables.

    Layouts: conv kernels OIHW -> HWIO; Dense (out, in) -> (in, out). torchvision flattens the last map in
    (C, H, W) order and apjax (NHWC) in (H, W, C) order, so an imported head has its input rows permuted.

    Args:
      state_dict: torch-layout arrays (``features.{i}.weight`` ...), e.g. from
        :func:`apjax.models.torch_import.load_state_dict`.
      variables: initialised ``{'params', 'batch_stats'}`` of a VGG with these ``widths``; they fix
        the expected shapes, and the head is kept from them unless ``head_prefix`` is given.
      widths: the model's widths.
      head_prefix: state-dict prefix of a single Linear head to import too (e.g. ``'classifier.1'``
        for a Dropout + Linear classifier); None keeps the new head of ``variables``.

    Returns:
      New variables with the imported weights (float32).
    """
    params = jax.tree.map(np.asarray, dict(variables["params"]))
    stats = jax.tree.map(np.asarray, dict(variables["batch_stats"]))
    for name, idx in zip(conv_names(widths), torchvision_conv_indices(widths), strict=True):
        k = params[name]["kernel"].shape  # (3, 3, in, out)
        c = (k[3],)
        params[name] = {
            "kernel": take_entry(state_dict, f"features.{idx}.weight", (k[3], k[2], k[0], k[1])).transpose(
                2, 3, 1, 0
            ),
            "bias": take_entry(state_dict, f"features.{idx}.bias", c),
        }
        bn = f"features.{idx + 1}"
        params[f"{name}_bn"] = {
            "scale": take_entry(state_dict, f"{bn}.weight", c),
            "bias": take_entry(state_dict, f"{bn}.bias", c),
        }
        stats[f"{name}_bn"] = {
            "mean": take_entry(state_dict, f"{bn}.running_mean", c),
            "var": take_entry(state_dict, f"{bn}.running_var", c),
        }
    if head_prefix is not None:
        params["head"] = _import_head(state_dict, params["head"]["kernel"].shape, widths, head_prefix)
    to_jax = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)  # noqa: E731
    return {"params": to_jax(params), "batch_stats": to_jax(stats)}


def _import_head(state_dict, kernel_shape, widths, prefix: str) -> dict[str, np.ndarray]:
    """A torch Linear head (out, C*H*W in (C, H, W) order) as apjax's (H*W*C in (H, W, C) order, out)."""
    fan_in, k = kernel_shape
    channels = next(int(w) for w in reversed(list(widths)) if w != "M")
    side = int(round((fan_in // channels) ** 0.5))
    if side * side * channels != fan_in:
        raise ConfigError(f"the head's input size {fan_in} is not C x H x H for C={channels}.")
    w = take_entry(state_dict, f"{prefix}.weight", (k, fan_in))
    w = w.reshape(k, channels, side, side).transpose(2, 3, 1, 0).reshape(fan_in, k)
    return {"kernel": w, "bias": take_entry(state_dict, f"{prefix}.bias", (k,))}


FAMILY = ModelFamily(
    name="vgg",
    module=VGG,
    recognizes=lambda spec: spec.startswith("vgg") or "," in spec,
    build=create_vgg,
    check_input=lambda model, image_size: check_input_size(model.widths, image_size),
    student=vgg_student,
    import_weights=lambda sd, variables, model: import_torchvision_vgg_bn(sd, variables, model.widths),
    plain_chain=True,
    examples=("vgg16", "vgg16/8", "8,8,M,16,M"),
)
