"""The ``prune_unstructured`` task: rounds of global magnitude pruning, each fine-tuned as its own run.

Round r prunes to global sparsity ``1 - (1 - rate)**r`` and fine-tunes ``num_epochs`` from the previous
round's last weights with a fresh optimizer, in ``<workdir>/round_XX`` (a complete run); a finished round
is skipped when the command is run again, an unfinished one resumes from its last checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from apjax import evaluators
from apjax.compress.distill import load_teacher
from apjax.compress.prune import (
    PARAMETER_COUNTS,
    check_teacher_model,
    fresh_state,
    pruning_steps,
    pruning_task,
    validate_prune_config,
)
from apjax.compress.unstructured import global_magnitude_masks, round_sparsity
from apjax.data import HostCache
from apjax.errors import MissingFileError
from apjax.trainer.checkpoints import Checkpoints, round_dir
from apjax.trainer.config import build_model, resident_cache, train_batches
from apjax.trainer.evaluation import CLASSIFICATION_PERCENT
from apjax.trainer.files import prepare_workdir, sync_processes, write_json_atomic
from apjax.trainer.loop import run_training
from apjax.trainer.metrics_log import format_table
from apjax.trainer.optim import create_learning_rate_fn, create_optimizer
from apjax.trainer.state import TrainState, all_kept_masks, mask_params

CONFIG_FILE = "configs/prune_unstructured.py"
BLOCKS = ("distill", "prune")  # the config blocks this task reads beyond the common ones


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`apjax.errors.ConfigError` for a bad ``config.prune`` or ``config.distill`` value."""
    validate_prune_config(config, structured=False)


def _restore_last(workdir: Path, mesh: Mesh, template: TrainState) -> TrainState:
    checkpoints = Checkpoints(workdir)
    try:
        restored = Checkpoints.restore(checkpoints.latest, template)
    finally:
        checkpoints.close()
    if restored is None:
        raise MissingFileError(
            f"{workdir} has final_metrics.json but no checkpoint; delete {workdir} to run that round again."
        )
    return jax.device_put(restored[0], NamedSharding(mesh, PartitionSpec()))


def run(
    config: ml_collections.ConfigDict, workdir: Path, data: dict[str, HostCache], mesh: Mesh
) -> dict[str, float]:
    """Runs (or continues) the rounds of iterative global magnitude pruning; returns the last round's
    final val metrics and writes ``<workdir>/final_metrics.json`` with one row per round."""
    check_teacher_model(config)
    teacher, teacher_vars = load_teacher(config, mesh)
    num_classes = data["train"].num_classes
    student = build_model(config, num_classes)
    base_key = jax.random.key(config.seed)
    # One schedule, optimizer and compiled step for all rounds (each round starts a fresh optimizer state).
    spe = train_batches(config, data["train"], mesh).steps_per_epoch
    lr_fn = create_learning_rate_fn(config, spe)
    tx = create_optimizer(config, lr_fn)
    steps = pruning_steps(config, student, teacher, teacher_vars, tx, lr_fn, mesh)
    previous = None  # the last state of the previous round (round 1 starts from the teacher)
    resident = resident_cache(config, data["train"], mesh)  # one copy on the devices for every round
    summary_rows, per_round = {}, []
    for r in range(1, config.prune.rounds + 1):
        rdir = round_dir(workdir, r)
        sparsity = round_sparsity(r, config.prune.rate)
        batches = train_batches(config, data["train"], mesh, seed=config.seed + r, resident=resident)
        if previous is None:
            params, stats, old_masks = teacher_vars["params"], teacher_vars["batch_stats"], None
        else:
            params, stats, old_masks = previous.params, previous.batch_stats, previous.masks

        def init_state(params=params, stats=stats, old_masks=old_masks, sparsity=sparsity, r=r):
            masks = global_magnitude_masks(params, sparsity, old_masks)
            pruned = mask_params(params, masks)
            return fresh_state(pruned, stats, tx, jax.random.fold_in(base_key, r), masks)

        task = pruning_task(config, student, teacher, teacher_vars, tx, lr_fn, mesh, init_state, steps)
        task = evaluators.with_evals(task, config, student, mesh, data)
        final_path = rdir / "final_metrics.json"
        if not final_path.exists():
            prepare_workdir(rdir, config)
            desc = f"round {r}/{config.prune.rounds}"
            run_training(config, rdir, task, data, batches, mesh, desc=desc)
        elif jax.process_index() == 0:
            print(f"Round {r} is finished ({final_path}); skipping it.")
        sync_processes(f"apjax round {r}")  # process 0 wrote final_metrics.json
        template = fresh_state(params, stats, tx, base_key, all_kept_masks(params))
        previous = _restore_last(rdir, mesh, template)
        done = json.loads(final_path.read_text())
        counts = {k: done[k] for k in PARAMETER_COUNTS}
        row = {"round": r, "target_sparsity": sparsity, **counts, "val": done["val"]}
        per_round.append(row)
        summary_rows[f"round {r} ({100 * row['conv_sparsity']:.1f}% conv zero)"] = done["val"]
    if jax.process_index() == 0:
        final = per_round[-1]
        write_json_atomic(
            workdir / "final_metrics.json",
            {"val": final["val"], "rounds": per_round, **{k: v for k, v in final.items() if k != "val"}},
        )
        print(format_table(summary_rows, percent=CLASSIFICATION_PERCENT))
    return per_round[-1]["val"]
