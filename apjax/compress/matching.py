"""The matching maps (SPEC section 5): one registry entry per attribution-matching method.

An entry says what both sides of the matching term compute at each tap of the layer set I:

- ``needs_gradients``: whether the map needs d logit_k / d A at the tap (the SWA family: then the student's
  map is differentiated through those gradients, second order); EWA needs the activations only;
- ``map_fn(acts (B, h, w, C), grads (B, h, w, C) or None, channel_mask (1 or B, C) or None) -> (B, h, w)``;
- ``teacher_masks``: optional ``(key, acts by tap, config.distill) -> channel masks by tap``, drawn for the
  TEACHER only (SSWA); the student's map is never masked;
- ``pooled_gradients``: the map reads the gradients only through their spatial sum (the channel weights
  u_c), so the teacher's may be given (and cached, :mod:`apjax.compress.teacher_cache`) as (B, 1, 1, C);
- ``teacher_access``: ``'full'`` (the teacher's taps and gradients, the entries above) or ``'blackbox'``:
  the teacher is read through its logits only and its map is a stored RISE or occlusion map
  (:mod:`apjax.compress.blackbox`); the entry then gives ``student_maps(model, variables, x, seed, taps,
  rngs) -> (logits, {name: (B, h, w)}, updates)``, the student's own maps in train mode, and ``map_fn`` is
  unused.

The distillation and pruning steps read only this table, so a new matching map (Grad-CAM weights at any
tap, another mask scheme) is one entry here: no step, validation, sweep or report edit. The methods
without a matching term are ``kd`` (distillation) and ``naive`` (pruning).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

from apjax.attribution.maps import bernoulli_channel_mask, ewa_map, fixed_count_channel_mask, swa_map
from apjax.compress.blackbox import student_gradcam, student_input_gradient

SSWA_MODES = ("fixed_count", "bernoulli")


def sswa_masks(key: jax.Array, acts: Mapping[str, jax.Array], mode: str, drop: float) -> dict[str, jax.Array]:
    """Per-tap channel keep masks for the teacher: (1, C), exactly int(C * drop) dropped and shared by the
    batch (``fixed_count``, the reference's), or (B, C) Bernoulli(1 - drop) per image (the paper's)."""
    if mode not in SSWA_MODES:
        raise ValueError(f"unknown sswa_mode {mode!r}; choose one of {list(SSWA_MODES)}.")
    masks = {}
    for i, (tap, a) in enumerate(sorted(acts.items())):
        k = jax.random.fold_in(key, i)
        batch, channels = a.shape[0], a.shape[-1]
        if mode == "fixed_count":
            masks[tap] = fixed_count_channel_mask(k, channels, drop)[None, :]
        else:
            masks[tap] = bernoulli_channel_mask(k, batch, channels, 1.0 - drop)
    return masks


@dataclasses.dataclass(frozen=True)
class MatchingMap:
    """One matching method: see the module docstring. ``label`` is its name in tables."""

    label: str
    needs_gradients: bool = False
    map_fn: Callable[[jax.Array, jax.Array | None, jax.Array | None], jax.Array] | None = None
    teacher_masks: Callable[[jax.Array, Mapping[str, jax.Array], Any], dict[str, jax.Array]] | None = None
    pooled_gradients: bool = False
    teacher_access: str = "full"
    student_maps: Callable[..., tuple[jax.Array, dict[str, jax.Array], dict[str, Any]]] | None = None

    @property
    def blackbox(self) -> bool:
        """Whether the method reads a black-box teacher (its stored map, against ``student_maps``)."""
        return self.teacher_access == "blackbox"


def is_blackbox(method: str) -> bool:
    """Whether ``method`` is a registered matching map of a black-box teacher (``kd``, ``naive``: no)."""
    return method in MATCHING_MAPS and MATCHING_MAPS[method].blackbox


MATCHING_MAPS: dict[str, MatchingMap] = {
    "ewa": MatchingMap("EWA", needs_gradients=False, map_fn=lambda a, g, m: ewa_map(a)),
    "swa": MatchingMap(
        "SWA", needs_gradients=True, map_fn=lambda a, g, m: swa_map(a, g), pooled_gradients=True
    ),
    "sswa": MatchingMap(
        "SSWA",
        needs_gradients=True,
        map_fn=lambda a, g, m: swa_map(a, g, channel_mask=m),
        teacher_masks=lambda key, acts, d: sswa_masks(key, acts, d.sswa_mode, d.sswa_drop),
        pooled_gradients=True,
    ),
    "bb_gradcam": MatchingMap("BB Grad-CAM", teacher_access="blackbox", student_maps=student_gradcam),
    "bb_input_grad": MatchingMap(
        "BB input grad", teacher_access="blackbox", student_maps=student_input_gradient
    ),
}


def matching_methods(access: str | None = "full") -> tuple[str, ...]:
    """The registered matching methods that need ``access`` to the teacher (``'full'``: its taps;
    ``'blackbox'``: its logits only; None: all), read when called (entries added at run time count)."""
    return tuple(k for k, m in MATCHING_MAPS.items() if access is None or m.teacher_access == access)


def maps_at_taps(
    spec: MatchingMap,
    acts: Mapping[str, jax.Array],
    grads: Mapping[str, jax.Array] | None,
    masks: Mapping[str, jax.Array] | None = None,
) -> dict[str, jax.Array]:
    """``spec``'s map at every tap of ``acts``: tap -> (B, h, w); ``masks`` (teacher side only) by tap."""
    masks = dict(masks or {})
    return {t: spec.map_fn(a, None if grads is None else grads[t], masks.get(t)) for t, a in acts.items()}
