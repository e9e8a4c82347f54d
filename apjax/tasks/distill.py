"""The ``distill`` task: attribution-preserving knowledge distillation (:mod:`apjax.compress.distill`)."""

from __future__ import annotations

from pathlib import Path

import ml_collections
import optax
from jax.sharding import Mesh

from apjax.compress import distill
from apjax.trainer.config import build_model
from apjax.trainer.loop import Task
from apjax.trainer.map_grid import MapGrid
from apjax.trainer.optim import create_optimizer
from apjax.trainer.state import abstract_train_state, create_train_state

CONFIG_FILE = "configs/vgg16_kd.py"
BLOCKS = ("distill",)  # the config blocks this task reads beyond the common ones


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`apjax.errors.ConfigError` for a bad ``config.distill`` value."""
    distill.validate_distill_config(config)


def build(
    config: ml_collections.ConfigDict,
    num_classes: int,
    mesh: Mesh,
    lr_fn: optax.Schedule,
    workdir: Path | None = None,
) -> Task:
    """The distillation :class:`Task`: a frozen teacher (live, or its cached outputs with
    ``distill.teacher_cache``), a student, KD plus the matching loss; evaluated against the teacher
    (:class:`apjax.compress.distill.SimilarityEval`). Writes nothing in ``workdir``."""
    del workdir
    teacher, teacher_vars = distill.load_teacher(config, mesh)
    student = build_model(config, num_classes)
    tx = create_optimizer(config, lr_fn)
    step, wrap_batches = distill.training_step(config, student, teacher, teacher_vars, tx, lr_fn, mesh)
    return Task(
        batches=wrap_batches,
        init_state=lambda: create_train_state(config, student, tx),
        abstract_init=lambda sharding: abstract_train_state(config, student, tx, sharding),
        train_step=lambda state, batch: step(state, teacher_vars, batch),
        evaluate=distill.SimilarityEval(student, teacher, teacher_vars, config, mesh),
        figure=MapGrid(student, config.data.image_size, config.distill.taps, (teacher, teacher_vars)),
    )
