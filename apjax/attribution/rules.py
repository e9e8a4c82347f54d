"""Rule-based attribution on the BN-folded VGG (SPEC section 7): Excitation Backprop, LRP alpha1-beta0, RAP.

The rules act on the network as a plain list of layers (:func:`fold_batchnorm`): every conv with its
BatchNorm folded in (exact in eval mode) and a ReLU after it, 2x2 max-pools, and the Dense head on the
(H, W, C)-flattened last map. Dropout is the identity in eval mode. :func:`folded_forward` runs that list and
returns the activations the backward rules need: ``acts[i]`` is the INPUT of ``layers[i]`` (``acts[0]`` is
the image; every later one is a ReLU output or a max-pool of one, hence non-negative).

Relevance is passed from the output of a layer to its input; a ReLU passes it unchanged (the relevance of a
unit and of its pre-activation are the same number). The backward rules are written with explicit
transposes: ``W^T s`` of a conv is :func:`jax.linear_transpose` of the conv (no forward pass is run for it),
of the Dense head a matrix product, and of a max-pool the VJP of the max-pool, which sends everything to the
one arg-max input of each window (winner-take-all; XLA's select-and-scatter picks a single winner also under
ties, so a pool conserves relevance exactly; the rows and columns that a floor-ing pool drops, e.g. the last
of 227, get nothing).

Division guard (all three methods): ``_safe_div(num, den) = num / den`` where ``|den| > eps`` and ``0``
elsewhere (``eps = 1e-9`` by default): a unit whose denominator is (numerically) zero passes nothing down.
In the z+ family the denominator is ``z+_j = sum_i a_i w+_ij >= 0``; in a bias-free net ``z+_j = 0`` forces
``a_j = 0`` and thus zero relevance at ``j``, so nothing is lost there.

Everything is batched over B and jittable, with ``class_index`` an int array (B,) (a scalar is broadcast).
:func:`fold_batchnorm` returns :class:`FoldedLayer` objects, read-only mappings that are also pytrees whose
``'type'``/``'name'`` are static, so the layer list can be a ``jax.jit`` argument; plain dicts with the
same keys are accepted too (closed over, or outside jit). Computations run in float32, or in float64 where
the inputs or weights are float64.

Pixel bounds of the z^B rule: the normalised image of a pixel value in [0, 1] lies in
``[l_c, h_c] = [(0 - mean_c) / std_c, (1 - mean_c) / std_c]`` per channel (:data:`PIXEL_LOW`,
:data:`PIXEL_HIGH`, from :mod:`apjax.data.augment`'s MEAN/STD). The conv's zero padding is applied to the
bound images as well: padded positions are not pixels and take no relevance.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from apjax.data.augment import MEAN, STD
from apjax.models.vgg import tap_names

PIXEL_LOW = tuple((0.0 - m) / s for m, s in zip(MEAN, STD, strict=True))
PIXEL_HIGH = tuple((1.0 - m) / s for m, s in zip(MEAN, STD, strict=True))
EPS = 1e-9
BN_EPS = 1e-5
_DIMS = ("NHWC", "HWIO", "NHWC")
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


# --- building blocks -----------------------------------------------------------------------------------


def _safe_div(num: jax.Array, den: jax.Array, eps: float = EPS) -> jax.Array:
    """``num / den`` where ``|den| > eps``, else 0 (also NaN-free in its gradient)."""
    ok = jnp.abs(den) > eps
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 conv, stride 1, zero padding 1, NHWC x HWIO, no bias (as ``nn.Conv(..., padding=1)``)."""
    return jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DIMS
    )


def _conv_t(s: jax.Array, kernel: jax.Array, like: jax.Array) -> jax.Array:
    """``W^T s``: the transpose of :func:`_conv` with ``kernel``, applied to ``s``, shaped like ``like``."""
    spec = jax.ShapeDtypeStruct(like.shape, s.dtype)
    (out,) = jax.linear_transpose(lambda a: _conv(a, kernel), spec)(s)
    return out


def _pool(x: jax.Array) -> jax.Array:
    """Max-pool 2x2, stride 2, 'VALID' (as ``nn.max_pool(x, (2, 2), strides=(2, 2))``)."""
    # A Python -inf (not an array) lets lax recognise the max monoid, which has a VJP.
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _pool_wta(a: jax.Array, r: jax.Array) -> jax.Array:
    """Winner-take-all through a max-pool: each output's relevance goes to its window's arg-max input."""
    _, pullback = jax.vjp(_pool, a)
    (out,) = pullback(r.astype(a.dtype))
    return out


def _dtype(x: jax.Array, layers: Sequence[Mapping[str, Any]]) -> Any:
    """float32, or float64 where the input or a weight is float64."""
    dtypes = [jnp.asarray(x).dtype] + [
        jnp.asarray(ly["kernel"]).dtype for ly in layers if ly["type"] != "pool"
    ]
    return jnp.result_type(jnp.float32, *dtypes)


def _check_layers(layers: Sequence[Mapping[str, Any]]) -> None:
    types = [ly["type"] for ly in layers]
    if len(types) < 2 or types[0] != "conv" or types[-1] != "dense" or "dense" in types[:-1]:
        raise ValueError(
            "layers must start with a conv and end with the one dense head (as fold_batchnorm returns); "
            f"got types {types}."
        )
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(f"unknown layer types {unknown}; choose from {list(LAYER_TYPES)}.")


def _class_one_hot(class_index: Any, batch: int, num_classes: int, dtype: Any) -> jax.Array:
    idx = jnp.broadcast_to(jnp.asarray(class_index, jnp.int32), (batch,))
    return jax.nn.one_hot(idx, num_classes, dtype=dtype)


def _bounds(low: Any, high: Any, dtype: Any) -> tuple[jax.Array, jax.Array]:
    low = jnp.asarray(PIXEL_LOW if low is None else low, dtype)
    high = jnp.asarray(PIXEL_HIGH if high is None else high, dtype)
    return low, high


def _sum_per_image(r: jax.Array) -> jax.Array:
    return jnp.sum(r.reshape(r.shape[0], -1), axis=-1)


def _zplus_conv(a: jax.Array, kernel: jax.Array, r: jax.Array, eps: float) -> jax.Array:
    """z+ rule through a conv with input ``a >= 0``: ``R_i = a_i sum_j w+_ij R_j / z+_j`` (no bias)."""
    wp = jnp.maximum(kernel.astype(a.dtype), 0)
    s = _safe_div(r, _conv(a, wp), eps)
    return a * _conv_t(s, wp, a)


def _zplus_dense(a: jax.Array, kernel: jax.Array, r: jax.Array, eps: float) -> jax.Array:
    """z+ rule through the Dense head on the flattened ``a >= 0``; returns relevance shaped like ``a``."""
    flat = a.reshape(a.shape[0], -1)
    wp = jnp.maximum(kernel.astype(a.dtype), 0)
    s = _safe_div(r, flat @ wp, eps)
    return (flat * (s @ wp.T)).reshape(a.shape)


def _zb_conv(
    x: jax.Array, kernel: jax.Array, r: jax.Array, low: jax.Array, high: jax.Array, eps: float
) -> jax.Array:
    """z^B rule through the first conv: ``R_i = sum_j (x_i w_ij - l_i w+_ij - h_i w-_ij) / z_j R_j`` with
    ``z_j = sum_i (x_i w_ij - l_i w+_ij - h_i w-_ij)`` (every term >= 0 for ``l <= x <= h``)."""
    k = kernel.astype(x.dtype)
    wp, wn = jnp.maximum(k, 0), jnp.minimum(k, 0)
    lo, hi = jnp.broadcast_to(low, x.shape), jnp.broadcast_to(high, x.shape)
    z = _conv(x, k) - _conv(lo, wp) - _conv(hi, wn)
    s = _safe_div(r, z, eps)
    return x * _conv_t(s, k, x) - lo * _conv_t(s, wp, x) - hi * _conv_t(s, wn, x)


def _input_name(layers: Sequence[Mapping[str, Any]], i: int) -> str:
    """Name of the tensor that ``layers[i]`` reads: the previous layer's output, or ``'input'``."""
    return "input" if i == 0 else layers[i - 1]["name"]


def _zplus_backward(
    layers: Sequence[Mapping[str, Any]],
    acts: Sequence[jax.Array],
    r_logits: jax.Array,
    stop: int,
    eps: float,
    record: dict[str, jax.Array],
) -> jax.Array:
    """z+ / winner-take-all propagation from the logits down to the input of ``layers[stop]`` (stop >= 1)."""
    r = r_logits
    for i in range(len(layers) - 1, stop - 1, -1):
        layer, a = layers[i], acts[i]
        if layer["type"] == "dense":
            r = _zplus_dense(a, layer["kernel"], r, eps)
        elif layer["type"] == "pool":
            r = _pool_wta(a, r)
        else:
            r = _zplus_conv(a, layer["kernel"], r, eps)
        record[_input_name(layers, i)] = r
    return r


# --- the folded net ------------------------------------------------------------------------------------


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
    for name, w in zip(tap_names(widths), widths, strict=True):
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
    _check_layers(layers)
    dtype = _dtype(x, layers)
    h = jnp.asarray(x, dtype)
    acts = []
    for layer in layers:
        acts.append(h)
        if layer["type"] == "conv":
            h = jax.nn.relu(_conv(h, layer["kernel"]) + layer["bias"].astype(dtype))
        elif layer["type"] == "pool":
            h = _pool(h)
        else:
            h = h.reshape(h.shape[0], -1) @ layer["kernel"].astype(dtype) + layer["bias"].astype(dtype)
    return (h, acts) if return_activations else h


# --- the methods ---------------------------------------------------------------------------------------


def excitation_backprop(
    layers: Sequence[Mapping[str, Any]],
    x: jax.Array,
    class_index: Any,
    read_at: str = "conv5_3",
    *,
    eps: float = EPS,
    return_layers: bool = False,
):
    """Excitation Backprop (Zhang et al., ECCV 2016): marginal winning probabilities, read at a tap.

    Winner-take-all probabilities through the excitatory weights ``W+`` without bias. The seed is a one-hot
    at the class logit (probability 1). Through the head and every conv above ``read_at``, with ``a >= 0``
    the layer's input (ReLU outputs):

        p_in = a * W+^T (p_out / (W+ a))        (the division guarded: 0 where W+ a <= eps)

    through a max-pool the probability goes to the arg-max input of each window. The map is the
    probability at ``read_at``'s output (the tap, after ReLU; conv5_3 is 14x14 at 227), summed over
    channels and clamped at 0 (it is non-negative anyway).

    Each step conserves the total: ``sum p_in = sum_j p_out_j [W+ a > eps]_j``; the units left out have
    zero activation in a bias-free net (hence zero probability), so there every layer's probabilities sum
    to 1 (up to ``eps``). With biases a unit may be active with ``W+ a = 0``; its probability is dropped.

    Args:
      layers: from :func:`fold_batchnorm`.
      x: images (B, H, W, 3).
      class_index: int (B,) (or a scalar) class per image.
      read_at: tap name (a conv or pool of ``layers``) whose output is read.
      eps: division guard.
      return_layers: also return the probabilities at every layer from the logits down to ``read_at``.

    Returns:
      (B, h, w) map; with ``return_layers``, ``(map, probs)``, ``probs`` a dict: ``'logits'`` (B, K) the
      one-hot seed, and the probability at the output of every layer above ``read_at`` and of ``read_at``
      itself, keyed by that layer's name (``'pool5'`` (B, 7, 7, C), ``'conv5_3'``, ...). (A dict returned
      from ``jax.jit`` has its keys sorted; the layer order is that of ``layers``.)
    """
    _check_layers(layers)
    names = [ly["name"] for ly in layers[:-1]]
    if read_at not in names:
        raise ValueError(f"read_at={read_at!r} is not a layer of this net; choose one of {names}.")
    logits, acts = folded_forward(layers, x, return_activations=True)
    seed = _class_one_hot(class_index, logits.shape[0], logits.shape[-1], logits.dtype)
    record = {"logits": seed}
    p = _zplus_backward(layers, acts, seed, names.index(read_at) + 1, eps, record)
    m = jax.nn.relu(jnp.sum(p, axis=-1))
    return (m, record) if return_layers else m


def lrp_alpha1beta0(
    layers: Sequence[Mapping[str, Any]],
    x: jax.Array,
    class_index: Any,
    *,
    low: Any = None,
    high: Any = None,
    eps: float = EPS,
    return_layers: bool = False,
):
    """LRP alpha1-beta0 (z+ rule) with the z^B rule at the first conv; the map is the input relevance
    summed over RGB.

    Rules, with ``a >= 0`` a layer's input, ``w+ = max(w, 0)``, ``w- = min(w, 0)``:

    * seed: ``R = logit_k * one_hot(k)`` at the output (the relevance there is the class logit);
    * Dense head and hidden convs (z+ = alpha1-beta0 on non-negative inputs):
      ``R_i = sum_j a_i w+_ij / z+_j R_j`` with ``z+_j = sum_i a_i w+_ij``;
    * max-pool: winner-take-all (the window's arg-max input takes the output's relevance);
    * first conv (z^B): ``R_i = sum_j (x_i w_ij - l_i w+_ij - h_i w-_ij) / z_j R_j`` with ``z_j`` the sum
      of the numerators over ``i`` and ``[l, h]`` the per-channel normalised pixel range (``low``,
      ``high``; default :data:`PIXEL_LOW`, :data:`PIXEL_HIGH`).

    Biases: the z+ and z^B denominators contain no bias term, so no relevance is absorbed by biases: each
    unit's relevance is passed down in full and every layer conserves the total, ``sum_i R_i = sum_j R_j``,
    up to units with a guarded denominator (``<= eps``). The (folded) biases still act through the forward
    pass: they shape the activations ``a`` and the logit that seeds the propagation. In a bias-free net
    (and for a class with a positive logit) every layer's relevance sums to the logit; with biases the
    same holds except at units whose ``z+_j`` vanishes while a bias keeps them active (their relevance is
    dropped). A negative logit is propagated as it is (all relevance then negative).

    Args:
      layers: from :func:`fold_batchnorm`.
      x: images (B, H, W, 3), inside ``[low, high]`` per channel.
      class_index: int (B,) (or a scalar) class per image.
      low, high: per-channel bounds of the z^B rule, (3,) or broadcastable to ``x``.
      eps: division guard.
      return_layers: also return the relevance at every layer.

    Returns:
      (B, H, W) map; with ``return_layers``, ``(map, relevance)``, a dict: ``'logits'`` (B, K) the seed,
      the relevance at the output of every layer below the head keyed by that layer's name (``'pool5'``,
      ``'conv5_3'``, ..., ``'conv1_1'``), and ``'input'`` (B, H, W, 3).
    """
    _check_layers(layers)
    logits, acts = folded_forward(layers, x, return_activations=True)
    seed = _class_one_hot(class_index, logits.shape[0], logits.shape[-1], logits.dtype)
    record = {"logits": seed * logits}
    r = _zplus_backward(layers, acts, seed * logits, 1, eps, record)
    low_, high_ = _bounds(low, high, acts[0].dtype)
    r = _zb_conv(acts[0], layers[0]["kernel"], r, low_, high_, eps)
    record["input"] = r
    m = jnp.sum(r, axis=-1)
    return (m, record) if return_layers else m


def _rap_conv(a: jax.Array, kernel: jax.Array, r: jax.Array, eps: float) -> jax.Array:
    """RAP through a hidden conv with input ``a >= 0`` (see :func:`rap`), uniform shift included."""
    k = kernel.astype(a.dtype)
    wp, wn = jnp.maximum(k, 0), jnp.maximum(-k, 0)  # activating weights, |inhibiting weights|
    act, inh = _conv(a, wp), _conv(a, wn)  # A_j, I_j >= 0
    tot = act + inh  # T_j
    pos, neg = jnp.maximum(r, 0), jnp.minimum(r, 0)
    s_act = _safe_div(pos, act, eps)
    s_inh = _safe_div(pos, tot, eps) + _safe_div(neg, inh, eps) + _safe_div(neg, tot, eps)
    c = a * (_conv_t(s_act, wp, a) + _conv_t(s_inh, wn, a))
    nonzero = c != 0
    count = jnp.sum(nonzero.reshape(c.shape[0], -1), axis=-1).astype(c.dtype)
    excess = _sum_per_image(c) - _sum_per_image(r)
    shift = _safe_div(excess, count, 0.5)  # count is an integer: guard only count == 0
    return c - jnp.where(nonzero, shift[:, None, None, None], 0)


def rap(
    layers: Sequence[Mapping[str, Any]],
    x: jax.Array,
    class_index: Any,
    *,
    low: Any = None,
    high: Any = None,
    eps: float = EPS,
    return_layers: bool = False,
):
    """Relative Attributing Propagation (Nam et al., AAAI 2020): the positive part of the input relevance
    summed over RGB.

    The rules (those of the authors' public implementation, written for this net, whose hidden layers all
    read non-negative ReLU outputs ``a``; ``w+ = max(w, 0)``, ``w- = min(w, 0)``):

    1. Seed and head ("absolute influence"). One-hot seed at class ``k``. The logit is split into the
       contributions ``c_i = a_i w_ik`` of the head's inputs (positive ones and negative ones; the bias,
       which the authors share out in proportion to them, cancels below whenever ``sum_i c_i != 0``). The
       relevance is redistributed by absolute influence: ``R_i = logit_k * |c_i| / sum_i' |c_i'|``. So the
       head's input holds relevance of the logit's sign summing to ``logit_k``.
    2. Hidden convs. Per output unit ``j`` split ``R_j = R+_j + R-_j`` (positive and negative part) and
       the incoming contributions into activating and inhibiting ones, ``A_j = sum_i a_i w+_ij`` and
       ``I_j = sum_i a_i |w-_ij|`` (``T_j = A_j + I_j``; the activating ``x-W-`` and inhibiting ``x-W+``
       paths of negative inputs are identically zero here). Then

           C_i = sum_j a_i w+_ij R+_j / A_j                                        (R+ via activating)
               + sum_j a_i |w-_ij| (R+_j / T_j + R-_j / I_j + R-_j / T_j)         (R+, R- via inhibiting)

       which over-assigns ``sum_j (R+_j + R-_j) I_j / T_j`` (and drops ``R+_j`` of units with ``A_j = 0``,
       ``R-_j`` of units with ``I_j = 0``). Uniform shifting restores conservation: with ``n`` the number of
       input units with ``C_i != 0``, ``R_i = C_i - (sum C - sum R) / n`` for those units, 0 elsewhere.
       Units with little relevance thereby turn negative: relevance is relative.
    3. Max-pool: winner-take-all (arg-max input); ReLU: relevance passes unchanged. (The authors' rule for
       a hidden Dense layer differs from their conv rule; this net has none.)
    4. First conv: the z^B rule with the normalised pixel bounds (as :func:`lrp_alpha1beta0`; the authors'
       code takes each image's min and max over all its values as the bounds instead).
    5. The map: ``max(sum_RGB R_input, 0)`` (the positive part).

    Biases (the folded conv biases, BatchNorm's included) do not enter the backward rules; they act only
    through the forward activations, and the head's cancels out of step 1. Conserved sums, per image
    (what the tests check, with biases present): the head's input sums to ``logit_k`` (when some ``c_i``
    is non-zero); every hidden conv and max-pool passes its total exactly (a conv whenever one input unit is
    non-zero); the z^B step passes ``sum_j R_j`` over the units with ``z_j > eps``, i.e. everything for
    inputs strictly inside the bounds. So every layer and the input relevance sum to ``logit_k``; the map,
    being the positive part, does not.

    Args:
      layers: from :func:`fold_batchnorm`.
      x: images (B, H, W, 3), inside ``[low, high]`` per channel.
      class_index: int (B,) (or a scalar) class per image.
      low, high: per-channel bounds of the z^B rule, (3,) or broadcastable to ``x``.
      eps: division guard.
      return_layers: also return the (signed) relevance at every layer.

    Returns:
      (B, H, W) map; with ``return_layers``, ``(map, relevance)`` as in :func:`lrp_alpha1beta0`
      (``'logits'`` holds ``logit_k * one_hot(k)``).
    """
    _check_layers(layers)
    logits, acts = folded_forward(layers, x, return_activations=True)
    seed = _class_one_hot(class_index, logits.shape[0], logits.shape[-1], logits.dtype)
    logit = jnp.sum(seed * logits, axis=-1)
    record = {"logits": seed * logits}
    head, a = layers[-1], acts[-1]
    flat = a.reshape(a.shape[0], -1)
    contrib = jnp.abs(flat * (seed @ head["kernel"].astype(flat.dtype).T))  # |a_i w_ik|
    r = (_safe_div(contrib, jnp.sum(contrib, axis=-1, keepdims=True), eps) * logit[:, None]).reshape(a.shape)
    record[_input_name(layers, len(layers) - 1)] = r
    for i in range(len(layers) - 2, 0, -1):
        layer, a = layers[i], acts[i]
        r = _pool_wta(a, r) if layer["type"] == "pool" else _rap_conv(a, layer["kernel"], r, eps)
        record[_input_name(layers, i)] = r
    low_, high_ = _bounds(low, high, acts[0].dtype)
    r = _zb_conv(acts[0], layers[0]["kernel"], r, low_, high_, eps)
    record["input"] = r
    m = jax.nn.relu(jnp.sum(r, axis=-1))
    return (m, record) if return_layers else m


__all__ = [
    "EPS",
    "PIXEL_HIGH",
    "PIXEL_LOW",
    "FoldedLayer",
    "excitation_backprop",
    "fold_batchnorm",
    "folded_forward",
    "lrp_alpha1beta0",
    "rap",
]
