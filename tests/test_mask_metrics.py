"""The localisation metrics against the class mask (RMA, RRA, AttrLoc, TopK, EnergyPoint): each computed
from its definition in numpy float64 on small hand-built maps, ties and empty masks included."""

import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest

from apjax.evaluators import mask_metrics as mm


def _top_share_by_enumeration(a: np.ndarray, m: np.ndarray, k: int) -> float:
    """The share of the k highest pixels in the mask, averaged over every equally likely choice among the
    pixels tied at the k-th value (a random order of the ties): the definition with ties shared."""
    a, m = a.ravel(), m.ravel()
    order = np.argsort(-a, kind="stable")
    threshold = a[order[k - 1]]
    above = np.flatnonzero(a > threshold)
    tied = np.flatnonzero(a == threshold)
    if math.comb(len(tied), k - len(above)) > 10_000:  # too many choices: their mean, the hypergeometric one
        return float((m[above].sum() + (k - len(above)) * m[tied].mean()) / k)
    shares = [
        (m[above].sum() + m[list(chosen)].sum()) / k
        for chosen in itertools.combinations(tied, k - len(above))
    ]
    return float(np.mean(shares))


def _numpy_metrics(a: np.ndarray, m: np.ndarray) -> dict[str, float]:
    a, m = a.astype(np.float64), m.astype(bool)
    if not m.any():
        return dict.fromkeys(mm.MASK_METRICS, np.nan)
    k = round(mm.TOP_K_SHARE * a.size) or 1
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    box = np.zeros_like(m)
    box[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
    pos = np.maximum(a, 0)
    ratio = lambda num, den: num / den if den != 0 else np.nan  # noqa: E731
    return {
        "RMA": ratio(a[m].sum(), a.sum()),
        "RRA": _top_share_by_enumeration(a, m, int(m.sum())),
        "AttrLoc": ratio(np.abs(a)[m].sum(), np.abs(a).sum()),
        "TopK": _top_share_by_enumeration(a, m, k),
        "EnergyPoint": ratio(pos[box].sum(), pos.sum()),
    }


def _cases():
    """4 x 5 maps (k = round(0.02 * 20) = 0 -> 1 top pixel) and their masks, by hand."""
    m1 = np.zeros((4, 5), bool)
    m1[1:3, 1:3] = True  # 4 pixels
    a1 = np.arange(20, dtype=np.float32).reshape(4, 5) / 10  # distinct values, max outside the mask
    a2 = np.zeros((4, 5), np.float32)
    a2[1, 1], a2[0, 0], a2[3, 4] = 1.0, 0.5, 0.5  # K = 4: the 17 zeros share the 4th slot
    a3 = np.full((4, 5), 0.25, np.float32)  # a constant map: every pixel tied
    a4 = a1 - 1.0  # signed: negative inside the mask
    m2 = np.zeros((4, 5), bool)
    m2[0, 4], m2[3, 0] = True, True  # two opposite corners: the box is the whole map
    a5 = np.zeros((4, 5), np.float32)  # all zero: the ratios have no value
    empty = np.zeros((4, 5), bool)
    maps = np.stack([a1, a2, a3, a4, a1, a5, a1])
    masks = np.stack([m1, m1, m1, m1, m2, m1, empty])
    return maps, masks


def test_mask_metrics_equal_their_definitions():
    maps, masks = _cases()
    got = {k: np.asarray(v) for k, v in mm.mask_metrics(jnp.asarray(maps), jnp.asarray(masks)).items()}
    for i in range(len(maps)):
        want = _numpy_metrics(maps[i], masks[i])
        for key in mm.MASK_METRICS:
            np.testing.assert_allclose(got[key][i], want[key], rtol=1e-6, atol=1e-7, err_msg=f"{key} map {i}")


def test_mask_metrics_by_hand():
    """A few values worked out on paper for the cases above."""
    maps, masks = _cases()
    got = {k: np.asarray(v) for k, v in mm.mask_metrics(jnp.asarray(maps), jnp.asarray(masks)).items()}
    # Map 1 (values 0.0 .. 1.9 row-major), mask rows 1-2, cols 1-2: values 0.6, 0.7, 1.1, 1.2 of a total 19.
    assert got["RMA"][0] == pytest.approx(3.6 / 19.0)
    assert got["RRA"][0] == 0.0  # the 4 highest pixels are 1.6 .. 1.9 (row 3)
    # Map 2: one mask pixel holds the maximum 1, two 0.5 outside; K = 4: the top 3 are distinct, the 4th
    # slot is shared by the 17 zeros, 3 of them in the mask: (1 + 3/17) / 4.
    assert got["RRA"][1] == pytest.approx((1 + 3 / 17) / 4)
    assert got["TopK"][1] == 1.0  # k = 1: the maximum is in the mask
    # A constant map: every ranking is a tie, so each share is the mask's share of the pixels (4 of 20).
    assert got["RRA"][2] == pytest.approx(0.2) and got["TopK"][2] == pytest.approx(0.2)
    assert got["RMA"][2] == pytest.approx(0.2) and got["EnergyPoint"][2] == pytest.approx(0.2)
    # Two far mask pixels: their bounding box is the whole map, so all the energy is in it.
    assert got["EnergyPoint"][4] == 1.0
    # An all-zero map has no ratio; an empty mask has no value at all.
    assert np.isnan(got["RMA"][5]) and np.isnan(got["AttrLoc"][5]) and np.isnan(got["EnergyPoint"][5])
    assert got["RRA"][5] == pytest.approx(0.2)  # all tied at zero: the mask's share
    assert all(np.isnan(got[k][6]) for k in mm.MASK_METRICS)


def test_box_of_a_mask():
    m = np.zeros((1, 6, 7), bool)
    m[0, 2, 1], m[0, 4, 5] = True, True
    want = np.zeros((1, 6, 7), bool)
    want[0, 2:5, 1:6] = True
    np.testing.assert_array_equal(np.asarray(mm.box_of(jnp.asarray(m))), want)
    assert not np.asarray(mm.box_of(jnp.zeros((1, 3, 3), bool))).any()
