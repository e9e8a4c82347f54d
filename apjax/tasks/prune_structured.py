"""The ``prune_structured`` task: one-shot L1 filter pruning of the teacher, surgery, fine-tuning."""

from __future__ import annotations

from pathlib import Path

import ml_collections
import optax
from jax.sharding import Mesh

from apjax.compress.prune import structured_task, validate_prune_config
from apjax.trainer.loop import Task

CONFIG_FILE = "configs/prune_structured.py"
BLOCKS = ("distill", "prune")  # the config blocks this task reads beyond the common ones


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`apjax.errors.ConfigError` for a bad ``config.prune`` or ``config.distill`` value."""
    validate_prune_config(config, structured=True)


def build(
    config: ml_collections.ConfigDict, num_classes: int, mesh: Mesh, lr_fn: optax.Schedule, workdir: Path
) -> Task:
    """The fine-tuning :class:`Task` of the pruned net (its widths saved in ``<workdir>/model.json``)."""
    return structured_task(config, num_classes, mesh, lr_fn, workdir)
