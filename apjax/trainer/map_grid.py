"""The maps picture a training run shows in TensorBoard at each evaluation (:class:`MapGrid`).

Computed on process 0 alone, on one of its devices, from host copies of the weights: a few images, so
no collective is needed and the other processes never wait for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from apjax.attribution import swa_map, upsample_map
from apjax.attribution.overlay import denormalize, grid, overlay
from apjax.data.augment import eval_preprocess
from apjax.data.cache import HostCache
from apjax.models import tap_gradients, top1_seed


class MapGrid:
    """A (H, W, 3) uint8 grid: for the first ``n`` images of a split, one row each: the image, then the
    reference net's map at each tap, then the trained net's, each overlaid on the image.

    The maps are SWA maps (ReLU of the gradient-weighted channel sum, :func:`apjax.attribution.swa_map`)
    for the reference net's top-1 class, both nets in eval mode, upsampled to the input size. With a
    ``reference`` (distillation, pruning, quantization: the frozen teacher and its variables) the trained
    net is the student; without one (a teacher run) only the trained net's maps are drawn, at its
    ``gradcam_tap``: Grad-CAM, which is the SWA map up to a scale that the min-max colouring removes.

    ``__call__(state, cache)`` takes the :class:`~apjax.trainer.state.TrainState` being trained.
    """

    def __init__(
        self,
        model,
        image_size: int,
        taps: Sequence[str] | None = None,
        reference: tuple[Any, Mapping[str, Any]] | None = None,
        n: int = 4,
        tile: int = 96,
    ):
        self.model, self.reference, self.n = model, reference, n
        self.taps = tuple(taps) if taps else (model.gradcam_tap,)
        self.size = min(image_size, tile)  # maps are drawn at most tile x tile
        self.image_size = image_size
        self._fns: dict[int, Any] = {}
        self._images: dict[int, tuple] = {}  # id(cache) -> its first n images and extents, read once
        self._reference_vars = None

    def _maps_fn(self, model):
        """Jitted ``(variables, images, extents, seed or None) -> (x, seed, maps tap -> (B, S, S))``."""
        if id(model) not in self._fns:
            taps, image_size, size = self.taps, self.image_size, self.size

            def fn(variables, images, extents, seed):
                x = eval_preprocess(images, extents, out_size=image_size, dtype=model.dtype)
                logits, acts, grads, _ = tap_gradients(
                    model, variables, x, top1_seed if seed is None else seed, taps
                )
                seed = top1_seed(logits) if seed is None else seed
                maps = {t: upsample_map(swa_map(acts[t], grads[t]), size) for t in taps}
                x = jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), "bilinear")
                return x, seed, maps

            self._fns[id(model)] = jax.jit(fn)
        return self._fns[id(model)]

    def __call__(self, state: Any, cache: HostCache) -> np.ndarray:
        device = jax.local_devices()[0]
        with jax.set_mesh(Mesh(np.asarray([device]), ("data",))):  # not the training's mesh
            return self._grid(state, cache, device)

    def _grid(self, state: Any, cache: HostCache, device) -> np.ndarray:

        def put(tree):  # host copies (the state may be replicated over processes), then one device
            return jax.device_put(jax.device_get(tree), device)

        if id(cache) not in self._images:
            rows = np.arange(min(self.n, len(cache)))
            self._images[id(cache)] = (put(np.asarray(cache.images[rows])), put(cache.extents[rows]))
        images, extents = self._images[id(cache)]
        n = len(images)
        columns, seed = [], None
        if self.reference is not None:
            if self._reference_vars is None:
                self._reference_vars = put(self.reference[1])
            x, seed, maps = self._maps_fn(self.reference[0])(self._reference_vars, images, extents, None)
            columns += [maps[t] for t in self.taps]
        variables = put({"params": state.params, "batch_stats": state.batch_stats})
        x, _, maps = self._maps_fn(self.model)(variables, images, extents, seed)
        columns += [maps[t] for t in self.taps]
        rgb = denormalize(np.asarray(jax.device_get(x)))
        columns = [np.asarray(jax.device_get(c)) for c in columns]
        return grid([[rgb[i], *(overlay(rgb[i], c[i]) for c in columns)] for i in range(n)])
