"""Attribution maps of (image, class) pairs and their localisation scores, the pairs split over the mesh.

The pairs (:func:`apjax.localization.localization_pairs`) go in fixed-size global batches (the last padded
with copies of its last pair, which are dropped) split along the mesh's 'data' axis; one jitted program
per run and method preprocesses the images, computes the maps, resizes them to the input size and scores
them on the device: the Mann-Whitney counts of the per-pixel ROC-AUC (divided on the host in float64, so
the AUC is exactly :func:`apjax.localization.roc_auc`'s), and both pointing games. Only the maps asked for
(``keep``) come back to the host.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from apjax import localization as loc
from apjax.attribution.maps import upsample_map
from apjax.data import HostCache
from apjax.data.augment import eval_preprocess
from apjax.data.pipeline import batch_sharding
from apjax.evaluators.mask_metrics import MASK_METRICS, mask_metrics

SCORE_KEYS = ("auc", "hit", "hit_ref_cumulative", "constant", *MASK_METRICS)


def _hits(targets: jax.Array, rows: jax.Array, cols: jax.Array, tolerance: float) -> jax.Array:
    """Whether a target pixel lies within ``tolerance`` pixels of (rows, cols): targets (B, H, W)."""
    if tolerance == 0.0:
        return targets[jnp.arange(targets.shape[0]), rows, cols]
    h, w = targets.shape[1:]
    d2 = (jnp.arange(h)[None, :, None] - rows[:, None, None]) ** 2
    d2 = d2 + (jnp.arange(w)[None, None, :] - cols[:, None, None]) ** 2
    return jnp.any(targets & (d2 <= float(tolerance) ** 2), axis=(1, 2))


def pair_scores_jax(maps: jax.Array, masks: jax.Array, classes: jax.Array, tolerance: float = 0.0) -> dict:
    """Device-side :func:`apjax.localization.pair_scores` before the AUC's division.

    maps float (B, H, W); masks uint8 (B, H, W), each pair's image's mask; classes int (B,). Returns
    ``twice_u``, ``n_pos``, ``n_neg`` (:func:`apjax.localization.roc_auc_counts_jax` against the class's
    mask), ``hit``, ``hit_ref_cumulative`` (first arg-max in the class's mask / in the reference's
    cumulative target, within ``tolerance``; constant maps miss), ``constant``, ``nan`` (maps with NaN)
    and :func:`apjax.evaluators.mask_metrics.mask_metrics`' (RMA, RRA, AttrLoc, TopK, EnergyPoint).
    """
    maps = maps.astype(jnp.float32)
    value = (classes.astype(jnp.int32) + 1)[:, None, None]
    m = masks.astype(jnp.int32)
    own = m == value
    cumulative = (m >= 1) & (m <= value)
    twice_u, n_pos, n_neg = loc.roc_auc_counts_jax(maps, own)
    flat = maps.reshape(maps.shape[0], -1)
    constant = jnp.max(flat, axis=1) == jnp.min(flat, axis=1)
    rows, cols = jnp.divmod(jnp.argmax(flat, axis=1), maps.shape[2])  # the first maximum, row-major
    return {
        "twice_u": twice_u,
        "n_pos": n_pos,
        "n_neg": n_neg,
        "hit": _hits(own, rows, cols, tolerance) & ~constant,
        "hit_ref_cumulative": _hits(cumulative, rows, cols, tolerance) & ~constant,
        "constant": constant,
        "nan": jnp.any(jnp.isnan(flat), axis=1),
        **mask_metrics(maps, own),
    }


def finish_scores(device: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Host per-pair scores (:data:`SCORE_KEYS`, as :func:`apjax.localization.pair_scores`) from
    :func:`pair_scores_jax`'s arrays: ``auc = 2U / (2 n_pos n_neg)`` in float64, NaN without both classes."""
    if np.any(device["nan"]):
        raise ValueError("maps contain NaN")
    n_pos = np.asarray(device["n_pos"], np.int64)
    n_neg = np.asarray(device["n_neg"], np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = np.asarray(device["twice_u"]).astype(np.float64) / (2.0 * n_pos * n_neg)
    out = {"auc": np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)}
    out.update({k: np.asarray(device[k], bool) for k in ("hit", "hit_ref_cumulative", "constant")})
    out.update({k: np.asarray(device[k], np.float64) for k in MASK_METRICS})
    return out


@functools.cache
def _score_maps_jit(tolerance: float):
    return jax.jit(functools.partial(pair_scores_jax, tolerance=tolerance))


def score_maps(maps, masks: np.ndarray, pairs: np.ndarray, tolerance: float = 0.0) -> dict[str, np.ndarray]:
    """:func:`apjax.localization.pair_scores` of maps given on the host (P, H, W), scored on one device."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    device = _score_maps_jit(float(tolerance))(
        jnp.asarray(maps, jnp.float32), jnp.asarray(masks[pairs[:, 0]]), jnp.asarray(pairs[:, 1], jnp.int32)
    )
    return finish_scores(jax.device_get(device))


def concat_scores(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([c[k] for c in chunks]) if chunks else np.zeros(0) for k in SCORE_KEYS}


def common_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rows of pair arrays (P, 2) present in both, in ``a``'s order."""
    keys = {tuple(x) for x in b.tolist()}
    rows = [x for x in a.tolist() if tuple(x) in keys]
    return np.asarray(rows, np.int64).reshape(-1, 2)


def rows_of(pairs: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Index (Q,) into ``pairs`` (P, 2) of each row of ``wanted`` (Q, 2) (all of which must be there)."""
    where = {tuple(x): i for i, x in enumerate(np.asarray(pairs).tolist())}
    return np.asarray([where[tuple(x)] for x in np.asarray(wanted).tolist()], np.int64)


def similarity_summary(maps: np.ndarray, teacher_maps: np.ndarray) -> dict[str, Any]:
    """The paper's Cos and l2 (SPEC section 7): means over the pairs of
    :func:`apjax.localization.map_similarity` of two (P, H, W) stacks at the evaluation resolution (both
    min-max normalised); NaN without a pair. Returns ``Cos``, ``l2`` and ``similarity_pairs`` (P)."""
    n = len(maps)
    sim = loc.map_similarity(maps, teacher_maps) if n else {"cos": [], "l2": []}
    return {
        "Cos": float(np.mean(sim["cos"])) if n else float("nan"),
        "l2": float(np.mean(sim["l2"])) if n else float("nan"),
        "similarity_pairs": int(n),
    }


def _host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _localization_scores(variables, x, maps, masks, classes, ids, tolerance: float) -> dict[str, jax.Array]:
    return pair_scores_jax(maps, masks, classes, tolerance)


class PairMaps:
    """One attribution method's maps and scores of pairs, split over the mesh.

    Args:
      fn: ``(variables, x, class_index, example_id) -> (B, h, w)`` (:func:`apjax.attribution.methods.map_fn`).
      mesh: the 'data' mesh; the weights are replicated, the pairs split.
      image_size: the input side; maps are resized (bilinear) to it, the masks' resolution.
      num_classes: K; a pair's example id is ``image index * K + class`` (SmoothGrad's noise follows it).
      tolerance: the pointing game's, in pixels.
      batch_size: pairs per global batch, rounded up to a multiple of the mesh's devices.
      scores: what is computed of each pair beside its map, ``(variables, x (B, S, S, 3), maps (B, S, S),
        masks (B, S, S), classes (B,), ids (B,)) -> {name: (B,)}`` on the device (``ids``: the pairs'
        example ids, those ``fn`` gets), and ``finish`` turns the concatenated host arrays into
        :meth:`run`'s scores. Default: the localisation scores (:func:`pair_scores_jax`,
        :func:`finish_scores`).
    """

    def __init__(
        self,
        fn: Callable,
        mesh: Mesh,
        image_size: int,
        num_classes: int,
        tolerance=0.0,
        batch_size=32,
        scores: Callable | None = None,
        finish: Callable[[dict], dict] | None = None,
    ):
        n_dev = mesh.devices.size
        self.batch_size = -(-max(batch_size, 1) // n_dev) * n_dev
        self.num_classes, self.mesh = num_classes, mesh
        self._sharding = batch_sharding(mesh)
        self._finish, self._empty = finish or (lambda device: device), {}  # no pairs: no scores
        if scores is None:
            scores = functools.partial(_localization_scores, tolerance=float(tolerance))
            self._finish, self._empty = finish_scores, concat_scores([])

        def step(variables, images, extents, classes, ids, masks):
            x = eval_preprocess(images, extents, out_size=image_size)
            maps = upsample_map(fn(variables, x, classes, ids).astype(jnp.float32), image_size)
            return scores(variables, x, maps, masks, classes, ids), maps

        replicated = NamedSharding(mesh, PartitionSpec())
        self._step = jax.jit(
            step, in_shardings=(replicated, *[self._sharding] * 5), out_shardings=self._sharding
        )

    def _global(self, host: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(host.shape, self._sharding, lambda index: host[index])

    def _batches(self, cache: HostCache, masks: np.ndarray, pairs: np.ndarray) -> Iterator[tuple[int, tuple]]:
        bs = self.batch_size
        for start in range(0, len(pairs), bs):
            chunk = pairs[start : start + bs]
            pad = np.concatenate([chunk, np.repeat(chunk[-1:], bs - len(chunk), axis=0)])
            idx, cls = pad[:, 0], pad[:, 1].astype(np.int32)
            images = cache.images[np.sort(idx)][np.argsort(np.argsort(idx))]  # sorted reads of the cache
            host = (
                images,
                cache.extents[idx].astype(np.int32),
                cls,
                (idx * self.num_classes + cls).astype(np.int32),
            )
            yield len(chunk), tuple(self._global(a) for a in (*host, masks[idx]))

    def run(
        self,
        variables: Any,
        cache: HostCache,
        masks: np.ndarray,
        pairs: np.ndarray,
        keep: np.ndarray | None = None,
        progress: Callable[[int], Any] | None = None,
    ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Scores of every pair (host arrays (P,): :data:`SCORE_KEYS`, or ``finish`` of the ``scores``
        given) and the maps (K, S, S) float32 of the pairs flagged by ``keep`` (bool (P,), in pair order;
        None: no maps come back)."""
        pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
        scores, kept, pending, start = [], [], None, 0

        def collect(n, out):
            nonlocal start
            scores.append({k: _host(v)[:n] for k, v in out[0].items()})
            if keep is not None and keep[start : start + n].any():
                kept.append(_host(out[1])[:n][keep[start : start + n]])
            start += n
            if progress:
                progress(n)

        for n, args in self._batches(cache, masks, pairs):
            out = self._step(variables, *args)  # dispatched; the previous batch is read meanwhile
            if pending is not None:
                collect(*pending)
            pending = (n, out)
        if pending is not None:
            collect(*pending)
        device = {k: np.concatenate([s[k] for s in scores]) for k in scores[0]} if scores else None
        result = self._finish(device) if device else dict(self._empty)
        if keep is None:
            return result, None
        size = masks.shape[1:]
        return result, np.concatenate(kept) if kept else np.zeros((0, *size), np.float32)
