"""Localisation evaluator (SPEC section 7): per attribution method, the mean per-pixel ROC-AUC and the
pointing accuracy of a run's maps over its pairs (class in the mask AND predicted) of the segmentation
split, the pairs split over the mesh (:class:`apjax.evaluators.pairs.PairMaps`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from apjax import localization as loc
from apjax.attribution.methods import check_methods, map_fn
from apjax.attribution.methods import method_options as method_options_of
from apjax.evaluators.classification import Evaluator as ClassificationEvaluator
from apjax.evaluators.context import EvalContext
from apjax.evaluators.pairs import PairMaps, common_pairs, concat_scores, score_maps, similarity_summary


class Evaluator:
    """``run(variables)`` -> ``{'<method>/<key>': value}`` with :func:`summarize`'s keys per method.

    Config: ``methods`` (registered attribution methods), ``split`` (with masks), ``tolerance`` (pointing,
    pixels), ``batch_size`` (pairs per global batch), ``ig_steps``, ``smoothgrad_samples``, and
    ``method_options`` (any other :class:`apjax.attribution.methods.MethodOptions` field: RISE's masks,
    occlusion's patch, ...).
    """

    def __init__(
        self,
        ctx: EvalContext,
        methods=("gradcam",),
        split: str = "segmentation_val",
        tolerance: float = 0.0,
        batch_size: int = 32,
        ig_steps: int = 32,
        smoothgrad_samples: int = 16,
        method_options: Mapping[str, Any] | None = None,
    ):
        check_methods(methods)
        self.ctx, self.methods, self.split = ctx, tuple(methods), split
        self.tolerance, self.batch_size = float(tolerance), batch_size
        self.options = method_options_of(
            method_options, ig_steps=ig_steps, smoothgrad_samples=smoothgrad_samples
        )
        self._classify = ClassificationEvaluator(ctx, split, batch_size)
        self._engines: dict[str, PairMaps] = {}

    def pairs(self, variables: Any) -> np.ndarray:
        """The run's pairs on the split (:func:`apjax.localization.localization_pairs`), int64 (P, 2)."""
        return loc.localization_pairs(self.ctx.masks(self.split), self._classify.logits(variables))

    def engine(self, method: str) -> PairMaps:
        if method not in self._engines:
            c = self.ctx
            fn = map_fn(method, c.model, self.options)
            self._engines[method] = PairMaps(
                fn, c.mesh, c.image_size, c.num_classes, self.tolerance, self.batch_size
            )
        return self._engines[method]

    def maps_and_scores(
        self,
        method: str,
        variables: Any,
        pairs: np.ndarray,
        keep: np.ndarray | None = None,
        progress: Callable[[int], Any] | None = None,
    ) -> tuple[dict, np.ndarray | None]:
        """:func:`summarize` of the pairs' maps (with ``pairs_per_s``) and the maps flagged by ``keep``."""
        t0 = time.perf_counter()
        cache, masks = self.ctx.cache(self.split), self.ctx.masks(self.split)
        scores, maps = self.engine(method).run(variables, cache, masks, pairs, keep, progress)
        seconds = time.perf_counter() - t0
        out = summarize(scores)
        out["pairs_per_s"] = round(len(pairs) / seconds, 2) if len(pairs) and seconds > 0 else None
        return out, maps

    def run(self, variables: Any) -> dict[str, float]:
        pairs = self.pairs(variables)
        out = {}
        for method in self.methods:
            summary, _ = self.maps_and_scores(method, variables, pairs)
            out.update({f"{method}/{k}": v for k, v in summary.items() if k != "pairs_per_s"})
        return out


def summarize(scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """:func:`apjax.localization.summarize_pair_scores`: ``AUC`` (mean over the ``auc_pairs`` pairs whose
    class covers some but not all pixels), ``Point``, ``Point_ref_cumulative``, ``constant_maps``,
    ``pairs``."""
    return loc.summarize_pair_scores(scores)


def _pair_batches(pairs: np.ndarray, batch_size: int):
    for start in range(0, len(pairs), batch_size):
        yield pairs[start : start + batch_size]


def evaluate_localization(
    maps_of: Callable[[np.ndarray], np.ndarray],
    masks: np.ndarray,
    pairs: np.ndarray,
    batch_size: int = 32,
    tolerance: float = 0.0,
    teacher_maps_of: Callable[[np.ndarray], np.ndarray] | None = None,
    teacher_pairs: np.ndarray | None = None,
    progress: Callable[[int], Any] | None = None,
) -> dict:
    """One run's localisation numbers from maps given on the host (one entry of ``localization.json``).

    Args:
      maps_of: (B, 2) int64 pairs (image index, class index), B <= ``batch_size`` -> float maps (B, H, W)
        at the masks' resolution.
      masks: uint8 (N, H, W) class-index masks (0 background, 1..K classes, 255 void).
      pairs: (P, 2) the run's pairs, :func:`apjax.localization.localization_pairs` of its logits.
      batch_size: pairs per call of ``maps_of``.
      tolerance: the pointing game's tolerance in pixels (0: the arg-max pixel itself).
      teacher_maps_of, teacher_pairs: a teacher's maps and pairs; then Cos and l2 compare this run's maps
        with the teacher's on the pairs both have (in ``teacher_pairs``' order).
      progress: called with the number of pairs done after each batch.

    Returns:
      :func:`summarize`'s keys, ``pairs_per_s``, and with a teacher :func:`similarity_summary`'s.
    """
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    chunks = []
    t0 = time.perf_counter()
    for chunk in _pair_batches(pairs, batch_size):
        chunks.append(score_maps(maps_of(chunk), masks, chunk, tolerance))
        if progress:
            progress(len(chunk))
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = summarize(concat_scores(chunks))
    out["pairs_per_s"] = round(len(pairs) / seconds, 2) if len(pairs) and seconds > 0 else None
    if teacher_maps_of is not None:
        common = common_pairs(np.asarray(teacher_pairs, np.int64).reshape(-1, 2), pairs)
        mine, theirs = [], []
        for chunk in _pair_batches(common, batch_size):
            mine.append(maps_of(chunk)), theirs.append(teacher_maps_of(chunk))
            if progress:
                progress(len(chunk))
        shape = (0, *masks.shape[1:])
        stack = lambda m: np.concatenate(m) if m else np.zeros(shape, np.float32)  # noqa: E731
        out.update(similarity_summary(stack(mine), stack(theirs)))
    return out
