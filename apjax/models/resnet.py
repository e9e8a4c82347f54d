"""The ResNet family (He et al. 2016) in torchvision's layout: ResNet-18 (basic blocks) and ResNet-50
(bottlenecks, stride on the 3x3 conv as in torchvision's "v1.5"), BatchNorm, global average pooling and a
Dense head of ``num_classes`` outputs; width-divided students.

Layout, as torchvision builds it: ``conv1`` (7x7, stride 2, padding 3, no bias) -> ``bn1`` -> ReLU ->
max-pool (3x3, stride 2, padding 1) -> ``layer1 .. layer4`` (2, 2, 2, 2 basic blocks or 3, 4, 6, 3
bottlenecks of base widths 64, 128, 256, 512 times ``1 / divisor``; the first block of layers 2-4 has
stride 2, and a block whose stride or width changes has a 1x1 conv + BN ``downsample`` shortcut) ->
global average pool -> ``head`` (torchvision's ``fc``). Convs have no bias; every BN is followed by the
residual sum and/or a ReLU as in torchvision. Parameter counts with a 20-way head: ResNet-18
11,186,772, ResNet-50 23,549,012 (torchvision's 11,689,512 and 25,557,032 with 1000 classes).

Named taps, the outputs of every stage: ``stem`` (after the max-pool), ``layer1`` .. ``layer4`` (each
after its last block's ReLU; ``layer4`` is the Grad-CAM layer, 7x7 at 224x224) and ``pool`` (the global
average, (B, 1, 1, C)), exposed through Flax's intermediates (:func:`apjax.models.taps.tap`); a call
returns the logits alone. :data:`FAMILY` is the family's record: the tasks, configs and the sweep build
a ResNet from ``config.model = 'resnet18'``, ``'resnet50/4'`` ... like any VGG.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from apjax.errors import ConfigError
from apjax.models.family import ModelFamily
from apjax.models.taps import tap
from apjax.models.torch_import import take_entry
from apjax.models.vgg import INITS, layer_inits

# depth -> (block kind, blocks per stage); the stage base widths are 64, 128, 256, 512.
DEPTHS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    50: ("bottleneck", (3, 4, 6, 3)),
}
BASE_WIDTHS = (64, 128, 256, 512)
EXPANSION = {"basic": 1, "bottleneck": 4}
TAPS = ("stem", "layer1", "layer2", "layer3", "layer4", "pool")
GRADCAM_TAP = "layer4"


def parse_resnet(name: str) -> tuple[int, int]:
    """``'resnet50/4'`` -> (50, 4): the depth and the width divisor (1 without a suffix)."""
    base, _, div = name.partition("/")
    depth = base.removeprefix("resnet")
    if not (base.startswith("resnet") and depth.isdigit() and int(depth) in DEPTHS):
        raise ConfigError(f"unknown ResNet {name!r}; choose resnet18 or resnet50, optionally /2, /4 or /8.")
    if div and not (div.isdigit() and int(div) >= 1):
        raise ConfigError(f"the width divisor of {name!r} must be a positive integer, like resnet18/4.")
    return int(depth), int(div or 1)


def _conv_init(weight_init: str, fan_in: int) -> dict[str, Any]:
    """The kernel init of a bias-free conv: torch's default, or torchvision ResNet's kaiming normal."""
    if weight_init == "torchvision":
        return {"kernel_init": nn.initializers.variance_scaling(2.0, "fan_out", "normal")}
    return {"kernel_init": layer_inits(weight_init, fan_in, "conv")["kernel_init"]}


class _ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm, torchvision's ``convK`` + ``bnK`` pair (ReLU left to the caller)."""

    features: int
    kernel: int
    stride: int
    dtype: Any
    weight_init: str

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        pad = self.kernel // 2
        init = _conv_init(self.weight_init, self.kernel * self.kernel * x.shape[-1])
        x = nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            dtype=self.dtype,
            name="conv",
            **init,
        )(x)
        return nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name="bn"
        )(x)


class _Block(nn.Module):
    """A basic block (two 3x3) or a bottleneck (1x1, 3x3 with the stride, 1x1 to 4x the width)."""

    kind: str
    width: int
    stride: int
    dtype: Any
    weight_init: str

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        out_width = self.width * EXPANSION[self.kind]
        cb = lambda f, k, s, n: _ConvBN(f, k, s, self.dtype, self.weight_init, name=n)  # noqa: E731
        if self.kind == "basic":
            y = nn.relu(cb(self.width, 3, self.stride, "conv1")(x, train))
            y = cb(self.width, 3, 1, "conv2")(y, train)
        else:
            y = nn.relu(cb(self.width, 1, 1, "conv1")(x, train))
            y = nn.relu(cb(self.width, 3, self.stride, "conv2")(y, train))
            y = cb(out_width, 1, 1, "conv3")(y, train)
        if self.stride != 1 or x.shape[-1] != out_width:
            x = cb(out_width, 1, self.stride, "downsample")(x, train)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """ResNet-18/50 in torchvision's layout, returning the logits and the requested taps.

    Attributes:
      depth: 18 or 50.
      divisor: every width (stem and stages) divided by this (students: 2, 4, 8).
      num_classes: outputs of the head (20 for VOC).
      dropout_rate: dropout before the head (torchvision has none: 0 by default).
      dtype: computation dtype; parameters stay float32.
      weight_init: ``'pytorch_default'`` (torch's default layer init everywhere) or ``'torchvision'``
        (ResNet's kaiming-normal convs; the head keeps torch's default, as torchvision's ``fc`` does).
    """

    depth: int = 18
    divisor: int = 1
    num_classes: int = 20
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    weight_init: str = "pytorch_default"

    @property
    def tap_names(self) -> tuple[str, ...]:
        """Every tap, in forward order: ``stem``, ``layer1`` .. ``layer4``, ``pool``."""
        return TAPS

    @property
    def gradcam_tap(self) -> str:
        """The Grad-CAM layer: the last stage, ``layer4``."""
        return GRADCAM_TAP

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Forward pass: images float (B, H, W, 3) -> logits (B, num_classes); the stage outputs are taps
        (:func:`apjax.models.taps.tap`)."""
        kind, blocks = DEPTHS[self.depth]

        x = x.astype(self.dtype)
        stem = max(1, 64 // self.divisor)
        x = nn.relu(_ConvBN(stem, 7, 2, self.dtype, self.weight_init, name="stem")(x, train))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        x = tap(self, "stem", x)
        for s, (n, base) in enumerate(zip(blocks, BASE_WIDTHS, strict=True), start=1):
            width = max(1, base // self.divisor)
            for b in range(n):
                stride = 2 if (b == 0 and s > 1) else 1
                x = _Block(kind, width, stride, self.dtype, self.weight_init, name=f"layer{s}_{b}")(x, train)
            x = tap(self, f"layer{s}", x)
        x = tap(self, "pool", jnp.mean(x, axis=(1, 2), keepdims=True))
        x = x.reshape(x.shape[0], -1)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        inits = layer_inits("pytorch_default", x.shape[-1], "dense")
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head", **inits)(x)
        return logits.astype(jnp.promote_types(self.dtype, jnp.float32))


def create_resnet(
    name: str,
    num_classes: int = 20,
    dtype: Any = jnp.float32,
    dropout_rate: float = 0.0,
    init: str = "pytorch_default",
) -> ResNet:
    """A :class:`ResNet` from a name: ``'resnet18'``, ``'resnet50'``, or a student ``'resnet18/4'``."""
    depth, divisor = parse_resnet(name)
    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}; choose one of {list(INITS)}.")
    return ResNet(
        depth=depth, divisor=divisor, num_classes=num_classes, dropout_rate=dropout_rate, dtype=dtype,
        weight_init=init,
    )  # fmt: skip


def check_resnet_input(model: ResNet, image_size: int) -> None:
    """Raises ``ConfigError`` for images smaller than 32 pixels (the net halves them five times)."""
    if image_size < 32:
        raise ConfigError(f"image_size={image_size} is too small for a ResNet (5 halvings); use at least 32.")


def resnet_student(spec: str, divisor: int) -> str:
    """``'resnet18'``, 4 -> ``'resnet18/4'`` (a student's divisor multiplies the teacher's)."""
    depth, d = parse_resnet(spec)
    return f"resnet{depth}/{d * divisor}"


# ------------------------------------------------------------------------------------------------
# torchvision weight import.
# ------------------------------------------------------------------------------------------------


def torchvision_resnet_keys(model: ResNet) -> list[tuple[tuple[str, ...], str, str]]:
    """(apjax module path of a conv+BN pair, torchvision conv key prefix, BN key prefix) for every pair."""
    kind, blocks = DEPTHS[model.depth]
    pairs: list[tuple[tuple[str, ...], str, str]] = [(("stem",), "conv1", "bn1")]
    convs = ("conv1", "conv2") if kind == "basic" else ("conv1", "conv2", "conv3")
    for s, n in enumerate(blocks, start=1):
        for b in range(n):
            block = f"layer{s}_{b}"
            for c, conv in enumerate(convs, start=1):
                pairs.append(((block, conv), f"layer{s}.{b}.conv{c}", f"layer{s}.{b}.bn{c}"))
            pairs.append(((block, "downsample"), f"layer{s}.{b}.downsample.0", f"layer{s}.{b}.downsample.1"))
    return pairs


def import_torchvision_resnet(
    state_dict: Mapping[str, np.ndarray],
    variables: Mapping[str, Any],
    model: ResNet,
    head_prefix: str | None = None,
) -> dict[str, Any]:
    """Copies torchvision ResNet weights (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...) into
    ``variables`` of ``model``: conv kernels OIHW -> HWIO, BN weight/bias -> scale/bias and running
    statistics. Shortcut convs are taken where the model has them. The head stays new unless
    ``head_prefix`` (``'fc'``) is given; every shape must match (one-sentence ``ValueError`` otherwise).
    """
    params = jax.tree.map(np.asarray, dict(variables["params"]))
    stats = jax.tree.map(np.asarray, dict(variables["batch_stats"]))

    def node(tree, path):
        for p in path:
            tree = tree[p]
        return tree

    for path, conv, bn in torchvision_resnet_keys(model):
        try:
            p, st = node(params, path), node(stats, path)
        except KeyError:
            continue  # a block without a downsample shortcut
        k = p["conv"]["kernel"].shape  # (kh, kw, in, out)
        c = (k[3],)
        p["conv"] = {
            "kernel": take_entry(state_dict, f"{conv}.weight", (k[3], k[2], k[0], k[1])).transpose(2, 3, 1, 0)
        }
        p["bn"] = {
            "scale": take_entry(state_dict, f"{bn}.weight", c),
            "bias": take_entry(state_dict, f"{bn}.bias", c),
        }
        st["bn"] = {
            "mean": take_entry(state_dict, f"{bn}.running_mean", c),
            "var": take_entry(state_dict, f"{bn}.running_var", c),
        }
    if head_prefix is not None:
        fan_in, k = params["head"]["kernel"].shape
        params["head"] = {
            "kernel": take_entry(state_dict, f"{head_prefix}.weight", (k, fan_in)).T,
            "bias": take_entry(state_dict, f"{head_prefix}.bias", (k,)),
        }
    to_jax = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)  # noqa: E731
    return {"params": to_jax(params), "batch_stats": to_jax(stats)}


FAMILY = ModelFamily(
    name="resnet",
    module=ResNet,
    recognizes=lambda spec: spec.startswith("resnet"),
    build=create_resnet,
    check_input=check_resnet_input,
    student=resnet_student,
    import_weights=import_torchvision_resnet,
    plain_chain=False,
    examples=("resnet18", "resnet50", "resnet18/4"),
)
