"""The tasks, found by name (``config.task``) in one registry, and the entry point that runs them.

Each task is a module exporting ``validate(config)`` (its own config blocks; one-sentence
:class:`apjax.errors.ConfigError`) and either ``build(config, num_classes, mesh, lr_fn, workdir)``,
returning the :class:`apjax.trainer.loop.Task` that the common loop trains, or ``run(config, workdir,
data, mesh)`` for a task that runs the loop itself (unstructured pruning's rounds). ``CONFIG_FILE`` names
the config file to start from and ``BLOCKS`` the config blocks it needs beyond the common ones. Adding a
task is a module and one line of :data:`TASKS`. This package sits above the trainer: the trainer knows
no task.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import ml_collections
import optax
from jax.sharding import Mesh

from apjax import evaluators
from apjax.data.pipeline import check_batch_size, data_mesh
from apjax.errors import ConfigError
from apjax.tasks import distill, prune_structured, prune_unstructured, quantize, teacher
from apjax.trainer.config import (
    build_model,
    check_model_input,
    load_data,
    resident_cache,
    train_batches,
    validate_common,
)
from apjax.trainer.files import prepare_workdir
from apjax.trainer.loop import Task, run_training
from apjax.trainer.optim import create_learning_rate_fn

TASKS: dict[str, ModuleType] = {
    "teacher": teacher,
    "distill": distill,
    "prune_unstructured": prune_unstructured,
    "prune_structured": prune_structured,
    "quantize": quantize,
}


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigError` with one sentence for the first bad value found in ``config``."""
    if config.task not in TASKS:
        raise ConfigError(f"unknown task {config.task!r}; choose one of {list(TASKS)}.")
    task = TASKS[config.task]
    for block in getattr(task, "BLOCKS", ()):
        if block not in config:
            raise ConfigError(
                f"task {config.task!r} needs a config.{block} block; start from {task.CONFIG_FILE}."
            )
    validate_common(config)
    evaluators.validate(config.get("evals"))
    task.validate(config)
    check_model_input(config)


def build_task(
    config: ml_collections.ConfigDict,
    num_classes: int,
    mesh: Mesh,
    lr_fn: optax.Schedule,
    workdir: Path,
    data: dict | None = None,
) -> Task:
    """The :class:`Task` of ``config.task`` (a task that runs its own rounds has none), its evaluation
    joined by the evaluators of ``config.evals`` (run on ``data``'s splits, others loaded when needed)."""
    task = TASKS[config.task]
    if not hasattr(task, "build"):
        raise ConfigError(f"task {config.task!r} has no single training run; use train_and_evaluate.")
    built = task.build(config, num_classes, mesh, lr_fn, workdir)
    return evaluators.with_evals(built, config, build_model(config, num_classes), mesh, data or {})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
    """Trains per ``config`` in ``workdir`` (resuming if it holds a run) and returns the final val metrics.

    Writes ``config.json``, ``metrics.jsonl``, ``checkpoints/{latest,best}`` and ``final_metrics.json``
    (process 0 only); unstructured pruning writes one such run per round under ``round_XX/``.
    """
    validate_config(config)
    workdir = Path(workdir).expanduser().absolute()
    mesh = data_mesh()
    check_batch_size(config.batch_size, mesh)
    prepare_workdir(workdir, config)
    data = load_data(config)
    task = TASKS[config.task]
    if hasattr(task, "run"):
        return task.run(config, workdir, data, mesh)
    batches = train_batches(config, data["train"], mesh, resident=resident_cache(config, data["train"], mesh))
    lr_fn = create_learning_rate_fn(config, batches.steps_per_epoch)
    built = build_task(config, data["train"].num_classes, mesh, lr_fn, workdir, data)
    return run_training(config, workdir, built, data, batches, mesh)
