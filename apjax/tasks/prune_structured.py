"""The ``prune_structured`` task: one-shot L1 filter pruning of the teacher, surgery, fine-tuning.

The pruned widths are saved in ``<workdir>/model.json``, which :func:`apjax.trainer.files.load_workdir_config`
reads, so ``eval.py`` loads the smaller net.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from apjax.compress.distill import load_teacher
from apjax.compress.prune import (
    MODEL_FILE,
    check_teacher_model,
    fresh_state,
    pruning_task,
    validate_prune_config,
)
from apjax.compress.structured import l1_filter_keep, layer_ratios, surgery
from apjax.models import count_params, create_model, variant_widths, widths_string
from apjax.trainer.config import PRECISIONS
from apjax.trainer.files import write_json_atomic
from apjax.trainer.loop import Task
from apjax.trainer.optim import create_optimizer

CONFIG_FILE = "configs/prune_structured.py"
BLOCKS = ("distill", "prune")  # the config blocks this task reads beyond the common ones


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`apjax.errors.ConfigError` for a bad ``config.prune`` or ``config.distill`` value."""
    validate_prune_config(config, structured=True)


def build(
    config: ml_collections.ConfigDict, num_classes: int, mesh: Mesh, lr_fn: optax.Schedule, workdir: Path
) -> Task:
    """The fine-tuning :class:`Task` of the teacher pruned by L1 filter norms; writes the pruned widths to
    ``<workdir>/model.json``."""
    check_teacher_model(config)
    teacher, teacher_vars = load_teacher(config, mesh)
    widths = variant_widths(config.model)
    ratios = layer_ratios(widths, config.prune.ratio, tuple(config.prune.pattern))
    keep = l1_filter_keep(teacher_vars["params"], widths, ratios)
    new_widths, pruned = surgery(teacher_vars, widths, keep)
    model = widths_string(new_widths)
    if jax.process_index() == 0:
        info = {
            "model": model,
            "teacher_model": config.model,
            "ratios": list(ratios),
            "kept_filters": {name: len(k) for name, k in keep.items()},
            "params": count_params(pruned["params"]),
            "teacher_params": count_params(teacher_vars["params"]),
        }
        write_json_atomic(Path(workdir) / MODEL_FILE, info)
    student = create_model(
        model,
        num_classes=num_classes,
        dtype=PRECISIONS[config.precision],
        dropout_rate=config.dropout_rate,
    )
    tx = create_optimizer(config, lr_fn)
    key = jax.random.split(jax.random.key(config.seed))[1]
    return pruning_task(
        config, student, teacher, teacher_vars, tx, lr_fn, mesh,
        init_state=lambda: fresh_state(pruned["params"], pruned["batch_stats"], tx, key),
    )  # fmt: skip
