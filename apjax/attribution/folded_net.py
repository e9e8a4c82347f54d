"""The VGG as a plain layer list in eval mode, every BatchNorm folded into its conv, and its forward pass.

The rules of :mod:`apjax.attribution.rules` act on this list (:func:`fold_batchnorm`): every conv with its
BatchNorm folded in (exact in eval mode) and a ReLU after it, 2x2 max-pools, and the Dense head on the
(H, W, C)-flattened last map. Dropout is the identity in eval mode. :func:`folded_forward` runs that list and
returns the activations the backward rules need: ``acts[i]`` is the INPUT of ``layers[i]`` (``acts[0]`` is
the image; every later one is a ReLU output or a max-pool of one, hence non-negative).

:func:`fold_batchnorm` returns :class:`FoldedLayer` objects, read-only mappings that are also pytrees whose
``'type'``/``'name'`` are static, so the layer list can be a ``jax.jit`` argument; plain dicts with the
same keys are accepted too (closed over, or outside jit). Computations run in float32, or in float64 where
the inputs or weights are float64. The net's layer names come from :func:`layer_names` alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from apjax.models.vgg import tap_names

BN_EPS = 1e-5
DIMS = ("NHWC", "HWIO", "NHWC")
LAYER_TYPES = ("conv", "pool", "dense")


@jax.tree_util.register_pytree_node_class
class FoldedLayer(Mapping):
    """One layer of the folded net, read like a dict: ``'type'`` (``'conv'``, ``'pool'`` or ``'dense'``),
    ``'name'`` (``conv1_1``, ``pool1``, ..., ``head``) and, for conv and dense, ``'kernel'`` and ``'bias'``.

    A pytree whose leaves are the kernel and bias (type and name are static auxiliary data), so a list of
    these passes through ``jax.jit``, ``jax.tree.map`` and friends.
    """

    __slots__ = ("_type", "_name", "_kernel", "_bias")

    def __init__(self, type_: str, name: str, kernel: Any = None, bias: Any = None):
        if type_ not in LAYER_TYPES:
            raise ValueError(f"unknown layer type {type_!r}; choose one of {list(LAYER_TYPES)}.")
        if (type_ == "pool") != (kernel is None and bias is None):
            raise ValueError(f"a {type_} layer {'has no' if type_ == 'pool' else 'needs a'} kernel and bias.")
        self._type, self._name, self._kernel, self._bias = type_, name, kernel, bias

    def _keys(self) -> tuple[str, ...]:
        return ("type", "name") if self._type == "pool" else ("type", "name", "kernel", "bias")

    def __getitem__(self, key: str) -> Any:
        values = {"type": self._type, "name": self._name, "kernel": self._kernel, "bias": self._bias}
        if key not in self._keys():
            raise KeyError(key)
        return values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def __repr__(self) -> str:
        if self._type == "pool":
            return f"FoldedLayer('pool', {self._name!r})"
        shape = getattr(self._kernel, "shape", None)
        return f"FoldedLayer({self._type!r}, {self._name!r}, kernel shape {shape})"

    def tree_flatten(self):
        children = () if self._type == "pool" else (self._kernel, self._bias)
        return children, (self._type, self._name)

    @classmethod
    def tree_unflatten(cls, aux, children):
        # No validation: JAX may rebuild the node with placeholder leaves (None, sentinels).
        layer = object.__new__(cls)
        kernel, bias = children if children else (None, None)
        layer._type, layer._name, layer._kernel, layer._bias = *aux, kernel, bias
        return layer


def conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 conv, stride 1, zero padding 1, NHWC x HWIO, no bias (as ``nn.Conv(..., padding=1)``)."""
    return jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (1, 1), ((1, 1), (1, 1)), dimension_numbers=DIMS
    )


def pool(x: jax.Array) -> jax.Array:
    """Max-pool 2x2, stride 2, 'VALID' (as ``nn.max_pool(x, (2, 2), strides=(2, 2))``)."""
    # A Python -inf (not an array) lets lax recognise the max monoid, which has a VJP.
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def compute_dtype(x: jax.Array, layers: Sequence[Mapping[str, Any]]) -> Any:
    """float32, or float64 where the input or a weight is float64."""
    dtypes = [jnp.asarray(x).dtype] + [
        jnp.asarray(ly["kernel"]).dtype for ly in layers if ly["type"] != "pool"
    ]
    return jnp.result_type(jnp.float32, *dtypes)


def check_layers(layers: Sequence[Mapping[str, Any]]) -> None:
    """Raises ``ValueError`` unless ``layers`` starts with a conv and ends with the one dense head."""
    types = [ly["type"] for ly in layers]
    if len(types) < 2 or types[0] != "conv" or types[-1] != "dense" or "dense" in types[:-1]:
        raise ValueError(
            "layers must start with a conv and end with the one dense head (as fold_batchnorm returns); "
            f"got types {types}."
        )
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(f"unknown layer types {unknown}; choose from {list(LAYER_TYPES)}.")


def layer_names(widths: Sequence[int | str]) -> Sequence[str]:
    """The names of the layers below the head, one per entry of ``widths`` (``conv1_1``, ``pool1``, ...).

    The one place where the rules learn the net's layer list.
    """
    return tap_names(widths)


def fold_batchnorm(variables: Mapping[str, Any], widths: Sequence[int | str], eps: float = BN_EPS) -> list:
    """The VGG as a plain layer list in eval mode, each BatchNorm folded into its conv (exact).

    With ``g = scale / sqrt(var + eps)`` per output channel: ``W' = W * g`` and
    ``b' = (b - mean) * g + bn_bias``, so ``W' * x + b' = BN(W * x + b)`` with the running statistics.

    Args:
      variables: ``{'params': ..., 'batch_stats': ...}`` of a :class:`~apjax.models.vgg.VGG`.
      widths: the net's widths (``model.widths``).
      eps: BatchNorm's epsilon (1e-5 in the VGG).

    Returns:
      A list of :class:`FoldedLayer` in forward order, e.g. ``[conv conv1_1 (kernel (3, 3, 3, C), bias (C,)),
      ..., pool pool1, ..., dense head (kernel (h*w*C, K), bias (K,))]``; a ReLU is implied after each conv.
      Works on traced variables (inside ``jax.jit``).
    """
    params, stats = variables["params"], variables["batch_stats"]
    layers = []
    for name, w in zip(layer_names(widths), widths, strict=True):
        if w == "M":
            layers.append(FoldedLayer("pool", name))
            continue
        kernel, bias = jnp.asarray(params[name]["kernel"]), jnp.asarray(params[name]["bias"])
        if kernel.shape[-1] != int(w):
            raise ValueError(f"{name}: kernel has {kernel.shape[-1]} output channels, widths say {w}.")
        dtype = jnp.result_type(jnp.float32, kernel.dtype)
        bn, st = params[f"{name}_bn"], stats[f"{name}_bn"]
        g = jnp.asarray(bn["scale"], dtype) / jnp.sqrt(jnp.asarray(st["var"], dtype) + eps)
        folded_bias = (bias.astype(dtype) - jnp.asarray(st["mean"], dtype)) * g + jnp.asarray(
            bn["bias"], dtype
        )
        layers.append(FoldedLayer("conv", name, kernel.astype(dtype) * g, folded_bias))
    head = params["head"]
    layers.append(FoldedLayer("dense", "head", jnp.asarray(head["kernel"]), jnp.asarray(head["bias"])))
    return layers


def folded_forward(layers: Sequence[Mapping[str, Any]], x: jax.Array, return_activations: bool = False):
    """Plain forward pass of the folded net; equals ``model.apply(variables, x)`` in eval mode.

    Args:
      layers: from :func:`fold_batchnorm`.
      x: images (B, H, W, 3), normalised.
      return_activations: also return the list of layer inputs.

    Returns:
      logits (B, K); with ``return_activations``, ``(logits, acts)`` where ``acts[i]`` is the input of
      ``layers[i]`` (``acts[0] = x``; ``acts[-1]`` the last map (B, h, w, C) before flattening).
    """
    check_layers(layers)
    dtype = compute_dtype(x, layers)
    h = jnp.asarray(x, dtype)
    acts = []
    for layer in layers:
        acts.append(h)
        if layer["type"] == "conv":
            h = jax.nn.relu(conv(h, layer["kernel"]) + layer["bias"].astype(dtype))
        elif layer["type"] == "pool":
            h = pool(h)
        else:
            h = h.reshape(h.shape[0], -1) @ layer["kernel"].astype(dtype) + layer["bias"].astype(dtype)
    return (h, acts) if return_activations else h
