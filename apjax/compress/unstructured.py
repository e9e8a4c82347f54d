"""Unstructured pruning: one global magnitude threshold over all conv kernels (SPEC section 6).

Round r of the iterative schedule prunes to global sparsity ``1 - (1 - rate)**r`` (rate 0.2: 20%, 36%,
48.8%, ...) over the concatenation of every conv kernel; conv biases, BatchNorm and the Dense head are
never pruned. A mask is a dict ``conv name -> bool array of the kernel's shape (3, 3, C_in, C_out)``,
True where the weight is kept. Masks only grow sparser: a weight pruned in one round stays pruned.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apjax.models import conv_kernels

Masks = dict[str, jax.Array]


def round_sparsity(round_index: int, rate: float = 0.2) -> float:
    """Target global sparsity after round ``round_index`` (1-based): ``1 - (1 - rate)**round_index``."""
    if round_index < 0:
        raise ValueError(f"round index must be >= 0, got {round_index}.")
    return 1.0 - (1.0 - rate) ** round_index


def num_pruned(num_weights: int, sparsity: float) -> int:
    """How many of ``num_weights`` weights a sparsity prunes: ``round(sparsity * num_weights)``."""
    return int(round(sparsity * num_weights))


def global_magnitude_masks(
    params: Mapping[str, Any], sparsity: float, previous: Mapping[str, Any] | None = None
) -> Masks:
    """Masks keeping the largest-magnitude conv weights so that exactly ``num_pruned(N, sparsity)`` of
    the N conv kernel weights are pruned, with one threshold over all layers.

    Weights pruned by ``previous`` masks are pruned first (they are zero anyway); ties in magnitude are
    broken by position, so the count is exact even when many weights are equal. Computed on the host in
    float64 (a VGG16's 14.7M conv weights sort in about a second).

    Args:
      params: a VGG's params (conv kernels (3, 3, C_in, C_out) under ``params[conv]['kernel']``).
      sparsity: fraction of conv weights to prune, in [0, 1).
      previous: optional earlier masks (same names and shapes); their pruned weights stay pruned.

    Returns:
      dict conv name -> bool array of the kernel's shape, True = kept.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}.")
    kernels = conv_kernels(params)
    names = list(kernels)
    magnitudes = []
    for name in names:
        m = np.abs(np.asarray(jax.device_get(kernels[name]), np.float64)).ravel()
        if previous is not None and name in previous:
            m = np.where(np.asarray(jax.device_get(previous[name])).ravel(), m, -1.0)
        magnitudes.append(m)
    flat = np.concatenate(magnitudes)
    k = num_pruned(flat.size, sparsity)
    keep = np.ones(flat.size, bool)
    keep[np.argsort(flat, kind="stable")[:k]] = False
    masks, offset = {}, 0
    for name in names:
        shape = kernels[name].shape
        size = int(np.prod(shape))
        masks[name] = jnp.asarray(keep[offset : offset + size].reshape(shape))
        offset += size
    return masks


def count_zero_conv_weights(params: Mapping[str, Any]) -> tuple[int, int]:
    """(number of conv kernel weights that are exactly zero, number of conv kernel weights)."""
    kernels = [np.asarray(jax.device_get(k)) for k in conv_kernels(params).values()]
    return int(sum(np.count_nonzero(k == 0) for k in kernels)), int(sum(k.size for k in kernels))


def count_nonzero_params(params: Any) -> int:
    """Trainable parameters that are not exactly zero (BN running statistics excluded)."""
    return int(sum(np.count_nonzero(np.asarray(jax.device_get(p))) for p in jax.tree.leaves(params)))
