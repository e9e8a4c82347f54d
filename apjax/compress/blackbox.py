"""Attribution matching with a black-box teacher: the teacher answers with logits only, the student is ours.

``config.distill.teacher_access = 'blackbox'`` (the paper's first future work). The teacher is then read
only through ``predict(x) -> logits``: its map is RISE or occlusion (:mod:`apjax.attribution.perturbation`)
of its class probabilities for its top-1 class k, computed once per training image and augmentation draw
by the teacher cache (:mod:`apjax.compress.teacher_cache`) and stored at ``size x size``
(``distill.blackbox.size``, default 16). The student, whose weights we hold, explains itself with
gradients, and its map is brought to the stored map's resolution:

- ``bb_gradcam``: the student's Grad-CAM (ReLU of the gradient-sum-weighted channel sum, the SWA map) at
  each tap of ``distill.taps`` for the teacher's class k, upsampled bilinearly (the form of e2KD, Parchami
  et al. 2024, with the ``cosine`` matching form);
- ``bb_input_grad``: the magnitude of the student's input gradient ``mean over RGB of |d logit_k / d x|``,
  average-pooled to the map's resolution (Jacobian matching, Srinivas and Fleuret 2018, against a
  perturbation map instead of the teacher's own Jacobian).

Both maps are differentiable in the student's parameters (second order: the loss differentiates a
gradient). The student's own RISE map is not offered: it is a Monte-Carlo sum over N forward passes per
image, so its gradient costs N backward passes through the student per image and step, hundreds of times
the step's cost.

Before the comparison both maps are shifted by their minimum over the image (``M - min M``): a RISE map
sits on a floor, the expected score with most of the image masked, that carries no location; after the
shift the L2-normalised map equals the min-max-normalised map up to its scale, the form in which the
evaluation's Cos compares maps.

Why 16 x 16: a RISE map is a weighted sum of masks that are bilinear upsamplings of an s x s grid, so its
detail is at the scale of a grid cell (H / s pixels); 16 keeps two or more samples per cell for s <= 8.
Measured on the science variant's teacher at 64 px (docs/blackbox.md): a RISE map average-pooled to 16 x
16 and upsampled back has cosine 0.998 (s = 8) and 1.000 (s = 4) with the full-resolution map, while a
stored map costs 512 bytes (bfloat16) instead of 2 H W.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from apjax.attribution import perturbation
from apjax.attribution.maps import swa_map
from apjax.attribution.methods import (
    MethodOptions,
    black_box_map,
    method_options,
    occlusion_patch,
    probabilities_of,
)
from apjax.models import tap_gradients

TEACHER_ACCESS = ("full", "blackbox")
TEACHER_MAPS = ("rise", "occlusion")

Predict = Callable[[jax.Array], jax.Array]


def blackbox_options(d: Any) -> MethodOptions:
    """The :class:`MethodOptions` of the teacher's black-box map (``distill.blackbox.options``)."""
    return method_options(dict(d.blackbox.get("options", {})))


def resize_map(m: jax.Array, size: Sequence[int]) -> jax.Array:
    """(B, h, w) maps at ``size`` = (r, r'), float32 or wider: block means where (h, w) are multiples of
    (r, r') (average pooling), else ``jax.image.resize``'s antialiased bilinear resize (half-pixel centres;
    plain bilinear interpolation when upsampling, a widened triangle filter when shrinking by a factor that
    does not divide)."""
    m = m.astype(jnp.promote_types(m.dtype, jnp.float32))
    b, h, w = m.shape
    r, c = size
    if (h, w) == (r, c):
        return m
    if h % r == 0 and w % c == 0:
        return m.reshape(b, r, h // r, c, w // c).mean(axis=(2, 4))
    return jax.image.resize(m, (b, r, c), "linear", antialias=True)


def shift_to_zero(m: jax.Array) -> jax.Array:
    """(B, h, w) maps minus their minimum over (h, w): the least attributed pixel at 0."""
    return m - jnp.min(m, axis=(1, 2), keepdims=True)


def teacher_map(predict: Predict, x: jax.Array, d: Any) -> dict[str, jax.Array]:
    """The black-box teacher's outputs on images ``x`` (B, H, W, 3): ``logits`` (B, K) and ``map`` (B, r, r),
    its RISE or occlusion map (``d.blackbox.map``) of ``sigmoid(predict(.))`` for its top-1 class, at
    ``r = d.blackbox.size``. ``predict`` is all that is read of the teacher."""
    logits = predict(x)
    k = jnp.argmax(logits, axis=-1)
    # The evaluation's own RISE or occlusion (its masks for this seed).
    m = black_box_map(d.blackbox.map, probabilities_of(predict), x, k, blackbox_options(d))
    r = int(d.blackbox.size)
    return {"logits": logits, "map": resize_map(m, (r, r))}


def forward_passes(d: Any, height: int, width: int) -> int:
    """The teacher's forward passes per image for :func:`teacher_map`: N masks (RISE) or the patch
    positions (occlusion), plus the one for the logits."""
    o = blackbox_options(d)
    if d.blackbox.map == "rise":
        return o.rise_masks + 1
    size, stride = occlusion_patch(o, height, width)
    rows = perturbation.occlusion_corners(height, size, stride)
    cols = perturbation.occlusion_corners(width, size, stride)
    return len(rows) * len(cols) + 2  # the patches, the unoccluded reference and the logits


# ------------------------------------------------------------------------------------------------
# The student's maps: ``(model, variables, x, seed, taps, rngs) -> (logits, {name: (B, h, w)}, updates)``,
# in train mode, seeded on the teacher's class (``seed`` (B, K) one-hot).
# ------------------------------------------------------------------------------------------------


def student_gradcam(model, variables, x, seed, taps, rngs) -> tuple[jax.Array, dict, dict]:
    """The student's Grad-CAM (SWA form: ReLU of the channels weighted by the spatial sum of d logit_k / d A)
    at each tap of ``taps``: tap -> (B, h, w), differentiable in the parameters."""
    logits, acts, grads, updates = tap_gradients(model, variables, x, seed, taps, train=True, rngs=rngs)
    return logits, {t: swa_map(acts[t], grads[t]) for t in taps}, updates


def student_input_gradient(model, variables, x, seed, taps, rngs) -> tuple[jax.Array, dict, dict]:
    """The magnitude of the student's input gradient, ``mean over RGB of |d logit_k / d x|``: ``{'input':
    (B, H, W)}`` (``taps`` unused), differentiable in the parameters."""
    del taps

    def forward(images):
        logits, state = model.apply(variables, images, train=True, rngs=rngs, mutable=["batch_stats"])
        return logits, state

    logits, pullback, updates = jax.vjp(forward, x, has_aux=True)
    (grad,) = pullback(jax.lax.stop_gradient(seed).astype(logits.dtype))
    g = grad.astype(jnp.promote_types(grad.dtype, jnp.float32))
    return logits, {"input": jnp.mean(jnp.abs(g), axis=-1)}, dict(updates)


def matched_maps(
    student_maps: Mapping[str, jax.Array], stored: jax.Array
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """(student maps, teacher maps) ready for :func:`apjax.compress.losses.multi_tap_matching_loss`: each
    student map resized to the stored map's (r, r) and both shifted to a zero minimum; the one stored
    teacher map (B, r, r) stands against every student map."""
    size = stored.shape[1:]
    s = {name: shift_to_zero(resize_map(m, size)) for name, m in student_maps.items()}
    t = shift_to_zero(stored.astype(jnp.promote_types(stored.dtype, jnp.float32)))
    return s, {name: t for name in s}
