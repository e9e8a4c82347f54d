"""Weight import from a torchvision ``vgg16_bn``-layout state dict (conv + BN; optionally a head).

torchvision builds VGG-BN features as a flat ``nn.Sequential``: each conv entry takes three slots
(Conv2d at ``i``, BatchNorm2d at ``i + 1``, ReLU at ``i + 2``) and each pool one, so VGG16's convs sit at
``features.{0,3,7,10,14,17,20,24,27,30,34,37,40}``. The same rule gives the indices of any widths list.

Layouts: conv kernels OIHW -> HWIO; Dense (out, in) -> (in, out). torchvision flattens the last map in
(C, H, W) order and apjax (NHWC) in (H, W, C) order, so an imported head has its input rows permuted.
A ``.pth`` file needs torch; an ``.npz`` with the same keys does not
(``np.savez(path, **{k: v.numpy() for k, v in sd.items()})`` converts one).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apjax.models.vgg import conv_names


def torchvision_conv_indices(widths: Sequence[int | str]) -> tuple[int, ...]:
    """Index of each conv in torchvision's ``features`` Sequential for VGG with BN."""
    indices, i = [], 0
    for w in widths:
        if w == "M":
            i += 1
        else:
            indices.append(i)
            i += 3
    return tuple(indices)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a state dict from ``.pth``/``.pt`` (needs torch) or ``.npz`` into numpy arrays."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"weight file {path} does not exist; check the path.")
    if path.endswith(".npz"):
        with np.load(path) as f:
            return {k: np.asarray(f[k]) for k in f.files}
    if path.endswith((".pth", ".pt")):
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                f"reading {path} needs torch, which is not installed; install torch or convert the "
                "file to .npz with np.savez(out, **{k: v.numpy() for k, v in sd.items()})."
            ) from e
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, Mapping) and "state_dict" in sd:
            sd = sd["state_dict"]
        return {k: v.detach().cpu().numpy() for k, v in sd.items() if hasattr(v, "numpy")}
    raise ValueError(f"unknown weight file type {path}; use a .pth/.pt (torch) or .npz file.")


def _take(sd: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in sd:
        raise KeyError(
            f"the state dict has no {key!r}; it does not match this model's widths "
            "(a torchvision vgg16_bn-layout state dict is expected)."
        )
    value = np.asarray(sd[key], np.float32)
    if value.shape != shape:
        raise ValueError(
            f"state dict entry {key!r} has shape {value.shape} but the model expects {shape}; "
            "the weights belong to another architecture."
        )
    return value


def import_torchvision_vgg_bn(
    state_dict: Mapping[str, np.ndarray],
    variables: Mapping[str, Any],
    widths: Sequence[int | str],
    head_prefix: str | None = None,
) -> dict[str, Any]:
    """Copies torchvision VGG-BN weights into apjax variables.

    Args:
      state_dict: torch-layout arrays (``features.{i}.weight`` ...), e.g. from :func:`load_state_dict`.
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
    names = conv_names(widths)
    for name, idx in zip(names, torchvision_conv_indices(widths), strict=True):
        k = params[name]["kernel"].shape  # (3, 3, in, out)
        oihw = (k[3], k[2], k[0], k[1])
        c = (k[3],)
        params[name] = {
            "kernel": _take(state_dict, f"features.{idx}.weight", oihw).transpose(2, 3, 1, 0),
            "bias": _take(state_dict, f"features.{idx}.bias", c),
        }
        bn = f"features.{idx + 1}"
        params[f"{name}_bn"] = {
            "scale": _take(state_dict, f"{bn}.weight", c),
            "bias": _take(state_dict, f"{bn}.bias", c),
        }
        stats[f"{name}_bn"] = {
            "mean": _take(state_dict, f"{bn}.running_mean", c),
            "var": _take(state_dict, f"{bn}.running_var", c),
        }
    if head_prefix is not None:
        fan_in, k = params["head"]["kernel"].shape
        channels = next(int(w) for w in reversed(list(widths)) if w != "M")
        side = int(round((fan_in // channels) ** 0.5))
        if side * side * channels != fan_in:
            raise ValueError(f"the head's input size {fan_in} is not C x H x H for C={channels}.")
        w = _take(state_dict, f"{head_prefix}.weight", (k, fan_in))
        # torch rows are (C, H, W)-ordered; apjax rows are (H, W, C)-ordered.
        w = w.reshape(k, channels, side, side).transpose(2, 3, 1, 0).reshape(fan_in, k)
        params["head"] = {"kernel": w, "bias": _take(state_dict, f"{head_prefix}.bias", (k,))}
    to_jax = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)  # noqa: E731
    return {"params": to_jax(params), "batch_stats": to_jax(stats)}
