"""Tests of apjax.localization: AUC against sklearn (with ties), pointing game, pairs, similarity."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from apjax import localization as loc


def _sk_auc(maps, targets):
    out = []
    for m, t in zip(maps, targets, strict=True):
        t = t.ravel()
        out.append(roc_auc_score(t, m.ravel()) if 0 < t.sum() < t.size else np.nan)
    return np.array(out)


def _tied_maps(rng, p=40, h=12, w=13):
    """Maps with many ties: rounded to one decimal, one mostly zero, one constant, one with -0.0 and 0.0."""
    maps = np.round(rng.normal(size=(p, h, w)), 1).astype(np.float32)
    maps[0] = np.where(rng.random((h, w)) < 0.8, 0.0, maps[0])
    maps[1] = 0.0
    maps[2] = np.where(rng.random((h, w)) < 0.5, np.float32(-0.0), np.float32(0.0))
    maps[2, 0, :3] = 1.0
    targets = rng.random((p, h, w)) < rng.uniform(0.05, 0.95, size=(p, 1, 1))
    targets[0] |= maps[0] > 0  # correlated with the map
    targets[1, 0, 0] = True
    targets[1, 0, 1] = False
    return maps, targets


def test_roc_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    maps, targets = _tied_maps(rng)
    got = loc.roc_auc(maps, targets)
    want = _sk_auc(maps, targets)
    assert got.dtype == np.float64 and got.shape == (maps.shape[0],)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert got[1] == 0.5  # constant map: every pair is a tie
    # float64 maps (argsort path) and integer maps give the same values.
    np.testing.assert_allclose(loc.roc_auc(maps.astype(np.float64), targets), want, rtol=0, atol=1e-12)
    ints = np.round(maps * 10).astype(np.int16)
    np.testing.assert_allclose(loc.roc_auc(ints, targets), _sk_auc(ints, targets), rtol=0, atol=1e-12)


def test_roc_auc_nan_without_both_classes_and_chunking(monkeypatch):
    rng = np.random.default_rng(1)
    maps, targets = _tied_maps(rng, p=9)
    targets[3] = False  # no positive
    targets[4] = True  # no negative
    want = _sk_auc(maps, targets)
    assert np.isnan(want[3]) and np.isnan(want[4])
    got = loc.roc_auc(maps, targets)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    monkeypatch.setattr(loc, "_CHUNK_ELEMENTS", 2 * 12 * 13)  # two maps per chunk, last chunk partial
    np.testing.assert_array_equal(loc.roc_auc(maps, targets), got)
    with pytest.raises(ValueError, match="NaN"):
        loc.roc_auc(np.full((1, 2, 2), np.nan), np.eye(2, dtype=bool)[None])
    assert loc.roc_auc(np.zeros((0, 4, 4)), np.zeros((0, 4, 4), bool)).shape == (0,)


def test_roc_auc_perfect_and_inverted():
    m = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    t = m >= 10
    assert loc.roc_auc(m, t)[0] == 1.0
    assert loc.roc_auc(-m, t)[0] == 0.0


def test_roc_auc_jax_matches_numpy():
    rng = np.random.default_rng(2)
    maps, targets = _tied_maps(rng, p=30)
    targets[5] = False
    want = loc.roc_auc(maps, targets)
    got = np.asarray(loc.roc_auc_jax(maps, targets))
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=0, atol=1e-5)
    # Batched leading dimensions are kept.
    got2 = np.asarray(loc.roc_auc_jax(maps[:30].reshape(5, 6, 12, 13), targets[:30].reshape(5, 6, 12, 13)))
    np.testing.assert_array_equal(got2.reshape(-1), got)


def _one_hot_map(h, w, r, c, value=1.0):
    m = np.zeros((h, w), np.float32)
    m[r, c] = value
    return m


def test_pointing_game_hit_miss_constant_and_ties():
    h, w = 6, 7
    target = np.zeros((h, w), bool)
    target[1:3, 1:3] = True
    maps = np.stack(
        [
            _one_hot_map(h, w, 2, 2),  # hit
            _one_hot_map(h, w, 4, 5),  # miss
            np.zeros((h, w), np.float32),  # constant: miss, flagged
            np.full((h, w), 3.0, np.float32),  # constant non-zero: miss, flagged
            _one_hot_map(h, w, 1, 1) + _one_hot_map(h, w, 5, 6),  # tie: first in row-major (1, 1) -> hit
            _one_hot_map(h, w, 0, 6) + _one_hot_map(h, w, 2, 1),  # tie: first is (0, 6) -> miss
        ]
    )
    targets = np.broadcast_to(target, maps.shape)
    hits, constant = loc.pointing_game(maps, targets)
    np.testing.assert_array_equal(hits, [True, False, False, False, True, False])
    np.testing.assert_array_equal(constant, [False, False, True, True, False, False])
    # A constant map stays a miss even when the target covers everything (and with a tolerance).
    hits, constant = loc.pointing_game(np.zeros((1, h, w)), np.ones((1, h, w), bool), tolerance=3)
    assert not hits[0] and constant[0]


def test_pointing_game_tolerance():
    h, w = 10, 10
    target = np.zeros((1, h, w), bool)
    target[0, 2, 2] = True
    m = _one_hot_map(h, w, 5, 6)[None]  # distance to (2, 2): sqrt(3^2 + 4^2) = 5
    for tol, want in [(0, False), (4.9, False), (5, True), (5.0, True), (7.5, True)]:
        hits, _ = loc.pointing_game(m, target, tolerance=tol)
        assert hits[0] == want, tol
    with pytest.raises(ValueError):
        loc.pointing_game(m, target, tolerance=-1)


def test_reference_cumulative_target_on_classes_2_5_9():
    # Image 0's mask holds the values 2, 5 and 9 (class indices 1, 4 and 8), void and background; image 1
    # holds only value 5. The reference, looping over the present classes in index order, has accepted the
    # pixels of every present class up to the current one: for class index 1 the value-2 pixels; for 4
    # the values 2 and 5; for 8 the values 2, 5 and 9, whether 4 was predicted or not.
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[0, :2, :2] = 2
    masks[0, 3:5, 3:5] = 5
    masks[0, 6:, 6:] = 9
    masks[0, 7, :3] = 255
    masks[1, 2:6, 2:6] = 5
    logits = np.full((2, 10), -1.0)
    logits[0, [1, 8, 6]] = 1.0  # class 4 present, not predicted; class 6 predicted, absent
    logits[1, 4] = 1.0
    pairs = loc.localization_pairs(masks, logits)
    np.testing.assert_array_equal(pairs, [[0, 1], [0, 8], [1, 4]])
    got = loc.reference_cumulative_targets(masks, pairs)
    np.testing.assert_array_equal(got[0], masks[0] == 2)
    np.testing.assert_array_equal(got[1], (masks[0] == 2) | (masks[0] == 5) | (masks[0] == 9))
    np.testing.assert_array_equal(got[2], masks[1] == 5)
    # The pair (0, 4) itself (were class 4 predicted): values 2 and 5.
    np.testing.assert_array_equal(
        loc.reference_cumulative_targets(masks, [[0, 4]])[0], (masks[0] == 2) | (masks[0] == 5)
    )
    assert not got[1][masks[0] == 255].any() and not got[1][masks[0] == 0].any()  # void, background

    # Maps that peak on the value-5 object: class 8's is a miss for its own mask and a hit for the
    # reference's; class 1's is a miss in both (5 comes after class 1); image 1's is a hit in both.
    maps = np.zeros((3, 8, 8), np.float32)
    maps[0, 4, 4] = maps[1, 3, 3] = maps[2, 3, 3] = 1.0
    hits_own, _ = loc.pointing_game(maps, loc.class_targets(masks, pairs))
    hits_ref, _ = loc.pointing_game(maps, got)
    np.testing.assert_array_equal(hits_own, [False, False, True])
    np.testing.assert_array_equal(hits_ref, [False, True, True])
    # A peak on void is a miss in both.
    on_void = np.zeros((1, 8, 8), np.float32)
    on_void[0, 7, 1] = 1.0
    assert not loc.pointing_game(on_void, got[1:2])[0][0]


def test_localization_pairs():
    masks = np.zeros((3, 5, 5), np.uint8)
    masks[0, 0, 0] = 1  # class 0 present
    masks[0, 1, 1] = 3  # class 2 present
    masks[0, 4, :] = 255  # void: never a class
    masks[1, 2, 2] = 2  # class 1 present, not predicted
    masks[2] = 255  # only void
    logits = np.array(
        [
            [0.5, 2.0, 1.0, -1.0],  # class 0 present+predicted, class 1 predicted but absent, class 2 both
            [3.0, -0.1, 0.0, 0.0],  # class 1 present but not predicted; logit 0 is not a prediction
            [1.0, 1.0, 1.0, 1.0],  # nothing present
        ]
    )
    pairs = loc.localization_pairs(masks, logits)
    np.testing.assert_array_equal(pairs, [[0, 0], [0, 2]])
    assert pairs.dtype == np.int64
    logits[1, 1] = 0.1
    np.testing.assert_array_equal(loc.localization_pairs(masks, logits), [[0, 0], [0, 2], [1, 1]])
    # Sorted by image then class.
    masks2 = np.zeros((2, 2, 2), np.uint8)
    masks2[0] = [[2, 1], [0, 0]]
    masks2[1] = [[3, 1], [2, 0]]
    np.testing.assert_array_equal(
        loc.localization_pairs(masks2, np.ones((2, 3))), [[0, 0], [0, 1], [1, 0], [1, 1], [1, 2]]
    )
    assert loc.localization_pairs(masks2, -np.ones((2, 3))).shape == (0, 2)


def test_minmax_and_similarity_by_hand():
    a = np.array([[[1.0, 3.0], [5.0, 2.0]]])
    np.testing.assert_allclose(loc.minmax_normalize(a), [[[0.0, 0.5], [1.0, 0.25]]])
    const = np.full((1, 2, 2), 7.0, np.float32)
    z = loc.minmax_normalize(const)
    np.testing.assert_array_equal(z, 0)
    assert z.dtype == np.float32

    # Identical maps (up to an affine change): cos 1, l2 0.
    sim = loc.map_similarity(a, 2 * a + 1)
    np.testing.assert_allclose(sim["cos"], [1.0])
    np.testing.assert_allclose(sim["l2"], [0.0], atol=1e-12)

    # Known example: x = [0, 1, 0, 0] and y = [0, 1, 1, 0] after normalisation.
    x = np.array([[[0.0, 2.0], [0.0, 0.0]]])
    y = np.array([[[-1.0, 4.0], [4.0, -1.0]]])
    sim = loc.map_similarity(x, y)
    np.testing.assert_allclose(sim["cos"], [1 / np.sqrt(2)])
    np.testing.assert_allclose(sim["l2"], [1.0])

    # A constant map is all zeros: cos 0 by convention, l2 the norm of the other normalised map.
    sim = loc.map_similarity(np.zeros((1, 2, 2)), a)
    np.testing.assert_allclose(sim["cos"], [0.0])
    np.testing.assert_allclose(sim["l2"], [np.sqrt(1 + 0.25 + 0.0625)])
    with pytest.raises(ValueError):
        loc.map_similarity(a, np.zeros((1, 2, 3)))


def test_localization_summary():
    masks = np.zeros((2, 6, 6), np.uint8)
    masks[0, :2, :2] = 1
    masks[0, 4:, 4:] = 2
    masks[1, 2:4, 2:4] = 1
    logits = np.array([[1.0, 1.0], [1.0, -1.0]])
    pairs = loc.localization_pairs(masks, logits)
    np.testing.assert_array_equal(pairs, [[0, 0], [0, 1], [1, 0]])
    maps = np.zeros((3, 6, 6), np.float32)
    maps[0, 0, 0] = 1.0  # class index 0's map on its own object: a hit in both
    maps[1, 0, 0] = 1.0  # class index 1's map on class 0's object: a miss, a hit for the reference (0 <= 1)
    # maps[2] stays all zero: constant, miss, AUC 0.5
    out = loc.localization_summary(maps, masks, pairs)
    want_auc = _sk_auc(maps, loc.class_targets(masks, pairs)).mean()
    assert out["AUC"] == pytest.approx(want_auc)
    assert out["auc_pairs"] == 3 and out["pairs"] == 3 and out["constant_maps"] == 1
    assert out["Point"] == pytest.approx(1 / 3)
    assert out["Point_ref_cumulative"] == pytest.approx(2 / 3)
    empty = loc.localization_summary(np.zeros((0, 6, 6)), masks, np.zeros((0, 2), int))
    assert empty["pairs"] == 0 and np.isnan(empty["AUC"]) and np.isnan(empty["Point"])
    with pytest.raises(ValueError):
        loc.localization_summary(np.zeros((3, 5, 5)), masks, pairs)
