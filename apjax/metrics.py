"""Evaluation metrics.

Classification part: multi-label metrics for PASCAL VOC-style evaluation (K = 20 classes).

- :func:`voc_map` is the VOC classification mAP: for each CLASS, rank all images of the split by that
  class's score and compute its average precision; average over the classes that have at least one
  positive in the split (the others are skipped and counted). Reported as ``mAP`` (non-interpolated AP,
  sklearn's) and ``mAP_devkit`` (the VOC devkit's AP, ``voc_map(..., devkit=True)``).
- :func:`per_image_ap` is the metric of the reference code and the paper's "mAP": for each IMAGE, rank
  its K classes and compute sklearn's AP; average over the images with at least one positive label. It
  is not the VOC mAP and is reported under its own name, ``per_image_AP``.
- :func:`sample_f1` is sklearn's ``f1_score(labels, logits > threshold, average="samples")``. Reported
  twice: ``F1`` at probability 0.5 (logit > 0) and ``F1_logit0.5``, the reference's and the paper's F1,
  which thresholds the raw LOGIT: ``logit >= 0.5`` (probability 0.62).

Which AP (both on one ranking of N items, scores sorted in decreasing order, tied scores forming one
threshold; ``R_n`` and ``P_n`` are recall and precision at the n-th distinct threshold, ``R_0 = 0``):

- non-interpolated (``sklearn.metrics.average_precision_score``, the default here and in the reference):
  ``AP = sum_n (R_n - R_{n-1}) P_n``. Equivalently ``AP = (1/P) sum_{i positive} precision(g(i))`` where
  ``g(i)`` is the last rank of the tie group that contains item ``i``; that form is what is vectorised
  (sort, cumulative sums, tie-group ends via a reversed running minimum).
- VOC devkit (VOC2010 and later, ``VOCevalcls`` / ``VOCap``): the area under the monotone precision
  envelope, ``AP = sum_n (R_n - R_{n-1}) max_{m >= n} P_m``; never below the non-interpolated AP. The
  devkit sorts with MATLAB's stable sort and so breaks tied scores by image order; here a tie group is one
  threshold (the result does not depend on the order of the images), which equals the devkit wherever
  scores are distinct. Difficult objects are positives here (SPEC section 3), where the devkit ignores them.
  The VOC2007 11-point AP is not offered.

Zero-division convention for F1 (sklearn's default ``zero_division="warn"``): a sample with no true
and no predicted label has an undefined F1 and counts as 0.0 (sklearn also emits an
``UndefinedMetricWarning``; no warning is emitted here). A sample with labels but no prediction, or
predictions but no label, has F1 = 0 by the formula ``2 TP / (2 TP + FP + FN)``.

All results are fractions in [0, 1], not percentages. Host functions accept numpy or jax arrays and
compute in float64. :func:`multilabel_counts` is the jittable on-device counterpart for F1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "F1_LOGIT_THRESHOLD",
    "average_precision",
    "voc_map",
    "per_image_ap",
    "sample_f1",
    "classification_metrics",
    "multilabel_counts",
]


F1_LOGIT_THRESHOLD = 0.5
"""The reference's F1 threshold on the raw logit (``logit >= 0.5``, probability 0.62): ``F1_logit0.5``."""


def _as_scores(x, ndim: int, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    return arr


def _as_targets(x, shape: tuple[int, ...], name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    if arr.dtype != np.bool_:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must contain only 0 and 1")
        arr = arr != 0
    return arr


def _ap_columns(scores: np.ndarray, targets: np.ndarray, devkit: bool = False) -> np.ndarray:
    """AP of each column of ``scores`` (N, M) against boolean ``targets`` (N, M).

    Non-interpolated (sklearn's) by default; ``devkit=True``: the VOC devkit's area under the monotone
    precision envelope. Returns (M,) float64 with NaN for columns without a positive target.
    """
    n, m = scores.shape
    if n == 0:
        return np.full((m,), np.nan)
    # Stable descending sort (sklearn sorts with a stable mergesort too; the order inside a tie group
    # does not matter here because each group is evaluated only at its end).
    order = np.argsort(-scores, axis=0, kind="stable")
    s = np.take_along_axis(scores, order, axis=0)
    y = np.take_along_axis(targets, order, axis=0).astype(np.float64)
    tp = np.cumsum(y, axis=0)  # (N, M): true positives among the top i+1
    ranks = np.arange(1, n + 1, dtype=np.float64)[:, None]
    precision = tp / ranks  # precision at each cut, meaningful only at tie-group ends
    # Position i ends a tie group if the next score differs (or i is last).
    is_end = np.ones((n, m), dtype=bool)
    is_end[:-1] = s[:-1] != s[1:]
    # For each position, the index of the end of its tie group: reversed running minimum over the
    # end indices (non-end positions hold n, larger than any index).
    end_idx = np.where(is_end, np.arange(n)[:, None], n)
    group_end = np.minimum.accumulate(end_idx[::-1], axis=0)[::-1]
    if devkit:
        # The envelope at a threshold is the best precision at that recall or any higher one: a reversed
        # running max over the tie-group ends (other positions hold 0, which never raises a max). At a
        # position inside a group, the first end at or after it is its own group's end, so the running
        # max there already is the envelope at its group's end.
        ends_only = np.where(is_end, precision, 0.0)
        prec_at_group_end = np.maximum.accumulate(ends_only[::-1], axis=0)[::-1]
    else:
        prec_at_group_end = np.take_along_axis(precision, group_end, axis=0)
    n_pos = tp[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (y * prec_at_group_end).sum(axis=0) / n_pos
    ap = np.where(n_pos > 0, ap, np.nan)
    # Guard against rounding just above 1.
    return np.minimum(ap, 1.0)


def average_precision(scores: np.ndarray, targets: np.ndarray, devkit: bool = False) -> float:
    """AP of one ranking: scores float (N,), targets {0,1} (N,) with at least one positive.

    Default: equals ``sklearn.metrics.average_precision_score(targets, scores)`` (tied scores are one
    threshold). ``devkit=True``: the VOC devkit's AP (area under the monotone precision envelope, see the
    module docstring). Raises ``ValueError`` if there is no positive.
    """
    s = _as_scores(scores, 1, "scores")
    t = _as_targets(targets, s.shape, "targets")
    if not t.any():
        raise ValueError("average_precision needs at least one positive target")
    return float(_ap_columns(s[:, None], t[:, None], devkit)[0])


def _check_pair(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    x = _as_scores(logits, 2, "logits")
    y = _as_targets(labels, x.shape, "labels")
    return x, y


def _nanmean_or_nan(values: np.ndarray) -> float:
    ok = ~np.isnan(values)
    return float(values[ok].mean()) if ok.any() else float("nan")


def voc_map(logits, labels, devkit: bool = False) -> tuple[float, np.ndarray]:
    """logits float (N, K), labels {0,1} (N, K).

    Returns (mAP over classes with a positive, per-class AP (K,) with NaN for skipped classes).
    Per-class AP ranks all N images by that class's score: sklearn's non-interpolated AP, or with
    ``devkit=True`` the VOC devkit's (VOC2010+) envelope AP. The number of skipped classes is
    ``np.isnan(per_class).sum()``. If no class has a positive, mAP is NaN.
    """
    x, y = _check_pair(logits, labels)
    per_class = _ap_columns(x, y, devkit)
    return _nanmean_or_nan(per_class), per_class


def per_image_ap(logits, labels) -> float:
    """The reference's metric, the paper's "mAP": sklearn's (non-interpolated) AP over the K classes of
    each image, averaged over the images with a positive.

    Returns NaN if no image has a positive label (the reference's ``compute_mAP`` averages over every
    image; VOC's val images all have a label).
    """
    x, y = _check_pair(logits, labels)
    return _nanmean_or_nan(_ap_columns(x.T, y.T))


def _per_sample_f1(x: np.ndarray, y: np.ndarray, threshold: float, inclusive: bool = False) -> np.ndarray:
    pred = x >= threshold if inclusive else x > threshold
    tp = (pred & y).sum(axis=1).astype(np.float64)
    denom = pred.sum(axis=1) + y.sum(axis=1)  # = 2 TP + FP + FN
    # No true and no predicted label: 0/0, set to 0.0 (sklearn's default zero_division).
    return np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 0.0)


def sample_f1(logits, labels, threshold: float = 0.0, inclusive: bool = False) -> float:
    """Sample-averaged F1 with predictions ``logits > threshold`` (0.0 = probability 0.5), or
    ``logits >= threshold`` with ``inclusive`` (the reference's ``output >= 0.5``).

    Equals ``sklearn.metrics.f1_score(labels, logits > threshold, average="samples")`` with the
    default ``zero_division``: samples with no true and no predicted label contribute 0.0.
    """
    x, y = _check_pair(logits, labels)
    if x.shape[0] == 0:
        raise ValueError("sample_f1 needs at least one sample")
    return float(_per_sample_f1(x, y, threshold, inclusive).mean())


def classification_metrics(logits, labels) -> dict[str, float]:
    """Every classification metric in one call (fractions in [0, 1]):

    - ``mAP``: VOC classification mAP over classes, sklearn's non-interpolated AP;
    - ``mAP_devkit``: the same with the VOC devkit's envelope AP;
    - ``per_image_AP``: the reference's per-image AP (the paper's "mAP");
    - ``F1``: sample F1 at probability 0.5 (logit > 0);
    - ``F1_logit0.5``: sample F1 at logit >= 0.5 (the reference's and the paper's F1);
    - ``skipped_classes``: int, classes without a positive (left out of both mAPs).
    """
    x, y = _check_pair(logits, labels)
    m_ap, per_class = voc_map(x, y)
    return {
        "mAP": m_ap,
        "mAP_devkit": voc_map(x, y, devkit=True)[0],
        "per_image_AP": per_image_ap(x, y),
        "F1": sample_f1(x, y),
        "F1_logit0.5": sample_f1(x, y, F1_LOGIT_THRESHOLD, inclusive=True),
        "skipped_classes": int(np.isnan(per_class).sum()),
    }


def multilabel_counts(
    logits: jax.Array, labels: jax.Array, valid: jax.Array, threshold: float = 0.0
) -> dict[str, jax.Array]:
    """Per-batch sums for F1 that can be accumulated on device.

    Args:
      logits: (B, K) float.
      labels: (B, K) {0,1} (bool, int or float).
      valid: (B,) bool (or 0/1): padded rows are False and contribute nothing.
      threshold: predictions are ``logits > threshold`` (0.0 = probability 0.5).

    Returns ``{'f1_sum': sum over valid samples of per-sample F1 (float32; 0.0 for a sample with no
    true and no predicted label, sklearn's default zero_division), 'count': number of valid samples
    (int32)}``. Sum both over batches; ``f1_sum / count`` equals :func:`sample_f1`. Jittable, no
    host sync.
    """
    pred = logits > threshold
    y = labels > 0.5 if jnp.issubdtype(labels.dtype, jnp.floating) else labels.astype(bool)
    tp = jnp.sum(pred & y, axis=-1).astype(jnp.float32)
    denom = (jnp.sum(pred, axis=-1) + jnp.sum(y, axis=-1)).astype(jnp.float32)
    f1 = jnp.where(denom > 0, 2.0 * tp / jnp.maximum(denom, 1.0), 0.0)
    v = valid.astype(bool)
    return {
        "f1_sum": jnp.sum(jnp.where(v, f1, 0.0)),
        "count": jnp.sum(v, dtype=jnp.int32),
    }
