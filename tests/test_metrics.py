"""Classification metrics against sklearn and hand-computed values."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import average_precision_score, f1_score

from apjax import metrics


def _random_problem(seed, n=300, k=20, decimals=None):
    """Random multi-label problem with empty classes, empty rows and (optionally) tied scores."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, k)) < 0.15).astype(np.int32)
    labels[:, 3] = 0  # a class with no positive
    labels[:, 7] = 0
    labels[: n // 10] = 0  # rows with no positive
    logits = rng.normal(size=(n, k)) + 1.5 * labels - 1.0
    logits[n // 20 : n // 10] = -5.0  # rows with no positive and no prediction
    if decimals is not None:
        logits = np.round(logits, decimals)
    return logits.astype(np.float32), labels


def _sk_voc_map(logits, labels):
    aps = [
        average_precision_score(labels[:, j], logits[:, j])
        for j in range(labels.shape[1])
        if labels[:, j].any()
    ]
    return float(np.mean(aps))


def _sk_per_image(logits, labels):
    aps = [average_precision_score(labels[i], logits[i]) for i in range(labels.shape[0]) if labels[i].any()]
    return float(np.mean(aps))


def _sk_f1(logits, labels, threshold=0.0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        return float(f1_score(labels, logits > threshold, average="samples"))


def _devkit_ap(scores, targets):
    """The VOC devkit's VOCevalcls + VOCap (VOC2010+), step by step: stable sort by decreasing score,
    precision and recall after each item, sentinels (0, 0) and (1, 0), the precision made monotone from
    the right, then the sum over the points where recall changes."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # Python's sort is stable, like MATLAB's
    tp = fp = 0
    rec, prec = [], []
    for i in order:
        tp += targets[i] == 1
        fp += targets[i] != 1
        rec.append(tp / sum(t == 1 for t in targets))
        prec.append(tp / (tp + fp))
    mrec = [0.0, *rec, 1.0]
    mpre = [0.0, *prec, 0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


def _devkit_voc_map(logits, labels):
    aps = [
        _devkit_ap(logits[:, j].tolist(), labels[:, j].tolist())
        for j in range(labels.shape[1])
        if labels[:, j].any()
    ]
    return float(np.mean(aps))


def test_devkit_ap_hand_example():
    # Ranked: pos, neg, neg, pos, pos (P = 3). Precision after each positive: 1, 2/4, 3/5.
    # Non-interpolated: (1 + 1/2 + 3/5) / 3 = 0.7. The envelope at recall 2/3 is max(1/2, 3/5) = 3/5:
    # devkit AP = (1 + 3/5 + 3/5) / 3 = 11/15.
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    targets = np.array([1, 0, 0, 1, 1])
    assert metrics.average_precision(scores, targets) == pytest.approx(0.7, abs=1e-12)
    assert metrics.average_precision(scores, targets, devkit=True) == pytest.approx(11 / 15, abs=1e-12)
    # With a tie group (0.9 pos | 0.5, 0.5, 0.5: pos, neg, pos | 0.1 pos): precisions at the thresholds
    # 1, 3/4, 4/5; the envelope at recall 3/4 is 4/5: AP = 1/4 * 1 + 2/4 * 4/5 + 1/4 * 4/5 = 0.85.
    scores = np.array([0.5, 0.1, 0.9, 0.5, 0.5])
    targets = np.array([1, 1, 1, 0, 1])
    assert metrics.average_precision(scores, targets, devkit=True) == pytest.approx(0.85, abs=1e-12)


def test_devkit_voc_map_matches_the_devkit_steps():
    logits, labels = _random_problem(5, n=120)  # continuous scores: no ties, where the devkit is exact
    m_dev, per_dev = metrics.voc_map(logits, labels, devkit=True)
    m_sk, per_sk = metrics.voc_map(logits, labels)
    assert m_dev == pytest.approx(_devkit_voc_map(logits, labels), abs=1e-12)
    np.testing.assert_array_equal(np.isnan(per_dev), np.isnan(per_sk))
    ok = ~np.isnan(per_sk)
    assert (per_dev[ok] >= per_sk[ok] - 1e-12).all() and m_dev > m_sk  # the envelope only raises precision


def test_f1_at_logit_half_hand_example():
    logits = np.array([[0.5, 0.4, -1.0], [0.7, 0.6, 0.2]])
    labels = np.array([[1, 1, 0], [0, 1, 1]])
    # logit >= 0.5 (0.5 itself counts, as in the reference's `output >= 0.5`): row 0 predicts {0} of {0, 1}:
    # F1 = 2 * 1 / (1 + 2) = 2/3; row 1 predicts {0, 1} of {1, 2}: 2 * 1 / (2 + 2) = 1/2. Mean 7/12.
    out = metrics.classification_metrics(logits, labels)
    assert out["F1_logit0.5"] == pytest.approx(7 / 12, abs=1e-12)
    # Probability 0.5 (logit > 0): row 0 predicts {0, 1}: F1 = 1; row 1 predicts all three: 4/5. Mean 0.9.
    assert out["F1"] == pytest.approx(0.9, abs=1e-12)
    assert metrics.sample_f1(logits, labels, 0.5) == pytest.approx(0.5 * (0.0 + 0.5), abs=1e-12)


def test_average_precision_hand_example():
    ap = metrics.average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0]))
    assert ap == pytest.approx(0.5 * (1.0 + 2.0 / 3.0), abs=1e-12)


def test_average_precision_ties_hand_example():
    # Sorted: 0.9 (pos) | 0.5, 0.5, 0.5 (pos, neg, pos: one threshold) | 0.1 (pos). P = 4.
    # Thresholds: after 0.9 -> R=1/4, P=1; after the tie group -> R=3/4, P=3/4; after 0.1 -> R=1, P=4/5.
    # AP = 1/4 * 1 + 2/4 * 3/4 + 1/4 * 4/5 = 0.25 + 0.375 + 0.2 = 0.825.
    scores = np.array([0.5, 0.1, 0.9, 0.5, 0.5])
    targets = np.array([1, 1, 1, 0, 1])
    ap = metrics.average_precision(scores, targets)
    assert ap == pytest.approx(0.825, abs=1e-12)
    assert ap == pytest.approx(average_precision_score(targets, scores), abs=1e-12)
    # Order within the tie group must not matter.
    perm = np.array([3, 0, 1, 4, 2])
    assert metrics.average_precision(scores[perm], targets[perm]) == pytest.approx(0.825, abs=1e-12)


def test_average_precision_all_tied_and_errors():
    # All scores tied: AP = prevalence.
    assert metrics.average_precision(np.zeros(5), np.array([1, 0, 0, 1, 0])) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        metrics.average_precision(np.array([0.1, 0.2]), np.array([0, 0]))
    with pytest.raises(ValueError):
        metrics.average_precision(np.array([0.1, 0.2]), np.array([0, 2]))


@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_voc_map_matches_sklearn(decimals):
    logits, labels = _random_problem(0, decimals=decimals)
    m_ap, per_class = metrics.voc_map(logits, labels)
    assert per_class.shape == (labels.shape[1],)
    assert np.isnan(per_class[3]) and np.isnan(per_class[7])
    assert np.isnan(per_class).sum() == 2
    assert m_ap == pytest.approx(_sk_voc_map(logits, labels), abs=1e-12)
    for j in np.flatnonzero(labels.any(axis=0)):
        assert per_class[j] == pytest.approx(average_precision_score(labels[:, j], logits[:, j]), abs=1e-12)


@pytest.mark.parametrize("decimals", [None, 1])
def test_per_image_ap_matches_sklearn(decimals):
    logits, labels = _random_problem(1, decimals=decimals)
    assert metrics.per_image_ap(logits, labels) == pytest.approx(_sk_per_image(logits, labels), abs=1e-12)


def test_per_image_ap_differs_from_voc_map():
    logits, labels = _random_problem(2)
    m_ap, _ = metrics.voc_map(logits, labels)
    assert abs(metrics.per_image_ap(logits, labels) - m_ap) > 1e-6


def test_sklearn_zero_division_default_is_zero():
    # Pins the convention matched here: a sample with no true and no predicted label scores 0.0 under
    # sklearn's default zero_division ("warn"), with an UndefinedMetricWarning.
    y = np.array([[0, 0, 0], [1, 0, 0]])
    p = np.array([[0, 0, 0], [1, 0, 0]])
    with pytest.warns(UndefinedMetricWarning):
        assert f1_score(y, p, average="samples") == pytest.approx(0.5)
    assert metrics.sample_f1(np.where(p > 0, 1.0, -1.0), y) == pytest.approx(0.5)


@pytest.mark.parametrize("threshold", [0.0, 0.7])
def test_sample_f1_matches_sklearn(threshold):
    logits, labels = _random_problem(3, decimals=1)
    # Some rows have labels but no prediction, some predictions but no label, some neither.
    assert ((labels.sum(1) == 0) & ((logits > threshold).sum(1) == 0)).any()
    assert ((labels.sum(1) > 0) & ((logits > threshold).sum(1) == 0)).any()
    got = metrics.sample_f1(logits, labels, threshold=threshold)
    assert got == pytest.approx(_sk_f1(logits, labels, threshold), abs=1e-12)


def test_classification_metrics_and_jax_inputs():
    logits, labels = _random_problem(4, decimals=1)
    out = metrics.classification_metrics(jnp.asarray(logits), jnp.asarray(labels))
    assert set(out) == {"mAP", "mAP_devkit", "per_image_AP", "F1", "F1_logit0.5", "skipped_classes"}
    assert out["mAP"] == pytest.approx(_sk_voc_map(logits, labels), abs=1e-12)
    assert out["per_image_AP"] == pytest.approx(_sk_per_image(logits, labels), abs=1e-12)
    assert out["F1"] == pytest.approx(_sk_f1(logits, labels), abs=1e-12)
    # The reference's F1: its own call, f1_score(labels, outputs >= 0.5, average="samples").
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        want = f1_score(labels, logits >= 0.5, average="samples")
    assert out["F1_logit0.5"] == pytest.approx(want, abs=1e-12)
    # (Tied scores here: the devkit's own steps would break ties by image order; see the tie-free test.)
    assert out["mAP_devkit"] >= out["mAP"]
    assert out["skipped_classes"] == 2 and isinstance(out["skipped_classes"], int)
    for key in ("mAP", "mAP_devkit", "per_image_AP", "F1", "F1_logit0.5"):
        assert 0.0 <= out[key] <= 1.0


def test_perfect_and_empty():
    labels = np.eye(4, dtype=np.int32)
    logits = np.where(labels > 0, 3.0, -3.0)
    out = metrics.classification_metrics(logits, labels)
    assert out == {
        "mAP": 1.0,
        "mAP_devkit": 1.0,
        "per_image_AP": 1.0,
        "F1": 1.0,
        "F1_logit0.5": 1.0,
        "skipped_classes": 0,
    }
    m_ap, per_class = metrics.voc_map(logits, np.zeros_like(labels))
    assert np.isnan(m_ap) and np.isnan(per_class).all()
    assert np.isnan(metrics.per_image_ap(logits, np.zeros_like(labels)))


def test_multilabel_counts_jit_matches_sample_f1():
    logits, labels = _random_problem(6, n=250, decimals=1)
    batch = 64
    step = jax.jit(metrics.multilabel_counts)
    f1_sum = jnp.zeros((), jnp.float32)
    count = jnp.zeros((), jnp.int32)
    for start in range(0, len(logits), batch):
        x = logits[start : start + batch]
        y = labels[start : start + batch]
        n_valid = len(x)
        pad = batch - n_valid
        # Padded rows are built to score a perfect F1 if they were counted.
        x = np.concatenate([x, np.full((pad, x.shape[1]), 5.0, np.float32)])
        y = np.concatenate([y, np.ones((pad, y.shape[1]), np.int32)])
        valid = np.arange(batch) < n_valid
        out = step(jnp.asarray(x), jnp.asarray(y), jnp.asarray(valid))
        f1_sum = f1_sum + out["f1_sum"]
        count = count + out["count"]
    assert int(count) == len(logits)
    assert float(f1_sum) / int(count) == pytest.approx(metrics.sample_f1(logits, labels), abs=1e-5)
    assert float(f1_sum) / int(count) == pytest.approx(_sk_f1(logits, labels), abs=1e-5)
