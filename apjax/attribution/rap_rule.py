"""Relative Attributing Propagation (Nam et al., AAAI 2020) on the folded VGG: :func:`rap`.

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
4. First conv: the z^B rule with the normalised pixel bounds (as
   :func:`~apjax.attribution.rules.lrp_alpha1beta0`; the authors' code takes each image's min and max over
   all its values as the bounds instead).
5. The map: ``max(sum_RGB R_input, 0)`` (the positive part).

Biases (the folded conv biases, BatchNorm's included) do not enter the backward rules; they act only
through the forward activations, and the head's cancels out of step 1. Conserved sums, per image
(what the tests check, with biases present): the head's input sums to ``logit_k`` (when some ``c_i``
is non-zero); every hidden conv and max-pool passes its total exactly (a conv whenever one input unit is
non-zero); the z^B step passes ``sum_j R_j`` over the units with ``z_j > eps``, i.e. everything for
inputs strictly inside the bounds. So every layer and the input relevance sum to ``logit_k``; the map,
being the positive part, does not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from apjax.attribution.folded_net import check_layers, conv, folded_forward
from apjax.attribution.propagation import (
    EPS,
    class_one_hot,
    conv_t,
    input_name,
    pixel_bounds,
    pool_wta,
    safe_div,
    sum_per_image,
    zb_conv,
)


def _rap_conv(a: jax.Array, kernel: jax.Array, r: jax.Array, eps: float) -> jax.Array:
    """RAP through a hidden conv with input ``a >= 0`` (see :func:`rap`), uniform shift included."""
    k = kernel.astype(a.dtype)
    wp, wn = jnp.maximum(k, 0), jnp.maximum(-k, 0)  # activating weights, |inhibiting weights|
    act, inh = conv(a, wp), conv(a, wn)  # A_j, I_j >= 0
    tot = act + inh  # T_j
    pos, neg = jnp.maximum(r, 0), jnp.minimum(r, 0)
    s_act = safe_div(pos, act, eps)
    s_inh = safe_div(pos, tot, eps) + safe_div(neg, inh, eps) + safe_div(neg, tot, eps)
    c = a * (conv_t(s_act, wp, a) + conv_t(s_inh, wn, a))
    nonzero = c != 0
    count = jnp.sum(nonzero.reshape(c.shape[0], -1), axis=-1).astype(c.dtype)
    excess = sum_per_image(c) - sum_per_image(r)
    shift = safe_div(excess, count, 0.5)  # count is an integer: guard only count == 0
    return c - jnp.where(nonzero, shift[:, None, None, None], 0)


def _rap_head(kernel: jax.Array, a: jax.Array, seed: jax.Array, logit: jax.Array, eps: float) -> jax.Array:
    """Step 1 (absolute influence): the logit (B,) shared out over the head's input ``a`` (B, h, w, C) in
    proportion to ``|a_i w_ik|`` (``kernel`` (h*w*C, K), ``seed`` the one-hot (B, K)); shaped like ``a``."""
    flat = a.reshape(a.shape[0], -1)
    contrib = jnp.abs(flat * (seed @ kernel.astype(flat.dtype).T))  # |a_i w_ik|
    total = jnp.sum(contrib, axis=-1, keepdims=True)
    return (safe_div(contrib, total, eps) * logit[:, None]).reshape(a.shape)


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

    The rules and the sums they conserve are in the module docstring.

    Args:
      layers: from :func:`~apjax.attribution.folded_net.fold_batchnorm`.
      x: images (B, H, W, 3), inside ``[low, high]`` per channel.
      class_index: int (B,) (or a scalar) class per image.
      low, high: per-channel bounds of the z^B rule, (3,) or broadcastable to ``x``.
      eps: division guard.
      return_layers: also return the (signed) relevance at every layer.

    Returns:
      (B, H, W) map; with ``return_layers``, ``(map, relevance)`` as in
      :func:`~apjax.attribution.rules.lrp_alpha1beta0` (``'logits'`` holds ``logit_k * one_hot(k)``).
    """
    check_layers(layers)
    logits, acts = folded_forward(layers, x, return_activations=True)
    seed = class_one_hot(class_index, logits.shape[0], logits.shape[-1], logits.dtype)
    logit = jnp.sum(seed * logits, axis=-1)
    record = {"logits": seed * logits}
    r = _rap_head(layers[-1]["kernel"], acts[-1], seed, logit, eps)
    record[input_name(layers, len(layers) - 1)] = r
    for i in range(len(layers) - 2, 0, -1):
        layer, a = layers[i], acts[i]
        r = pool_wta(a, r) if layer["type"] == "pool" else _rap_conv(a, layer["kernel"], r, eps)
        record[input_name(layers, i)] = r
    low_, high_ = pixel_bounds(low, high, acts[0].dtype)
    r = zb_conv(acts[0], layers[0]["kernel"], r, low_, high_, eps)
    record["input"] = r
    m = jax.nn.relu(jnp.sum(r, axis=-1))
    return (m, record) if return_layers else m
