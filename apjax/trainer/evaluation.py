"""Classification evaluation on the mesh: the eval-mode step, the logits of a split, and its metrics."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from apjax import metrics as metrics_lib
from apjax.data import HostCache
from apjax.data.augment import eval_preprocess
from apjax.data.pipeline import batch_sharding, eval_batches

CLASSIFICATION_PERCENT = ("mAP", "mAP_devkit", "per_image_AP", "F1", "F1_logit0.5")


def make_eval_step(model, image_size: int, mesh: Mesh) -> Callable:
    """The jitted ``(params, batch_stats, images, extents) -> logits (B, K)`` in eval mode.

    ``images`` uint8 (B, S, S, 3) and ``extents`` int32 (B, 2) as in :func:`apjax.data.pipeline.eval_batches`.
    """

    def step(params, batch_stats, images, extents):
        x = eval_preprocess(images, extents, out_size=image_size, dtype=model.dtype)
        logits = model.apply({"params": params, "batch_stats": batch_stats}, x)
        return logits

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(replicated, replicated, batch_sharding(mesh), batch_sharding(mesh)),
        out_shardings=batch_sharding(mesh),
    )


def _to_host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def valid_rows(x: jax.Array, valid: jax.Array) -> np.ndarray:
    """The rows of a (padded) global eval output flagged by ``valid``, on the host."""
    return _to_host(x)[_to_host(valid)]


def classification_summary(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Every metric of :func:`apjax.metrics.classification_metrics` and the mean BCE: ``mAP`` (VOC mAP,
    sklearn's AP), ``mAP_devkit`` (the VOC devkit's envelope AP), ``per_image_AP`` (the reference's, the
    paper's "mAP"), ``F1`` (probability 0.5), ``F1_logit0.5`` (the reference's, the paper's F1),
    ``skipped_classes``, ``bce``, and the mean logit of the present and of the absent (image, class)
    pairs, ``logit_present`` and ``logit_absent`` (where a net's scores sit against the threshold 0)."""
    labels = np.asarray(labels, np.float32)
    logits = np.asarray(logits, np.float32)
    m = metrics_lib.classification_metrics(logits, labels)
    m["bce"] = float(np.mean(optax.sigmoid_binary_cross_entropy(logits, labels)))
    present = labels > 0.5
    m["logit_present"] = float(logits[present].mean()) if present.any() else float("nan")
    m["logit_absent"] = float(logits[~present].mean()) if (~present).any() else float("nan")
    return m


def predict(eval_step: Callable, params, batch_stats, cache: HostCache, batch_size: int, mesh: Mesh):
    """Logits of the whole split in order: float32 (N, K), on the host."""
    out = []
    for batch in eval_batches(cache, batch_size, mesh):
        out.append((eval_step(params, batch_stats, batch["images"], batch["extents"]), batch["valid"]))
    logits = np.concatenate([valid_rows(lg, v) for lg, v in out])
    return logits


def evaluate(eval_step, params, batch_stats, cache: HostCache, batch_size: int, mesh: Mesh) -> dict:
    """Classification metrics of the split (:func:`classification_summary`)."""
    return classification_summary(
        predict(eval_step, params, batch_stats, cache, batch_size, mesh), cache.labels
    )
