"""Structured pruning: L1-norm filter pruning (Li et al., ICLR 2017) with real channel removal.

One shot, per conv layer: KEEP the ``int(C * (1 - p))`` output filters with the largest sum of absolute
kernel weights (drop the rest), where ``p`` is that layer's ratio (SPEC section 6:
``[p, 0, 0, 0, 0, 0, 0, p, p, p, p, p, p]`` over VGG16's 13 convs). This is the reference's count: in
floating point ``1 - 0.7 = 0.30000000000000004``, so 19 of 64 and 153 of 512 filters are kept and
``p = 0.7`` gives 3,269,153 parameters, the paper's 3.27M. (Dropping ``int(C * p)`` instead would keep 20
and 154: 3,286,876 parameters, not the paper's net.) Each layer is ranked on the original kernel,
independently of the other layers' pruning.

Surgery builds the smaller net: a VGG whose widths are the kept counts, holding the kept filters (kernel
output columns and bias), their BatchNorm entries (scale, bias, running mean and variance), the next
conv's matching input channels and the head's matching input rows. The head reads the last map flattened
in (H, W, C) order (NHWC), so row ``(h * W + w) * C + c`` belongs to channel ``c``: keeping channel ``c``
keeps all ``H * W`` of its rows. (In torchvision's (C, H, W) order each channel owns a contiguous block of
``H * W`` rows; the reference repeated the channel mask instead of expanding it, scrambling the head.)
In eval mode the pruned net computes exactly what the original computes when the pruned channels are
forced to zero after their ReLU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from apjax.models import conv_names

# SPEC's per-layer pattern over VGG16's 13 convs: conv1_1 and conv4_1..conv5_3 are pruned.
VGG16_PRUNED_LAYERS = (1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1)


def layer_ratios(widths: Sequence[int | str], ratio: float, pattern: Sequence[int] | None = None) -> tuple:
    """Per-conv pruning ratios: ``ratio`` where ``pattern`` is 1, else 0 (SPEC's pattern by default)."""
    pattern = tuple(VGG16_PRUNED_LAYERS if pattern is None else pattern)
    n = len(conv_names(widths))
    if len(pattern) != n:
        raise ValueError(f"the pruning pattern has {len(pattern)} entries but the net has {n} convs.")
    return tuple(float(ratio) * bool(x) for x in pattern)


def l1_filter_keep(params: Mapping[str, Any], widths: Sequence[int | str], ratios: Sequence[float]) -> dict:
    """Kept output filters of each conv: the ``int(C * (1 - ratio))`` with the largest L1 norms.

    Args:
      params: a VGG's params (kernels (3, 3, C_in, C_out)).
      widths: the net's widths (names the convs).
      ratios: one pruning ratio in [0, 1) per conv, in order.

    Returns:
      dict conv name -> int array of kept filter indices, ascending (original order kept).
    """
    names = conv_names(widths)
    if len(ratios) != len(names):
        raise ValueError(f"got {len(ratios)} pruning ratios for {len(names)} convs; give one per conv.")
    keep = {}
    for name, ratio in zip(names, ratios, strict=True):
        if not 0 <= ratio < 1:
            raise ValueError(f"pruning ratio of {name} must be in [0, 1), got {ratio!r}.")
        kernel = np.asarray(jax.device_get(params[name]["kernel"]), np.float64)
        channels = kernel.shape[-1]
        norms = np.abs(kernel).sum(axis=(0, 1, 2))
        n_drop = channels - int(channels * (1.0 - ratio))  # the reference keeps int(C * (1 - p))
        # Stable sort: among equal norms the earlier filter is dropped first.
        dropped = np.argsort(norms, kind="stable")[:n_drop]
        keep[name] = np.setdiff1d(np.arange(channels), dropped)
    return keep


def pruned_widths(widths: Sequence[int | str], keep: Mapping[str, np.ndarray]) -> tuple:
    """The widths of the surgically pruned net."""
    names = iter(conv_names(widths))
    return tuple(w if w == "M" else len(keep[next(names)]) for w in widths)


def surgery(
    variables: Mapping[str, Any], widths: Sequence[int | str], keep: Mapping[str, np.ndarray]
) -> tuple[tuple, dict]:
    """Cuts the pruned filters out of ``variables``: ``(new widths, new {'params', 'batch_stats'})``.

    The new variables are numpy arrays with the shapes of ``create_model(new_widths)``'s variables at
    the same image size; the head's input rows follow the kept channels of the last conv.
    """
    params = jax.device_get(variables["params"])
    stats = jax.device_get(variables["batch_stats"])
    names = conv_names(widths)
    new_params, new_stats = {}, {}
    kept_in = np.arange(3)  # RGB
    for name in names:
        out = keep[name]
        kernel = np.asarray(params[name]["kernel"])
        new_params[name] = {
            "kernel": kernel[:, :, kept_in, :][..., out],
            "bias": np.asarray(params[name]["bias"])[out],
        }
        bn = f"{name}_bn"
        new_params[bn] = {k: np.asarray(v)[out] for k, v in params[bn].items()}
        new_stats[bn] = {k: np.asarray(v)[out] for k, v in stats[bn].items()}
        kept_in = out
    head = np.asarray(params["head"]["kernel"])
    last = int(np.asarray(params[names[-1]]["kernel"]).shape[-1])
    positions = head.shape[0] // last  # H * W of the last map
    rows = (np.arange(positions)[:, None] * last + kept_in[None, :]).ravel()  # (h, w) major, channel minor
    new_params["head"] = {"kernel": head[rows], "bias": np.asarray(params["head"]["bias"])}
    return pruned_widths(widths, keep), {"params": new_params, "batch_stats": new_stats}
