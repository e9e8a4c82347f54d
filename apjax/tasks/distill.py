"""The ``distill`` task: attribution-preserving knowledge distillation (:mod:`apjax.compress.distill`)."""

from __future__ import annotations

from pathlib import Path

import ml_collections
import optax
from jax.sharding import Mesh

from apjax.compress.distill import distill_task, validate_distill_config
from apjax.trainer.loop import Task

CONFIG_FILE = "configs/vgg16_kd.py"
BLOCKS = ("distill",)  # the config blocks this task reads beyond the common ones


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`apjax.errors.ConfigError` for a bad ``config.distill`` value."""
    validate_distill_config(config)


def build(
    config: ml_collections.ConfigDict, num_classes: int, mesh: Mesh, lr_fn: optax.Schedule, workdir: Path
) -> Task:
    """The distillation :class:`Task`: a frozen teacher, a student and the matching loss."""
    del workdir  # distillation writes nothing beside the loop's files
    return distill_task(config, num_classes, mesh, lr_fn)
