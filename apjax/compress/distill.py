"""Attribution-preserving knowledge distillation (SPEC sections 4 and 5): the ``distill`` task.

A frozen teacher (restored from its workdir's best checkpoint, eval mode, never updated or saved again)
and a student of any widths see the same augmented batch. In ONE jitted step: the teacher's forward pass
(and, for SWA/SSWA, its tap gradients for its top-1 class k), the teacher map, the student's forward pass
in train mode with its tap gradients for the same k, the student map, the loss

    L = alpha * T^2 * KL(teacher || student) + (1 - alpha) * BCE + beta * sum_taps matching(M_s, M_t)

and its gradient with respect to the student's parameters, which runs through d logit_k / d A of the
student (second order), then the update. Methods: ``kd`` (no matching), ``ewa``, ``swa``, ``sswa`` (the
teacher's channels randomly dropped before the sum: a fixed count per batch as in the reference, or
Bernoulli per image and channel as in the paper), and with a black-box teacher
(``distill.teacher_access = 'blackbox'``, :mod:`apjax.compress.blackbox`) ``bb_gradcam`` and
``bb_input_grad``: the teacher's RISE or occlusion map, read from the teacher cache, matched by the
student's Grad-CAM or input-gradient map.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from apjax.attribution import map_cosine_similarity, swa_map
from apjax.compress.blackbox import matched_maps
from apjax.compress.distill_config import methods, validate_distill_config
from apjax.compress.losses import bce_loss, kd_loss, multi_tap_matching_loss
from apjax.compress.matching import MATCHING_MAPS, maps_at_taps, sswa_masks
from apjax.compress.teacher_cache import (
    CachedBatches,
    build_teacher_cache,
    draw_key,
    teacher_outputs,
    teacher_side,
)
from apjax.data.augment import draw_augment, eval_preprocess, train_augment
from apjax.data.cache import HostCache
from apjax.data.pipeline import TrainBatches, batch_sharding, eval_batches
from apjax.errors import ConfigError, MissingFileError
from apjax.models import apply_with_taps, create_model, tap_gradients, top1_seed
from apjax.trainer.checkpoints import restore_state
from apjax.trainer.config import PRECISIONS, num_classes_of
from apjax.trainer.evaluation import classification_summary, valid_rows
from apjax.trainer.files import load_workdir_config
from apjax.trainer.state import (
    TrainState,
    apply_gradients,
    step_keys,
)

__all__ = [
    "distill_loss",
    "make_distill_step",
    "methods",
    "sswa_masks",
    "teacher_maps",
    "validate_distill_config",
]


# ------------------------------------------------------------------------------------------------
# Config and teacher (the config's checks: apjax.compress.distill_config, re-exported here).
# ------------------------------------------------------------------------------------------------


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The teacher run's own config, checked against the student's data."""
    workdir = Path(os.path.expanduser(config.distill.teacher_workdir))
    if not (workdir / "config.json").exists():
        raise MissingFileError(
            f"no trained teacher in {workdir} (config.distill.teacher_workdir): train one first with "
            f"python train.py --config configs/teacher_vgg16.py --workdir {workdir}, or point the option "
            "at the teacher's workdir."
        )
    tc = load_workdir_config(workdir)
    same = tc.data.dataset == config.data.dataset and (
        tc.data.dataset != "synthetic" or num_classes_of(tc) == num_classes_of(config)
    )
    if not same:
        raise ConfigError(
            f"the teacher in {workdir} was trained on {tc.data.dataset} with "
            f"{num_classes_of(tc)} classes but the student uses {config.data.dataset} with "
            f"{num_classes_of(config)}; use a teacher trained on the same data."
        )
    return tc


def load_teacher(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[Any, dict]:
    """(teacher model computing in the student's precision, replicated eval variables)."""
    tc = teacher_config(config)
    workdir = os.path.expanduser(config.distill.teacher_workdir)
    _, state, _ = restore_state(tc, workdir, config.distill.teacher_checkpoint)
    model = create_model(tc.model, num_classes=num_classes_of(tc), dtype=PRECISIONS[config.precision])
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return model, jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))


# ------------------------------------------------------------------------------------------------
# Maps of one batch.
# ------------------------------------------------------------------------------------------------


def teacher_maps(
    teacher, variables, x: jax.Array, d: ml_collections.ConfigDict, key: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
    """Teacher logits, its maps at ``d.taps`` and its SSWA channel masks (eval mode, constants).

    Returns:
      ``(logits (B, K), maps tap -> (B, h, w), masks tap -> (1, C) or (B, C))``; maps are empty for
      methods without matching, masks for methods other than SSWA.
    """
    spec, taps = MATCHING_MAPS.get(d.method), tuple(d.taps)
    return teacher_side(teacher_outputs(teacher, variables, x, spec, taps, d), spec, taps, d, key)


# ------------------------------------------------------------------------------------------------
# The loss and the step.
# ------------------------------------------------------------------------------------------------

BASE_LOSSES = ("kd", "bce")


def _grad_norm(grads: Any) -> dict[str, jax.Array]:
    """``{'grad_norm': global L2 norm of the loss gradient}``, before any clipping (logged per step)."""
    return {"grad_norm": optax.global_norm(grads)}


def distill_loss(
    params: Any,
    student,
    batch_stats: Any,
    teacher,
    teacher_vars: Mapping[str, Any],
    x: jax.Array,
    labels: jax.Array,
    d: ml_collections.ConfigDict,
    dropout_key: jax.Array,
    mask_key: jax.Array,
    base_loss: str = "kd",
) -> tuple[jax.Array, dict[str, Any]]:
    """The training loss of one augmented batch, a pure function of the student's ``params``.

    ``L = base + beta * sum over d.taps of matching(M_s, M_t)`` with ``base`` the KD loss (``'kd'``:
    alpha * KD + (1 - alpha) * BCE) or BCE (``'bce'``, pruning). The teacher runs in eval mode on ``x``
    and is a constant; its top-1 class k seeds both nets' maps. The student runs in train mode (batch
    statistics, dropout from ``dropout_key``); its map is never channel-dropped, and its gradient runs
    through d logit_k / d A (second order). SSWA's teacher masks come from ``mask_key``.

    Args:
      params: the student's parameters (the argument to differentiate).
      student, teacher: the two Flax models.
      batch_stats: the student's BatchNorm statistics.
      teacher_vars: the teacher's ``{'params', 'batch_stats'}``.
      x: augmented images (B, H, W, 3).
      labels: multi-hot float (B, K).
      d: the ``config.distill`` block (method, taps, beta, matching_form, sswa_*, temperature, alpha,
        kd_log_eps).

    Returns:
      ``(loss, aux)`` with ``aux`` = ``parts`` (``bce``, ``kd`` with ``'kd'``, ``match``),
      ``batch_stats`` (the student's new statistics), ``teacher_logits`` (B, K), ``seed`` (B, K) the
      one-hot of the teacher's class, ``teacher_masks`` and ``teacher_maps``/``student_maps`` per tap.
    """
    if base_loss not in BASE_LOSSES:
        raise ValueError(f"unknown base loss {base_loss!r}; choose one of {list(BASE_LOSSES)}.")
    chex.assert_rank(x, 4)
    chex.assert_shape(labels, (x.shape[0], None))
    teacher_out = teacher_maps(teacher, teacher_vars, x, d, mask_key)
    return student_loss(params, student, batch_stats, teacher_out, x, labels, d, dropout_key, base_loss)


def student_loss(
    params: Any,
    student,
    batch_stats: Any,
    teacher_out: tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]],
    x: jax.Array,
    labels: jax.Array,
    d: ml_collections.ConfigDict,
    dropout_key: jax.Array,
    base_loss: str = "kd",
) -> tuple[jax.Array, dict[str, Any]]:
    """:func:`distill_loss` given the teacher's half, ``teacher_out = (logits, maps, masks)`` from
    :func:`teacher_maps` (live) or :func:`apjax.compress.teacher_cache.teacher_side` (cached)."""
    t_logits, t_maps, t_masks = teacher_out
    seed = top1_seed(t_logits)  # the teacher's class k, used for the student too
    spec = MATCHING_MAPS.get(d.method)  # None: no matching term
    variables = {"params": params, "batch_stats": batch_stats}
    s_logits, s_acts, s_grads, updates = _student_forward(
        student, variables, x, seed, spec, tuple(d.taps), dropout_key
    )
    loss, parts = _base_loss(base_loss, s_logits, t_logits, labels, d)
    match = jnp.zeros((), jnp.float32)
    s_maps = {}
    if spec is not None:
        if spec.blackbox:
            # The teacher's one stored map against the student's own maps, at the stored map's resolution.
            s_maps, t_maps = matched_maps(s_acts, t_maps["map"])
        else:
            # The student's map is never channel-dropped: masks are the teacher's alone.
            s_maps = maps_at_taps(spec, s_acts, s_grads)
        match = multi_tap_matching_loss(s_maps, t_maps, d.matching_form)
        loss = loss + d.beta * match
    aux = dict(parts={**parts, "match": match}, batch_stats=updates["batch_stats"], teacher_logits=t_logits)
    return loss, dict(aux, seed=seed, teacher_masks=t_masks, teacher_maps=t_maps, student_maps=s_maps)


def _student_forward(student, variables, x, seed, spec, taps, dropout_key):
    """The student in train mode: ``(logits, acts, grads or None, updates)``; the tap gradients (seeded by
    the teacher's class) only when the matching map needs them, the activations only when it matches. A
    black-box method's entry computes the student's maps itself: they come in place of ``acts``."""
    rngs = {"dropout": dropout_key}
    if spec is not None and spec.blackbox:
        logits, maps, updates = spec.student_maps(student, variables, x, seed, taps, rngs)
        return logits, maps, None, updates
    if spec is not None and spec.needs_gradients:
        return tap_gradients(student, variables, x, seed, taps, train=True, rngs=rngs)
    logits, acts, updates = apply_with_taps(
        student, variables, x, taps if spec is not None else (), train=True, rngs=rngs
    )
    return logits, acts, None, updates


def _base_loss(base_loss: str, s_logits, t_logits, labels, d) -> tuple[jax.Array, dict[str, jax.Array]]:
    """KD (alpha * KD + (1 - alpha) * BCE, with its parts) or BCE alone."""
    if base_loss == "kd":
        return kd_loss(
            s_logits,
            t_logits,
            labels,
            temperature=d.temperature,
            alpha=d.alpha,
            log_eps=d.get("kd_log_eps", 0.0),
        )
    loss = bce_loss(s_logits, labels)
    return loss, {"bce": loss}


def make_distill_step(
    student,
    teacher,
    tx: optax.GradientTransformation,
    lr_fn: optax.Schedule,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    base_loss: str = "kd",
):
    """The jitted ``(state, teacher_variables, batch) -> (state, metrics)``; state donated.

    Augments the batch on the device, then one :func:`distill_loss` and its gradient, then the update.
    ``base_loss`` is ``'kd'`` (distillation) or ``'bce'`` (pruning's fine-tuning). Pruning masks in the
    state are honoured by :func:`apjax.trainer.state.apply_gradients`.

    Metrics (on the device): ``loss``, ``bce``, ``kd`` (with ``'kd'`` only), ``match`` (0 without
    matching), ``lr``.
    """
    if base_loss not in BASE_LOSSES:
        raise ValueError(f"unknown base loss {base_loss!r}; choose one of {list(BASE_LOSSES)}.")
    d = config.distill
    image_size, crop_scale = config.data.image_size, tuple(config.data.crop_scale)
    grad_fn = jax.value_and_grad(distill_loss, has_aux=True)

    def step(state: TrainState, teacher_vars, batch):
        aug_key, dropout_key, mask_key = step_keys(state, 3)
        x = train_augment(
            aug_key,
            batch["images"],
            batch["sizes"],
            batch["extents"],
            out_size=image_size,
            dtype=student.dtype,
            scale=crop_scale,
        )
        labels = batch["labels"].astype(jnp.float32)
        (loss, aux), grads = grad_fn(
            state.params, student, state.batch_stats, teacher, teacher_vars, x, labels, d,
            dropout_key, mask_key, base_loss,
        )  # fmt: skip
        new_state = apply_gradients(state, tx, grads, aux["batch_stats"])
        return new_state, {"loss": loss, "lr": lr_fn(state.step), **aux["parts"], **_grad_norm(grads)}

    return _jit_step(step, mesh)


def _jit_step(step, mesh: Mesh):
    """``step(state, teacher_vars, batch)`` jitted on the mesh: state and teacher replicated, the batch
    split; the state donated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(replicated, replicated, batch_sharding(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


def make_cached_distill_step(
    student,
    tx: optax.GradientTransformation,
    lr_fn,
    config,
    mesh: Mesh,
    base_loss: str = "kd",
):
    """:func:`make_distill_step` reading the teacher's outputs from the batch (``batch['teacher']`` and
    ``batch['draw']``, from :class:`apjax.compress.teacher_cache.CachedBatches`) instead of running it: the
    student's crop is regenerated from ``(seed, index, draw)``; SSWA's mask is drawn afresh. The returned
    step takes (and ignores) the teacher's variables, like the live one."""
    d = config.distill
    spec, taps = MATCHING_MAPS.get(d.method), tuple(d.taps)
    size, scale, key = config.data.image_size, tuple(config.data.crop_scale), draw_key(config.seed)
    grad_fn = jax.value_and_grad(student_loss, has_aux=True)

    def step(state: TrainState, teacher_vars, batch):
        del teacher_vars
        _, dropout_key, mask_key = step_keys(state, 3)
        images = (batch["images"], batch["sizes"], batch["extents"])
        x = draw_augment(key, batch["index"], batch["draw"], *images, size, student.dtype, scale)
        labels = batch["labels"].astype(jnp.float32)
        teacher_out = teacher_side(batch["teacher"], spec, taps, d, mask_key)
        (loss, aux), grads = grad_fn(
            state.params, student, state.batch_stats, teacher_out, x, labels, d, dropout_key, base_loss
        )
        new_state = apply_gradients(state, tx, grads, aux["batch_stats"])
        return new_state, {"loss": loss, "lr": lr_fn(state.step), **aux["parts"], **_grad_norm(grads)}

    return _jit_step(step, mesh)


def training_step(config, student, teacher, teacher_vars, tx, lr_fn, mesh: Mesh, base_loss: str = "kd"):
    """``(step, wrap_batches)``: the live step (``distill.teacher_cache = 0``; ``wrap_batches`` None), or the
    cached step and the wrapper adding the cached outputs to the batches; the wrapper builds the cache from
    the run's training split first if needed."""
    if not config.distill.get("teacher_cache", 0):
        return make_distill_step(student, teacher, tx, lr_fn, config, mesh, base_loss), None

    def wrap_batches(batches: TrainBatches) -> CachedBatches:
        return CachedBatches(batches, build_teacher_cache(config, teacher, teacher_vars, batches.cache, mesh))

    return make_cached_distill_step(student, tx, lr_fn, config, mesh, base_loss), wrap_batches


# ------------------------------------------------------------------------------------------------
# Evaluation: classification plus teacher-student map similarity.
# ------------------------------------------------------------------------------------------------


class SimilarityEval:
    """Evaluation of a student against its frozen teacher: classification and map similarity on a split.

    ``evaluate(state, cache)`` returns mAP, per-image AP, F1, BCE and ``map_cos``: the mean cosine
    similarity of the student's and the teacher's unmasked SWA maps at ``distill.taps`` (``pool5`` if
    none) for the teacher's top-1 class, both nets in eval mode (for every method, so runs compare on one
    scale). The teacher's classes and maps of a split are computed once and kept on the devices (about
    one map per image); each evaluation then runs only the student.
    """

    def __init__(self, student, teacher, teacher_vars, config: ml_collections.ConfigDict, mesh: Mesh):
        self.taps = tuple(config.distill.taps) or ("pool5",)
        self.mesh, self.teacher_vars = mesh, teacher_vars
        self.batch_size = max(config.batch_size, mesh.devices.size)
        image_size, taps = config.data.image_size, self.taps

        def teacher_step(teacher_vars, images, extents):
            x = eval_preprocess(images, extents, out_size=image_size, dtype=teacher.dtype)
            logits, acts, grads, _ = tap_gradients(teacher, teacher_vars, x, top1_seed, taps)
            return top1_seed(logits), {t: swa_map(acts[t], grads[t]) for t in taps}

        def student_step(student_vars, images, extents, seed, teacher_maps):
            x = eval_preprocess(images, extents, out_size=image_size, dtype=student.dtype)
            logits, acts, grads, _ = tap_gradients(student, student_vars, x, seed, taps)
            cos = [map_cosine_similarity(swa_map(acts[t], grads[t]), teacher_maps[t]) for t in taps]
            return logits, jnp.mean(jnp.stack(cos), axis=0)

        replicated, split = NamedSharding(mesh, PartitionSpec()), batch_sharding(mesh)
        self._teacher_step = jax.jit(
            teacher_step, in_shardings=(replicated, split, split), out_shardings=split
        )
        self._student_step = jax.jit(
            student_step, in_shardings=(replicated, split, split, split, split), out_shardings=(split, split)
        )
        self._targets: dict[int, list] = {}

    def teacher_targets(self, cache: HostCache) -> list:
        """Per eval batch of ``cache``: the teacher's top-1 one-hot (B, K) and its maps per tap (B, h, w)."""
        key = id(cache)
        if key not in self._targets:
            self._targets[key] = [
                self._teacher_step(self.teacher_vars, b["images"], b["extents"])
                for b in eval_batches(cache, self.batch_size, self.mesh)
            ]
        return self._targets[key]

    def __call__(self, state: TrainState, cache: HostCache) -> dict[str, float]:
        student_vars = {"params": state.params, "batch_stats": state.batch_stats}
        outs = [
            (*self._student_step(student_vars, b["images"], b["extents"], seed, maps), b["valid"])
            for b, (seed, maps) in zip(
                eval_batches(cache, self.batch_size, self.mesh), self.teacher_targets(cache), strict=True
            )
        ]
        logits = np.concatenate([valid_rows(lg, v) for lg, _, v in outs])
        cos = np.concatenate([valid_rows(c, v) for _, c, v in outs])
        m = classification_summary(logits, cache.labels)
        m["map_cos"] = float(np.mean(cos))
        return m
