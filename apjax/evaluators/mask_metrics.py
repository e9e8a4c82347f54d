"""Localisation metrics of a map against its class's mask beyond the paper's AUC and pointing game,
jittable, one number per (image, class) pair: the metrics XAI researchers compute with Quantus.

Every function takes maps float (B, H, W) at the masks' resolution and ``own`` bool (B, H, W), each
pair's class mask (void pixels count as background, as everywhere in :mod:`apjax.localization`), and
returns float32 (B,). A pair whose mask is empty has no value (NaN); so has a ratio whose denominator is 0
(an all-zero map). The conventions follow Quantus 0.6's defaults where Quantus defines the metric; where
they differ from the paper that introduced it, both are named.

- ``RMA``, Relevance Mass Accuracy (Arras, Osman and Samek, CLEVR-XAI, Inf. Fusion 2022): the share of the
  map's mass inside the mask, ``sum_{mask} a / sum a``, on the signed map (Quantus: ``abs=False``; its
  max-normalisation does not change the ratio). The paper counts positive relevance only; on the
  non-negative maps (Grad-CAM, RISE, gradient) the two agree.
- ``RRA``, Relevance Rank Accuracy (same paper): with K the mask's pixel count, the share of the K
  highest-valued pixels that lie in the mask. Ties at the K-th value share the remaining slots in
  proportion (the expectation over a random order of the ties); Quantus takes ``np.argsort``'s order, so
  the two differ only where the K-th value is tied (flat regions, e.g. zeros after a ReLU).
- ``AttrLoc``, Attribution Localisation (Kohlbrenner et al., 2020), unweighted: ``sum_{mask} |a| / sum
  |a|`` (Quantus's default ``abs=True``). The size-weighted variant is not implemented.
- ``TopK``, Top-K Intersection (Theiner, Müller-Budack and Ewerth, 2021): the share of the k
  highest-valued pixels in the mask, k = ``round(TOP_K_SHARE * H * W)`` (Quantus's k = 1000 at 224 x 224,
  2% of the pixels), ties as for RRA.
- ``EnergyPoint``, the energy-based pointing game (Wang et al., Score-CAM, CVPRW 2020): the share of the
  map's positive energy ``a+ = max(a, 0)`` inside the class's bounding box, here the box around its mask's
  pixels (Score-CAM reads the dataset's boxes; the masks here give one box per class, around all its
  instances).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_METRICS = ("RMA", "RRA", "AttrLoc", "TopK", "EnergyPoint")
TOP_K_SHARE = 1000 / (224 * 224)


def _ratio(num: jax.Array, den: jax.Array, defined: jax.Array) -> jax.Array:
    ok = defined & (den != 0)
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), jnp.nan)


def _flat(maps, own):
    b = maps.shape[0]
    return maps.astype(jnp.float32).reshape(b, -1), own.reshape(b, -1)


def relevance_mass_accuracy(maps: jax.Array, own: jax.Array) -> jax.Array:
    a, m = _flat(maps, own)
    return _ratio(jnp.sum(jnp.where(m, a, 0.0), axis=1), jnp.sum(a, axis=1), jnp.any(m, axis=1))


def attribution_localisation(maps: jax.Array, own: jax.Array) -> jax.Array:
    a, m = _flat(maps, own)
    a = jnp.abs(a)
    return _ratio(jnp.sum(jnp.where(m, a, 0.0), axis=1), jnp.sum(a, axis=1), jnp.any(m, axis=1))


def top_share_in_mask(maps: jax.Array, own: jax.Array, k: jax.Array) -> jax.Array:
    """The share of each map's ``k`` (int (B,), >= 1) highest pixels that lie in ``own``, ties at the
    k-th value sharing the remaining slots in proportion."""
    a, m = _flat(maps, own)
    k = jnp.clip(k.astype(jnp.int32), 1, a.shape[1])
    t = jnp.take_along_axis(-jnp.sort(-a, axis=1), (k - 1)[:, None], axis=1)  # the k-th largest value
    above, tied = a > t, a == t
    slots = k - jnp.sum(above, axis=1)  # >= 1: the tie group holds the k-th value
    hits = jnp.sum(above & m, axis=1) + jnp.sum(tied & m, axis=1) * slots / jnp.sum(tied, axis=1)
    return hits / k


def relevance_rank_accuracy(maps: jax.Array, own: jax.Array) -> jax.Array:
    k = jnp.sum(own.reshape(own.shape[0], -1), axis=1)
    return jnp.where(k > 0, top_share_in_mask(maps, own, k), jnp.nan)


def top_k_intersection(maps: jax.Array, own: jax.Array, share: float = TOP_K_SHARE) -> jax.Array:
    b, h, w = maps.shape
    k = jnp.full((b,), max(1, round(share * h * w)), jnp.int32)
    return jnp.where(jnp.any(own.reshape(b, -1), axis=1), top_share_in_mask(maps, own, k), jnp.nan)


def box_of(own: jax.Array) -> jax.Array:
    """Bool (B, H, W): the bounding box of each mask's pixels (all False for an empty mask)."""
    rows, cols = jnp.any(own, axis=2), jnp.any(own, axis=1)  # (B, H), (B, W)

    def span(present):
        idx = jnp.arange(present.shape[1])
        first = jnp.min(jnp.where(present, idx, present.shape[1]), axis=1)
        last = jnp.max(jnp.where(present, idx, -1), axis=1)
        return (idx[None] >= first[:, None]) & (idx[None] <= last[:, None])

    return span(rows)[:, :, None] & span(cols)[:, None, :]


def energy_pointing_game(maps: jax.Array, own: jax.Array) -> jax.Array:
    a, box = _flat(jnp.maximum(maps.astype(jnp.float32), 0.0), box_of(own))
    return _ratio(jnp.sum(jnp.where(box, a, 0.0), axis=1), jnp.sum(a, axis=1), jnp.any(box, axis=1))


def mask_metrics(maps: jax.Array, own: jax.Array) -> dict[str, jax.Array]:
    """Every metric of :data:`MASK_METRICS`, float32 (B,) each."""
    return {
        "RMA": relevance_mass_accuracy(maps, own),
        "RRA": relevance_rank_accuracy(maps, own),
        "AttrLoc": attribution_localisation(maps, own),
        "TopK": top_k_intersection(maps, own),
        "EnergyPoint": energy_pointing_game(maps, own),
    }
