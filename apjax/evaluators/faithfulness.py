"""Faithfulness evaluator: does a run's map say what the run itself relies on? Deletion and insertion
(Petsiuk, Das and Saenko, RISE, BMVC 2018) and region perturbation in the most-relevant-first order (MoRF
AOPC; Samek, Binder, Montavon, Lapuschkin and Mueller, IEEE TNNLS 2017), each run's OWN maps scored on its
OWN model.

For each pair (image, class k) of the localisation evaluator (class in the mask and predicted), the map
at the input size orders the pixels, highest first (ties in row-major order). With ``steps`` = S and
n = H * W pixels, point t = 0..S of a curve has the first ``floor(t n / S)`` pixels of that order:

- deletion: removed, i.e. set to the deletion baseline (the rest as in the image);
- insertion: present, on top of the insertion baseline (the rest of the pixels from the baseline);

and the curve's value is the model's probability of class k, ``sigmoid(logit_k)`` (the classifiers are
multi-label). Its AUC is the trapezoid over the fraction of pixels in [0, 1]: ``(p_0 / 2 + p_1 + ... +
p_{S-1} + p_S / 2) / S``, RISE's code's. A faithful map makes deletion's AUC low (the probability falls
as soon as the pixels the map ranks first go) and insertion's high.

Baselines, in the normalised input the model reads: ``zero`` (0 there is the data's mean colour; RISE's
code deletes to black, 0 in [0, 1] pixels) and ``blur`` (the image blurred with a Gaussian of
``blur_sigma`` pixels, default 5 / 224 of the side: RISE's code's sigma 5 at 224 px, normalised to sum 1,
edges repeated). Defaults: deletion to ``zero``, insertion from ``blur``, as in RISE's code.

Region perturbation (MoRF): the image is cut into a grid of square regions of ``region_size`` = r pixels
from its top-left corner, ``ceil(H / r) x ceil(W / r)`` of them, indexed in row-major order; where r does
not divide the side, the last row / column of regions is narrower (the rest of the side). A region's score
is the sum of the map over its pixels; the regions are ordered by score, highest first (ties by region
index). Point k = 0..L of the curve has the first k regions replaced by the region baseline (cumulatively;
k = 0 is the image), with L = ``regions`` (or every region if there are fewer), and its value is the same
class probability. The pair's AOPC is ``1 / (L + 1) sum_{k=0..L} (p_0 - p_k)`` (its k = 0 term is 0).
Unlike deletion's AUC, HIGHER is more faithful: the probability falls early when the map ranks first the
regions the model relies on. Region baselines: ``uniform`` (default, the paper's: each replaced pixel and
channel drawn uniformly from ``[min, max]`` of that channel over the image's normalised pixels; one noise
image per pair, drawn from ``fold_in(key(NOISE_SEED), example id)`` with the pair's example id
``image index * K + class``, so a pair's value does not depend on its batch, position or device), ``zero``
and ``blur`` (as above). Default ``region_size``: ``round(9 * image_size / 227)``, at least 1 (the paper's
9 x 9 regions at 227 px).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apjax.attribution.methods import check_methods, map_fn
from apjax.attribution.methods import method_options as method_options_of
from apjax.errors import ConfigError
from apjax.evaluators.context import EvalContext
from apjax.evaluators.localization import Evaluator as LocalizationEvaluator
from apjax.evaluators.pairs import PairMaps

BASELINES = ("zero", "blur")
REGION_BASELINES = ("uniform", "zero", "blur")
CURVES = ("deletion", "insertion")
KEYS = ("deletion_auc", "insertion_auc", "morf_aopc")  # the per-pair scores and the means' names
NOISE_SEED = 0  # the uniform region baseline's key, folded with each pair's example id


def gaussian_blur(x: jax.Array, sigma: float) -> jax.Array:
    """``x`` (B, H, W, C) blurred per channel by a Gaussian of ``sigma`` pixels (window 2 ceil(3 sigma) + 1,
    weights summing to 1, the edge pixels repeated outward)."""
    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel = jnp.asarray(taps / taps.sum(), x.dtype)
    padded = jnp.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    h, w = x.shape[1:3]
    rows = sum(kernel[i] * padded[:, i : i + h] for i in range(2 * radius + 1))
    return sum(kernel[j] * rows[:, :, j : j + w] for j in range(2 * radius + 1))


def baseline_of(x: jax.Array, kind: str, sigma: float) -> jax.Array:
    """The ``zero`` or ``blur`` version of the images ``x`` (B, H, W, C)."""
    if kind == "zero":
        return jnp.zeros_like(x)
    return gaussian_blur(x, sigma)


def class_probability(prob_fn: Callable[[jax.Array], jax.Array], images: jax.Array, classes: jax.Array):
    """Float32 (B,): each image's probability of its class, ``prob_fn(images)[b, classes[b]]``."""
    return jnp.take_along_axis(prob_fn(images), classes[:, None], axis=1)[:, 0].astype(jnp.float32)


def pixel_ranks(maps: jax.Array) -> jax.Array:
    """Int32 (B, H, W): each pixel's place in its map's order, highest value first, ties in row-major
    order (0 is the map's first pixel)."""
    b = maps.shape[0]
    flat = maps.reshape(b, -1)
    order = jnp.argsort(-flat, axis=1, stable=True)
    ranks = jnp.zeros_like(order).at[jnp.arange(b)[:, None], order].set(jnp.arange(flat.shape[1])[None])
    return ranks.reshape(maps.shape).astype(jnp.int32)


def curves(
    prob_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    maps: jax.Array,
    classes: jax.Array,
    steps: int,
    deletion_baseline: jax.Array,
    insertion_baseline: jax.Array,
) -> dict[str, jax.Array]:
    """The deletion and insertion curves, float32 (B, steps + 1) each.

    Args:
      prob_fn: ``(B, H, W, 3) -> (B, K)`` the model's class probabilities.
      x: the images, (B, H, W, 3); maps: (B, H, W) at the same size; classes: int (B,).
      steps: S, the curve's points are t = 0..S.
      deletion_baseline, insertion_baseline: (B, H, W, 3), what removed pixels become / start as.
    """
    n = maps.shape[1] * maps.shape[2]
    ranks = pixel_ranks(maps)[..., None]
    counts = jnp.asarray([t * n // steps for t in range(steps + 1)], jnp.int32)

    def prob(images):
        return class_probability(prob_fn, images, classes)

    def point(_, count):
        first = ranks < count  # the pixels the map ranks among its first ``count``
        deleted = jnp.where(first, deletion_baseline, x)
        inserted = jnp.where(first, x, insertion_baseline)
        return None, (prob(deleted), prob(inserted))

    _, (deletion, insertion) = jax.lax.scan(point, None, counts)
    return {"deletion": deletion.T, "insertion": insertion.T}


def curve_auc(curve: jax.Array) -> jax.Array:
    """The trapezoid area of curves (B, S + 1) over [0, 1]: (B,)."""
    s = curve.shape[1] - 1
    return (jnp.sum(curve, axis=1) - 0.5 * (curve[:, 0] + curve[:, -1])) / s


def default_region_size(image_size: int) -> int:
    """The paper's 9 x 9 regions at 227 px scaled to ``image_size``: ``round(9 * image_size / 227)``, >= 1."""
    return max(1, round(9 * image_size / 227))


def region_ranks(maps: jax.Array, size: int) -> jax.Array:
    """Int32 (B, H, W): the place of each pixel's region in the MoRF order of its map, 0 first.

    Regions: a grid of ``size`` x ``size`` squares from the top-left corner (the last row / column
    narrower where ``size`` does not divide the side), scored by the sum of the map over them, highest
    first, ties by region index in row-major order."""
    b, h, w = maps.shape
    nh, nw = -(-h // size), -(-w // size)
    padded = jnp.pad(maps, ((0, 0), (0, nh * size - h), (0, nw * size - w)))  # zeros add nothing
    ranks = pixel_ranks(padded.reshape(b, nh, size, nw, size).sum(axis=(2, 4)))  # (B, nh, nw): the regions'
    return jnp.repeat(jnp.repeat(ranks, size, axis=1), size, axis=2)[:, :h, :w]


def uniform_noise(x: jax.Array, ids: jax.Array, seed: int = NOISE_SEED) -> jax.Array:
    """The ``uniform`` region baseline of the images ``x`` (B, H, W, C): per image and channel, values
    uniform in ``[min, max]`` of that channel over the image, drawn from ``fold_in(key(seed), ids[b])``
    (int (B,), the pairs' example ids), so an image's noise depends on its id alone."""
    b, c = x.shape[0], x.shape[-1]
    flat = x.reshape(b, -1, c)
    lo, hi = flat.min(axis=1)[:, None, None], flat.max(axis=1)[:, None, None]
    key = jax.random.key(seed)
    draw = lambda i: jax.random.uniform(jax.random.fold_in(key, i), x.shape[1:], x.dtype)  # noqa: E731
    u = jax.vmap(draw)(jnp.asarray(ids, jnp.int32))
    return jnp.clip(lo + u * (hi - lo), lo, hi)


def region_curve(
    prob_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    maps: jax.Array,
    classes: jax.Array,
    size: int,
    regions: int,
    baseline: jax.Array,
) -> jax.Array:
    """The MoRF region-perturbation curve, float32 (B, L + 1): point k has the first k regions of the
    map's order (:func:`region_ranks`) replaced by ``baseline`` (B, H, W, 3); L = ``regions`` or every
    region if there are fewer. ``prob_fn``, ``x``, ``maps`` and ``classes`` as in :func:`curves`."""
    h, w = maps.shape[1:]
    last = min(regions, -(-h // size) * -(-w // size))
    ranks = region_ranks(maps, size)[..., None]

    def point(_, k):
        return None, class_probability(prob_fn, jnp.where(ranks < k, baseline, x), classes)

    _, curve = jax.lax.scan(point, None, jnp.arange(last + 1, dtype=jnp.int32))
    return curve.T


def aopc(curve: jax.Array) -> jax.Array:
    """The area over the perturbation curve (B, L + 1): ``mean_k (p_0 - p_k)``, (B,)."""
    return jnp.mean(curve[:, :1] - curve, axis=1)


def check_faithfulness(settings: Mapping[str, Any] | None, image_size: int | None = None) -> None:
    """``ConfigError`` (one sentence) for a baseline that is not one of :data:`BASELINES` (the region
    baseline: :data:`REGION_BASELINES`), steps < 1, regions < 1, or a region_size below 1 or (given the
    input side ``image_size``) above it."""
    settings = dict(settings or {})
    for name in ("deletion_baseline", "insertion_baseline"):
        if name in settings and settings[name] not in BASELINES:
            raise ConfigError(f"faithfulness {name}={settings[name]!r}; choose one of {list(BASELINES)}.")
    region_baseline = settings.get("region_baseline", "uniform")
    if region_baseline not in REGION_BASELINES:
        raise ConfigError(
            f"faithfulness region_baseline={region_baseline!r}; choose one of {list(REGION_BASELINES)}."
        )
    for name in ("steps", "regions"):
        if int(settings.get(name, 1)) < 1:
            raise ConfigError(f"faithfulness {name}={settings[name]} must be at least 1.")
    size = settings.get("region_size")
    if size is not None and int(size) < 1:
        raise ConfigError(f"faithfulness region_size={size} must be at least 1 (pixels).")
    if size is not None and image_size is not None and int(size) > image_size:
        raise ConfigError(f"faithfulness region_size={size} exceeds the input side of {image_size} pixels.")


class Evaluator:
    """``run(variables)`` -> ``{'<method>/deletion_auc', '<method>/insertion_auc', '<method>/morf_aopc',
    '<method>/pairs'}``: means over the run's pairs (those of
    :class:`apjax.evaluators.localization.Evaluator` on ``split``).

    Config: ``methods``, ``split``, ``batch_size`` (pairs per global batch), ``steps`` (points of a curve
    minus one), ``deletion_baseline`` and ``insertion_baseline`` (``zero`` or ``blur``), ``blur_sigma``
    (pixels; None: 5 / 224 of the input side), ``region_size`` (pixels; None:
    :func:`default_region_size`), ``regions`` (L, the regions perturbed), ``region_baseline`` (``uniform``,
    ``zero`` or ``blur``), ``method_options`` (the attribution methods' settings).
    """

    def __init__(
        self,
        ctx: EvalContext,
        methods=("gradcam",),
        split: str = "segmentation_val",
        batch_size: int = 32,
        steps: int = 32,
        deletion_baseline: str = "zero",
        insertion_baseline: str = "blur",
        blur_sigma: float | None = None,
        region_size: int | None = None,
        regions: int = 64,
        region_baseline: str = "uniform",
        method_options: Mapping[str, Any] | None = None,
    ):
        check_methods(methods)
        baselines = dict(deletion_baseline=deletion_baseline, insertion_baseline=insertion_baseline)
        region = dict(region_size=region_size, regions=regions, region_baseline=region_baseline)
        check_faithfulness(dict(steps=steps, **baselines, **region), ctx.image_size)
        self.ctx, self.methods, self.split, self.batch_size = ctx, tuple(methods), split, batch_size
        self.options = method_options_of(method_options)
        sigma = blur_sigma or 5.0 * ctx.image_size / 224
        size = int(region_size or default_region_size(ctx.image_size))
        model = ctx.model

        def scores(variables, x, maps, masks, classes, ids):
            prob_fn = lambda images: jax.nn.sigmoid(model.apply(variables, images).astype(jnp.float32))  # noqa: E731
            c = curves(prob_fn, x, maps, classes, steps, baseline_of(x, deletion_baseline, sigma),
                       baseline_of(x, insertion_baseline, sigma))  # fmt: skip
            out = {f"{k}_auc": curve_auc(c[k]) for k in CURVES}
            uniform = region_baseline == "uniform"
            fill = uniform_noise(x, ids) if uniform else baseline_of(x, region_baseline, sigma)
            out["morf_aopc"] = aopc(region_curve(prob_fn, x, maps, classes, size, int(regions), fill))
            return out

        self._scores = scores
        self._pairs = LocalizationEvaluator(ctx, methods, split, batch_size=batch_size)
        self._engines: dict[str, PairMaps] = {}

    def engine(self, method: str) -> PairMaps:
        if method not in self._engines:
            c = self.ctx
            fn = map_fn(method, c.model, self.options)
            self._engines[method] = PairMaps(
                fn, c.mesh, c.image_size, c.num_classes, batch_size=self.batch_size, scores=self._scores
            )
        return self._engines[method]

    def pair_scores(self, method: str, variables: Any, pairs: np.ndarray) -> dict[str, np.ndarray]:
        """``deletion_auc``, ``insertion_auc`` and ``morf_aopc`` (:data:`KEYS`) of each pair, float64 (P,)."""
        cache, masks = self.ctx.cache(self.split), self.ctx.masks(self.split)
        scores, _ = self.engine(method).run(variables, cache, masks, pairs)
        return {k: np.asarray(scores.get(k, np.zeros(0)), np.float64) for k in KEYS}

    def summary(self, method: str, variables: Any, pairs: np.ndarray) -> dict[str, float]:
        """:data:`KEYS`: their means over ``pairs`` (NaN without a pair)."""
        scores = self.pair_scores(method, variables, pairs)
        return {k: float(v.mean()) if len(v) else float("nan") for k, v in scores.items()}

    def run(self, variables: Any) -> dict[str, float]:
        pairs = self._pairs.pairs(variables)
        out: dict[str, float] = {}
        for method in self.methods:
            out.update({f"{method}/{k}": v for k, v in self.summary(method, variables, pairs).items()})
            out[f"{method}/pairs"] = len(pairs)
        return out
