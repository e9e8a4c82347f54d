"""Rule-based attribution on the BN-folded VGG (SPEC section 7): Excitation Backprop, LRP alpha1-beta0, RAP.

The rules act on the layer list of :func:`~apjax.attribution.folded_net.fold_batchnorm` (BatchNorm folded
into each conv, a ReLU implied after it, 2x2 max-pools, the Dense head) and pass relevance from the output
of a layer to its input with the steps of :mod:`apjax.attribution.propagation` (its docstring states the
transposes, the division guard and the pixel bounds of the z^B rule). RAP is in
:mod:`apjax.attribution.rap_rule`; this module holds Excitation Backprop and LRP and is where all three
methods, the folding and the folded forward pass are imported from.

Everything is batched over B and jittable, with ``class_index`` an int array (B,) (a scalar is broadcast).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from apjax.attribution.folded_net import FoldedLayer, check_layers, fold_batchnorm, folded_forward
from apjax.attribution.propagation import (
    EPS,
    PIXEL_HIGH,
    PIXEL_LOW,
    class_one_hot,
    pixel_bounds,
    zb_conv,
    zplus_backward,
)
from apjax.attribution.rap_rule import rap


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
    check_layers(layers)
    names = [ly["name"] for ly in layers[:-1]]
    if read_at not in names:
        raise ValueError(f"read_at={read_at!r} is not a layer of this net; choose one of {names}.")
    logits, acts = folded_forward(layers, x, return_activations=True)
    seed = class_one_hot(class_index, logits.shape[0], logits.shape[-1], logits.dtype)
    record = {"logits": seed}
    p = zplus_backward(layers, acts, seed, names.index(read_at) + 1, eps, record)
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
    check_layers(layers)
    logits, acts = folded_forward(layers, x, return_activations=True)
    seed = class_one_hot(class_index, logits.shape[0], logits.shape[-1], logits.dtype)
    record = {"logits": seed * logits}
    r = zplus_backward(layers, acts, seed * logits, 1, eps, record)
    low_, high_ = pixel_bounds(low, high, acts[0].dtype)
    r = zb_conv(acts[0], layers[0]["kernel"], r, low_, high_, eps)
    record["input"] = r
    m = jnp.sum(r, axis=-1)
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
