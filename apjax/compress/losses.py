"""Compression losses (SPEC sections 1 and 4): attribution matching, logit KD and multi-label BCE.

The matching loss compares a student's and a teacher's attribution maps after L2-normalising each map
per sample; the teacher side is always a constant (``stop_gradient``). Two forms:

- ``'squared_mean'`` (the reference's default): mean over batch and positions of ``(n(M_t) - n(M_s))^2``;
- ``'l2'`` (the paper's): per-sample ``||n(M_s) - n(M_t)||_2``, not squared, mean over the batch;
- ``'cosine'`` (e2KD's, for black-box teachers): per-sample ``1 - <n(M_s), n(M_t)>``, mean over the batch
  (``'squared_mean'`` times ``P / 2`` for maps of ``P`` positions, both maps non-zero).

The ``'l2'`` form uses a square root with a zero (sub)gradient where the two maps coincide, so a student
that starts as a copy of its teacher (pruning) gets a finite gradient on the first step.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from apjax.attribution.maps import normalize_map

MATCHING_FORMS = ("squared_mean", "l2", "cosine")


def _float(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` for x >= 0 with gradient 0 (not inf/NaN) at x = 0."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def matching_loss(
    student_map: jax.Array, teacher_map: jax.Array, form: str = "squared_mean", eps: float = 1e-12
) -> jax.Array:
    """Attribution matching loss between (B, h, w) (or (B, N)) maps; see the module docstring.

    Each map is flattened per sample and divided by ``max(||M||_2, eps)``; the teacher map is wrapped in
    ``jax.lax.stop_gradient``. Returns a scalar.
    """
    if form not in MATCHING_FORMS:
        raise ValueError(f"unknown matching loss form {form!r}; choose one of {list(MATCHING_FORMS)}.")
    if student_map.shape != teacher_map.shape:
        raise ValueError(f"map shapes differ: student {student_map.shape}, teacher {teacher_map.shape}.")
    s = normalize_map(student_map, eps)
    t = normalize_map(jax.lax.stop_gradient(teacher_map), eps)
    if form == "cosine":
        return jnp.mean(1.0 - jnp.sum(s * t, axis=-1))
    sq = jnp.square(t - s)
    if form == "squared_mean":
        return jnp.mean(sq)
    return jnp.mean(_safe_sqrt(jnp.sum(sq, axis=-1)))


def multi_tap_matching_loss(
    student_maps: Mapping[str, jax.Array],
    teacher_maps: Mapping[str, jax.Array],
    form: str = "squared_mean",
    eps: float = 1e-12,
) -> jax.Array:
    """Sum over the taps (the layer set I) of :func:`matching_loss`; both dicts must hold the same taps."""
    if set(student_maps) != set(teacher_maps):
        raise ValueError(f"tap sets differ: student {sorted(student_maps)}, teacher {sorted(teacher_maps)}.")
    if not student_maps:
        raise ValueError("no taps to match.")
    return sum(matching_loss(student_maps[t], teacher_maps[t], form, eps) for t in sorted(student_maps))


def bce_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean sigmoid binary cross-entropy over batch x classes (torch's ``MultiLabelSoftMarginLoss``)."""
    z = _float(logits)
    y = jnp.asarray(labels).astype(z.dtype)
    return -jnp.mean(y * jax.nn.log_sigmoid(z) + (1.0 - y) * jax.nn.log_sigmoid(-z))


def kd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    temperature: float = 4.0,
    alpha: float = 0.9,
    log_eps: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Multi-label logit KD (SPEC section 4): ``alpha * L_kd + (1 - alpha) * BCE``.

    Each class is a 2-way distribution ``(sigmoid(z/T), 1 - sigmoid(z/T))``;
    ``L_kd = T^2 * mean over (batch, class) of KL(teacher || student)``. The teacher logits are
    constants. ``log_eps = 0`` takes the student's log-probabilities as exact log-sigmoids; the reference
    takes ``log(p + 1e-7)`` of its probabilities (``log_eps=1e-7``, about 3e-6 apart in the loss).

    Returns:
      ``(loss, {'kd': L_kd, 'bce': BCE})``.
    """
    s = _float(student_logits) / temperature
    t = _float(jax.lax.stop_gradient(teacher_logits)).astype(s.dtype) / temperature
    log_pt, log_qt = jax.nn.log_sigmoid(t), jax.nn.log_sigmoid(-t)  # teacher: log p, log (1 - p)
    if log_eps:
        log_ps, log_qs = jnp.log(jax.nn.sigmoid(s) + log_eps), jnp.log(jax.nn.sigmoid(-s) + log_eps)
    else:
        log_ps, log_qs = jax.nn.log_sigmoid(s), jax.nn.log_sigmoid(-s)
    kl = jnp.exp(log_pt) * (log_pt - log_ps) + jnp.exp(log_qt) * (log_qt - log_qs)
    kd = temperature**2 * jnp.mean(kl)
    bce = bce_loss(student_logits, labels)
    return alpha * kd + (1.0 - alpha) * bce, {"kd": kd, "bce": bce}
