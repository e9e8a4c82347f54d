"""Localisation metrics of attribution maps (SPEC section 7, "Localization" and "Teacher/student similarity").

Conventions shared by every function here:

- A segmentation mask is a uint8 (H, W) class-index map: 0 is background, 1..K are the K classes and 255
  is VOC's "void" border, which counts as background (the binary mask of class k is ``mask == k``).
- A *pair* is an (image index, class index 0..K-1) with class ``k + 1`` present in the image's mask AND
  predicted (``logits[n, k] > 0``). :func:`localization_pairs` lists them; every per-pair array below is
  aligned with that list (row p of ``maps`` is the map of pair p, at the masks' resolution).
- All fractions are in [0, 1], not percentages.

AUC (:func:`roc_auc`, :func:`roc_auc_jax`): the per-pixel ROC-AUC of a map against a binary target, with
the pixels as samples. It equals ``sklearn.metrics.roc_auc_score(target.ravel(), map.ravel())`` including
ties, through the Mann-Whitney form ``AUC = U / (n_pos n_neg)`` with
``U = sum over positive pixels of (#negatives with a smaller value + 1/2 #negatives with an equal value)``.
After one sort per map, the two counts of a positive are read off its tie group: the number of negatives
before the group starts and the number up to the group's end (a running max / reversed running min of the
cumulative negative count at the group boundaries), so ``2U`` is an exact integer sum. A target with no
positive or no negative pixel has no AUC: NaN (sklearn raises there).

Pointing game (:func:`pointing_game`): the map's arg-max pixel is a hit if it lies in the target. Ties of
the maximum are broken by taking the FIRST arg-max in row-major order (``np.argmax`` of the flattened map).
A constant map (all pixels equal, e.g. all zero) has no arg-max: it is a miss and is flagged as constant.
``tolerance`` (pixels): a hit if some target pixel lies within Euclidean distance ``<= tolerance`` of the
arg-max (``tolerance=0``: the arg-max pixel itself). TorchRay's pointing game uses the strict test
``distance < tolerance``; its default 15 equals ``tolerance=sqrt(224)`` here (integer pixel grid), and
TorchRay's rule accepts nothing at tolerance 0, which is why the inclusive form is used here.

The reference's variant (:func:`reference_cumulative_targets`, reported as ``Point_ref_cumulative`` next to
the per-class ``Point``): the reference loops over the image's present classes in index order and appends
each class's mask pixels to one list of accepted points BEFORE it checks whether that class is predicted,
so for the pair of class k it accepts the pixels of every class j <= k present in the mask (predicted or
not), never those of a class after k. Its arg-max is also the first maximum in row-major order. It is the
same as ``Point`` for the image's lowest present class and only ever accepts more.

Similarity (:func:`map_similarity`): both maps min-max normalised to [0, 1] (a constant map becomes all
zeros) at the evaluation resolution (227x227 for VOC), then the cosine similarity and the l2 distance (the
Euclidean norm of the difference over all pixels). The cosine with an all-zero map is defined as 0
(as ``sklearn.metrics.pairwise.cosine_similarity`` does).

Host functions accept numpy or jax arrays, work in chunks of maps (bounded memory for thousands of 227x227
maps) and return numpy arrays; :func:`roc_auc_jax` is the jittable device-side AUC.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "VOID",
    "localization_pairs",
    "class_targets",
    "reference_cumulative_targets",
    "roc_auc",
    "roc_auc_jax",
    "roc_auc_counts_jax",
    "pointing_game",
    "minmax_normalize",
    "map_similarity",
    "pair_scores",
    "summarize_pair_scores",
    "localization_summary",
]

VOID = 255
"""Mask value of VOC's void/border pixels; never a class, counted as background."""

# Elements per chunk of maps processed at once by the host functions (~16M: a few hundred 227x227 maps).
_CHUNK_ELEMENTS = 1 << 24


def _chunks(num: int, per_item: int):
    """Yield slices covering range(num) with about _CHUNK_ELEMENTS elements each."""
    step = max(1, _CHUNK_ELEMENTS // max(1, per_item))
    for start in range(0, num, step):
        yield slice(start, min(num, start + step))


def _as_maps(maps, name: str = "maps") -> np.ndarray:
    arr = np.asarray(maps)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be (P, H, W), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    return arr


def _as_targets(targets, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(targets)
    if arr.shape != shape:
        raise ValueError(f"targets must have shape {shape} (that of maps), got {arr.shape}")
    return arr if arr.dtype == np.bool_ else arr != 0


# ---------------------------------------------------------------------------------------------------------
# Pairs and targets
# ---------------------------------------------------------------------------------------------------------


def localization_pairs(masks: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Pairs (image index, class index 0..K-1) where class k+1 is in the mask and ``logits[n, k] > 0``.

    masks: uint8 (N, H, W) class-index maps (0 background, 1..K classes, 255 void); logits: (N, K).
    Returns int64 (P, 2), sorted by image then class. Mask values above K (255 included) never make a class
    present.
    """
    masks = np.asarray(masks)
    logits = np.asarray(logits)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    if logits.ndim != 2 or logits.shape[0] != masks.shape[0]:
        raise ValueError(f"logits must be (N, K) with N = {masks.shape[0]}, got shape {logits.shape}")
    num_classes = logits.shape[1]
    if num_classes >= VOID:
        raise ValueError(f"at most {VOID - 1} classes fit a uint8 mask with void {VOID}, got {num_classes}")
    if masks.dtype != np.uint8:
        if masks.size and (masks.min() < 0 or masks.max() > 255):
            raise ValueError("masks must hold uint8 values 0..255")
        masks = masks.astype(np.uint8)
    present = np.zeros((masks.shape[0], 256), dtype=bool)
    for n in range(masks.shape[0]):
        present[n] = np.bincount(masks[n].ravel(), minlength=256) > 0
    present = present[:, 1 : num_classes + 1]
    return np.argwhere(present & (logits > 0)).astype(np.int64).reshape(-1, 2)


def _check_pairs(masks: np.ndarray, pairs) -> tuple[np.ndarray, np.ndarray]:
    masks = np.asarray(masks)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    return masks, pairs


def class_targets(masks: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Bool (P, H, W): ``masks[image] == class + 1`` for each pair (the pair's own class)."""
    masks, pairs = _check_pairs(masks, pairs)
    return masks[pairs[:, 0]] == (pairs[:, 1] + 1)[:, None, None]


def reference_cumulative_targets(masks: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Bool (P, H, W): the reference's pointing-game target of each pair (image n, class k).

    The union of the masks of the classes j <= k present in image n's mask (its list of accepted points
    grows through its loop over the present classes, predicted or not): the pixels whose value lies in
    1..k+1. A class absent from the mask adds no pixel, so this equals the union over present classes;
    void (255) and background (0) are never accepted.
    """
    masks, pairs = _check_pairs(masks, pairs)
    m = masks[pairs[:, 0]]
    return (m >= 1) & (m <= (pairs[:, 1] + 1)[:, None, None])


# ---------------------------------------------------------------------------------------------------------
# ROC-AUC
# ---------------------------------------------------------------------------------------------------------


def _sortable_key32(x: np.ndarray) -> np.ndarray:
    """uint64 keys whose order is the float order of ``x`` (float32), with -0.0 == +0.0, shifted left by 1."""
    x = np.asarray(x, dtype=np.float32) + np.float32(0.0)  # -0.0 + 0.0 == +0.0: one key for both zeros
    bits = x.view(np.uint32)
    flip = np.where(bits >> np.uint32(31), np.uint32(0xFFFFFFFF), np.uint32(0x80000000))
    return (bits ^ flip).astype(np.uint64) << np.uint64(1)


def _auc_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """AUC of each row of ``x`` (M, n) against bool ``y`` (M, n); NaN where a row lacks a class."""
    m, n = x.shape
    if x.dtype.itemsize <= 4:
        # Pack (value, label) into one uint64 key and sort it: one plain sort instead of an argsort and
        # two gathers. Ties in value stay adjacent; the label bit only orders labels inside a tie group.
        key = _sortable_key32(x) | y.astype(np.uint64)
        key.sort(axis=1)
        neg = (key & np.uint64(1)) == 0
        key >>= np.uint64(1)
        new_group = np.empty((m, n), dtype=bool)
        new_group[:, 0] = True
        np.not_equal(key[:, 1:], key[:, :-1], out=new_group[:, 1:])
        del key
    else:
        order = np.argsort(x, axis=1)
        s = np.take_along_axis(x, order, axis=1)
        neg = ~np.take_along_axis(y, order, axis=1)
        del order
        new_group = np.empty((m, n), dtype=bool)
        new_group[:, 0] = True
        np.not_equal(s[:, 1:], s[:, :-1], out=new_group[:, 1:])
        del s
    cum_neg = np.cumsum(neg, axis=1, dtype=np.int64)  # negatives up to and including each position
    n_neg = cum_neg[:, -1]
    n_pos = n - n_neg
    # Negatives strictly before each position's tie group: cum_neg - neg at the group start, carried along
    # the group by a running max (cum_neg is non-decreasing, so the max is the latest group start's value).
    before = np.maximum.accumulate(np.where(new_group, cum_neg - neg, 0), axis=1)
    # Negatives up to the end of each position's tie group: value at the group end, carried backwards.
    group_end = np.empty((m, n), dtype=bool)
    group_end[:, -1] = True
    group_end[:, :-1] = new_group[:, 1:]
    through = np.minimum.accumulate(np.where(group_end, cum_neg, n)[:, ::-1], axis=1)[:, ::-1]
    # 2U = sum over positives of (2 * before + in_group) = sum of (before + through).
    twice_u = np.where(neg, 0, before + through).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = twice_u / (2.0 * n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def roc_auc(maps, targets) -> np.ndarray:
    """Per-pixel ROC-AUC of each map: maps float (P, H, W), targets bool (P, H, W) -> (P,) float64.

    Exactly ``sklearn.metrics.roc_auc_score(targets[p].ravel(), maps[p].ravel())`` (ties count 1/2), NaN
    where a target has no positive or no negative pixel. Maps of 32 bits or fewer are compared as float32,
    float64 maps at full precision. Raises ``ValueError`` on NaN in the maps.
    """
    x = _as_maps(maps)
    y = _as_targets(targets, x.shape)
    p = x.shape[0]
    n = x.shape[1] * x.shape[2]
    out = np.full((p,), np.nan)
    if n == 0:
        return out
    x = x.reshape(p, n)
    y = y.reshape(p, n)
    for sl in _chunks(p, n):
        xc = x[sl]
        if np.isnan(xc).any():
            raise ValueError("maps contain NaN")
        out[sl] = _auc_rows(xc, y[sl])
    return out


def roc_auc_counts_jax(maps, targets) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The Mann-Whitney counts behind :func:`roc_auc_jax`: ``(2U, n_pos, n_neg)``, each (...,).

    ``2U`` is an exact int32 for rows up to 65535 pixels (int64 with x64 enabled; float32 above), so
    ``2U / (2 n_pos n_neg)`` computed on the host in float64 is exactly :func:`roc_auc`'s value.
    """
    maps = jnp.asarray(maps, dtype=jnp.float32)
    batch = maps.shape[:-2]
    n = maps.shape[-2] * maps.shape[-1]
    x = maps.reshape(-1, n) + jnp.float32(0.0)  # -0.0 -> +0.0 so both zeros form one tie group
    y = jnp.asarray(targets).reshape(-1, n).astype(jnp.int32) != 0
    s, lab = jax.lax.sort((x, y.astype(jnp.int32)), dimension=1, num_keys=1)
    neg = (1 - lab).astype(jnp.int32)
    cum_neg = jnp.cumsum(neg, axis=1, dtype=jnp.int32)
    n_neg = cum_neg[:, -1]
    n_pos = n - n_neg
    new_group = jnp.concatenate([jnp.ones_like(s[:, :1], dtype=bool), s[:, 1:] != s[:, :-1]], axis=1)
    group_end = jnp.concatenate([new_group[:, 1:], jnp.ones_like(s[:, :1], dtype=bool)], axis=1)
    before = jax.lax.cummax(jnp.where(new_group, cum_neg - neg, 0), axis=1)
    through = jax.lax.cummin(jnp.where(group_end, cum_neg, n), axis=1, reverse=True)
    if jax.config.jax_enable_x64:
        acc = jnp.int64
    elif n * n // 2 < 2**31:  # 2U <= 2 n_pos n_neg <= n^2 / 2
        acc = jnp.int32
    else:
        acc = jnp.float32
    twice_u = jnp.sum(jnp.where(lab != 0, (before + through).astype(acc), 0), axis=1)
    return twice_u.reshape(batch), n_pos.reshape(batch), n_neg.reshape(batch)


@jax.jit
def roc_auc_jax(maps, targets) -> jax.Array:
    """Per-pixel ROC-AUC in JAX, jittable and batched: maps (..., H, W), targets bool (..., H, W) -> (...,).

    Same value as :func:`roc_auc` (to float32 rounding), NaN where a target lacks positives or negatives.
    The maps are compared in float32 (float64 inputs are rounded first when x64 is off, which can create
    ties). One ``lax.sort`` of (value, label) per row; then the Mann-Whitney U from the tie groups with
    running max / reversed running min (:func:`roc_auc_counts_jax`). Maps must be NaN-free (not checked on
    device).
    """
    twice_u, n_pos, n_neg = roc_auc_counts_jax(maps, targets)
    denom = 2.0 * n_pos.astype(jnp.float32) * n_neg.astype(jnp.float32)
    auc = twice_u.astype(jnp.float32) / jnp.where(denom > 0, denom, 1.0)
    return jnp.where((n_pos > 0) & (n_neg > 0), auc, jnp.nan)


# ---------------------------------------------------------------------------------------------------------
# Pointing game
# ---------------------------------------------------------------------------------------------------------


def pointing_game(maps, targets, tolerance: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Pointing game: maps (P, H, W), targets bool (P, H, W) -> (hits bool (P,), constant bool (P,)).

    The point is the first arg-max in row-major order. It is a hit if a target pixel lies within Euclidean
    distance ``<= tolerance`` pixels of it (``tolerance=0``: the arg-max pixel must be in the target).
    Constant maps (no arg-max) are misses and flagged in ``constant``.
    """
    if tolerance < 0 or not math.isfinite(tolerance):
        raise ValueError(f"tolerance must be finite and >= 0, got {tolerance}")
    x = _as_maps(maps)
    y = _as_targets(targets, x.shape)
    p, h, w = x.shape
    hits = np.zeros((p,), dtype=bool)
    constant = np.ones((p,), dtype=bool)
    if p == 0 or h * w == 0:
        return hits, constant
    flat = x.reshape(p, h * w)
    rows = np.arange(h)
    cols = np.arange(w)
    tol2 = float(tolerance) ** 2
    for sl in _chunks(p, h * w):
        xc = flat[sl]
        if np.isnan(xc).any():
            raise ValueError("maps contain NaN")
        constant[sl] = xc.max(axis=1) == xc.min(axis=1)
        idx = np.argmax(xc, axis=1)  # first maximum in row-major order
        r, c = np.divmod(idx, w)
        yc = y[sl]
        if tol2 == 0.0:
            hit = yc[np.arange(yc.shape[0]), r, c]
        else:
            d2 = (rows[None, :, None] - r[:, None, None]) ** 2 + (cols[None, None, :] - c[:, None, None]) ** 2
            hit = (yc & (d2 <= tol2)).any(axis=(1, 2))
        hits[sl] = hit & ~constant[sl]
    return hits, constant


# ---------------------------------------------------------------------------------------------------------
# Teacher/student similarity
# ---------------------------------------------------------------------------------------------------------


def minmax_normalize(maps) -> np.ndarray:
    """Each map (P, H, W) rescaled to [0, 1] by its own min and max; a constant map becomes all zeros.

    Floating inputs keep their dtype; other inputs become float64.
    """
    x = _as_maps(maps)
    lo = x.min(axis=(1, 2), keepdims=True) if x.size else np.zeros((x.shape[0], 1, 1), x.dtype)
    hi = x.max(axis=(1, 2), keepdims=True) if x.size else lo
    span = hi - lo
    safe = np.where(span > 0, span, 1).astype(x.dtype)
    return np.where(span > 0, (x - lo) / safe, 0).astype(x.dtype)


def map_similarity(maps_a, maps_b) -> dict[str, np.ndarray]:
    """Cosine similarity and l2 distance of two stacks of maps after :func:`minmax_normalize`.

    maps_a, maps_b: (P, H, W) on the same pairs and resolution. Returns ``{'cos': (P,), 'l2': (P,)}``
    float64; l2 is the Euclidean norm of the difference over all pixels; cos is 0 when either normalised
    map is all zero (constant input).
    """
    a = _as_maps(maps_a, "maps_a")
    b = _as_maps(maps_b, "maps_b")
    if a.shape != b.shape:
        raise ValueError(f"maps_a and maps_b must have the same shape, got {a.shape} and {b.shape}")
    p = a.shape[0]
    cos = np.zeros((p,))
    l2 = np.zeros((p,))
    for sl in _chunks(p, a.shape[1] * a.shape[2]):
        na = minmax_normalize(a[sl].astype(np.float64)).reshape(sl.stop - sl.start, -1)
        nb = minmax_normalize(b[sl].astype(np.float64)).reshape(sl.stop - sl.start, -1)
        dot = np.einsum("pi,pi->p", na, nb)
        norms = np.linalg.norm(na, axis=1) * np.linalg.norm(nb, axis=1)
        cos[sl] = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
        l2[sl] = np.linalg.norm(na - nb, axis=1)
    return {"cos": cos, "l2": l2}


# ---------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------


def pair_scores(maps, masks, pairs, tolerance: float = 0.0) -> dict[str, np.ndarray]:
    """Per-pair scores of the maps of ``pairs``: what every localisation number is averaged from.

    maps: (P, H, W), row p the map of ``pairs[p]`` at the masks' resolution; masks: uint8 (N, H, W) class
    indices; pairs: (P, 2) from :func:`localization_pairs`. Returns ``{'auc': float64 (P,) (NaN where the
    class covers all or none of the pixels), 'hit': bool (P,) (the arg-max in the class's mask),
    'hit_ref_cumulative': bool (P,) (the arg-max in :func:`reference_cumulative_targets`), 'constant': bool
    (P,) (maps with no arg-max, misses in both)}``. ``tolerance`` applies to both pointing variants.
    """
    x = _as_maps(maps)
    masks, pairs = _check_pairs(masks, pairs)
    if x.shape[0] != pairs.shape[0]:
        raise ValueError(f"maps hold {x.shape[0]} maps for {pairs.shape[0]} pairs")
    if x.shape[1:] != masks.shape[1:]:
        raise ValueError(f"maps are {x.shape[1:]} but masks are {masks.shape[1:]}: resize the maps first")
    p = pairs.shape[0]
    out = {
        "auc": np.full((p,), np.nan),
        "hit": np.zeros((p,), dtype=bool),
        "hit_ref_cumulative": np.zeros((p,), dtype=bool),
        "constant": np.zeros((p,), dtype=bool),
    }
    for sl in _chunks(p, x.shape[1] * x.shape[2]):
        own = class_targets(masks, pairs[sl])
        out["auc"][sl] = roc_auc(x[sl], own)
        out["hit"][sl], out["constant"][sl] = pointing_game(x[sl], own, tolerance)
        cumulative = reference_cumulative_targets(masks, pairs[sl])
        out["hit_ref_cumulative"][sl], _ = pointing_game(x[sl], cumulative, tolerance)
    return out


def summarize_pair_scores(scores: dict[str, np.ndarray]) -> dict[str, float]:
    """Means of :func:`pair_scores` (concatenated over chunks of pairs if need be).

    Returns ``{'AUC': mean AUC over the pairs with a defined AUC, 'auc_pairs': their number, 'Point': hit
    rate over all pairs (constant maps are misses), 'Point_ref_cumulative': the same with the reference's
    cumulative target, 'constant_maps': count, 'pairs': P}``; with no pairs the fractions are NaN. Scores
    from the device (:mod:`apjax.evaluators.pairs`) also hold the mask metrics of
    :mod:`apjax.evaluators.mask_metrics` (RMA, RRA, AttrLoc, TopK, EnergyPoint): any other key's mean over
    the pairs where it is defined (not NaN).
    """
    auc = np.asarray(scores["auc"], np.float64)
    p = len(auc)
    ok = ~np.isnan(auc)
    return {
        "AUC": float(auc[ok].mean()) if ok.any() else float("nan"),
        "auc_pairs": int(ok.sum()),
        "Point": float(np.mean(scores["hit"])) if p else float("nan"),
        "Point_ref_cumulative": float(np.mean(scores["hit_ref_cumulative"])) if p else float("nan"),
        "constant_maps": int(np.sum(scores["constant"])),
        "pairs": int(p),
        **{k: _nanmean(v) for k, v in scores.items() if k not in _POINT_AND_AUC_KEYS},
    }


_POINT_AND_AUC_KEYS = ("auc", "hit", "hit_ref_cumulative", "constant")


def _nanmean(x) -> float:
    x = np.asarray(x, np.float64)
    ok = ~np.isnan(x)
    return float(x[ok].mean()) if ok.any() else float("nan")


def localization_summary(maps, masks, pairs, tolerance: float = 0.0) -> dict[str, float]:
    """AUC and pointing accuracy of the maps of the given pairs: :func:`summarize_pair_scores` of
    :func:`pair_scores` (see both for the arguments and the keys)."""
    return summarize_pair_scores(pair_scores(maps, masks, pairs, tolerance))
