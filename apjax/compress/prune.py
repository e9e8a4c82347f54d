"""Attribution-preserving pruning (SPEC section 6): the ``prune_unstructured`` and ``prune_structured`` tasks.

Both start from a trained teacher (``config.distill.teacher_workdir``, its ``teacher_checkpoint``) and
fine-tune the pruned net with

    L = BCE + beta * sum_taps matching(M_pruned, M_teacher)

where the teacher of the matching term is the UNPRUNED net in eval mode (the reference forgot the eval
mode). ``config.distill`` holds the teacher and matching settings as for distillation; its ``method`` is
``naive`` (no matching), ``ewa``, ``swa`` or ``sswa``. The step is :func:`make_distill_step` with a BCE
base loss, so all matching options carry over.

- **Unstructured** (``config.prune.rounds``, ``config.prune.rate``): round r prunes to global sparsity
  ``1 - (1 - rate)**r`` over all conv kernels with one magnitude threshold
  (:mod:`apjax.compress.unstructured`), then fine-tunes ``num_epochs`` from the previous round's last
  weights with a fresh optimizer. The masks live in the train state and every update keeps the pruned
  weights at zero. Round r runs in ``<workdir>/round_XX`` (a complete run: checkpoints, metrics,
  ``final_metrics.json`` with the sparsity and parameter counts); a finished round is skipped when the
  command is run again, an unfinished one resumes from its last checkpoint.
- **Structured** (``config.prune.ratio``, ``config.prune.pattern``): one-shot L1-norm filter pruning and
  surgery (:mod:`apjax.compress.structured`); the pruned widths are saved in ``<workdir>/model.json``,
  which :func:`apjax.trainer.files.load_workdir_config` reads, so ``eval.py`` loads the smaller net.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from apjax.compress.distill import (
    MATCHING_METHODS,
    SimilarityEval,
    load_teacher,
    make_distill_step,
    teacher_config,
    validate_distill_config,
)
from apjax.compress.structured import l1_filter_keep, layer_ratios, surgery
from apjax.compress.unstructured import (
    all_kept_masks,
    count_nonzero_params,
    count_zero_conv_weights,
    global_magnitude_masks,
    round_sparsity,
)
from apjax.data.cache import HostCache
from apjax.data.pipeline import TrainBatches
from apjax.errors import ConfigError, MissingFileError
from apjax.models import conv_names, count_params, create_model, variant_widths, widths_string
from apjax.trainer.checkpoints import Checkpoints, round_dir
from apjax.trainer.config import PRECISIONS, build_model
from apjax.trainer.evaluation import CLASSIFICATION_PERCENT
from apjax.trainer.files import prepare_workdir, sync_processes, write_json_atomic
from apjax.trainer.loop import Task, run_training
from apjax.trainer.metrics_log import format_table
from apjax.trainer.optim import create_learning_rate_fn, create_optimizer
from apjax.trainer.state import TrainState, mask_params

METHODS = ("naive", *MATCHING_METHODS)
MODEL_FILE = "model.json"


def validate_prune_config(config: ml_collections.ConfigDict, structured: bool) -> None:
    """Raises ``ConfigError`` (one sentence) for a bad ``config.prune`` or ``config.distill`` value of
    structured (``ratio``, ``pattern``) or unstructured (``rounds``, ``rate``) pruning."""
    validate_distill_config(config, METHODS)
    p = config.prune
    if not structured:
        if not isinstance(p.rounds, int) or p.rounds < 1:
            raise ConfigError(f"config.prune.rounds must be a positive integer, got {p.rounds!r}.")
        if not 0 < p.rate < 1:
            raise ConfigError(f"config.prune.rate must be in (0, 1), got {p.rate!r}.")
    else:
        if not 0 <= p.ratio < 1:
            raise ConfigError(f"config.prune.ratio must be in [0, 1), got {p.ratio!r}.")
        n = len(conv_names(variant_widths(config.model)))
        pattern = tuple(p.pattern)
        if len(pattern) != n or any(x not in (0, 1) for x in pattern):
            raise ConfigError(
                f"config.prune.pattern must hold one 0 or 1 per conv ({n} for {config.model}), got {pattern}."
            )


def _check_teacher_model(config: ml_collections.ConfigDict) -> None:
    tc = teacher_config(config)
    if variant_widths(tc.model) != variant_widths(config.model):
        raise ConfigError(
            f"config.model ({config.model}) is not the teacher's model ({tc.model}); pruning starts from the "
            f"teacher's weights, so set --config.model={tc.model}."
        )


def fresh_state(params, batch_stats, tx, key: jax.Array, masks=None) -> TrainState:
    """Step 0 with a fresh optimizer. Copies the arrays: the train step donates its state, which must
    not share buffers with the teacher's variables (round 1 starts from them)."""
    params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=jax.tree.map(lambda x: jnp.array(x, copy=True), batch_stats),
        opt_state=tx.init(params),
        rng=jax.random.key_data(key),
        masks=masks or {},
    )


PARAMETER_COUNTS = ("params_total", "params_nonzero", "conv_weights", "conv_weights_zero", "conv_sparsity")


def parameter_counts(params: Any) -> dict[str, Any]:
    """Total and non-zero parameters, and the zero conv weights (count and fraction)."""
    zero, conv = count_zero_conv_weights(params)
    return {
        "params_total": count_params(params),
        "params_nonzero": count_nonzero_params(params),
        "conv_weights": conv,
        "conv_weights_zero": zero,
        "conv_sparsity": zero / conv,
    }


def _task(config, student, teacher, teacher_vars, tx, lr_fn, mesh, init_state, steps=None) -> Task:
    """A pruning run's Task; ``steps`` = (train step, evaluation) to reuse compiled steps across rounds."""
    step, evaluate = steps or _steps(config, student, teacher, teacher_vars, tx, lr_fn, mesh)
    return Task(
        init_state=init_state,
        train_step=lambda state, batch: step(state, teacher_vars, batch),
        evaluate=evaluate,
        describe=lambda state: parameter_counts(state.params),
    )


def _steps(config, student, teacher, teacher_vars, tx, lr_fn, mesh):
    """The jitted fine-tuning step (BCE + beta * matching) and the evaluation against the teacher."""
    step = make_distill_step(student, teacher, tx, lr_fn, config, mesh, base_loss="bce")
    return step, SimilarityEval(student, teacher, teacher_vars, config, mesh)


# ------------------------------------------------------------------------------------------------
# Structured.
# ------------------------------------------------------------------------------------------------


def structured_task(
    config: ml_collections.ConfigDict, num_classes: int, mesh: Mesh, lr_fn: optax.Schedule, workdir: Path
) -> Task:
    """The ``prune_structured`` task: L1 filter pruning of the teacher, surgery, then fine-tuning."""
    _check_teacher_model(config)
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
    return _task(
        config, student, teacher, teacher_vars, tx, lr_fn, mesh,
        init_state=lambda: fresh_state(pruned["params"], pruned["batch_stats"], tx, key),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Unstructured.
# ------------------------------------------------------------------------------------------------


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


def train_unstructured(
    config: ml_collections.ConfigDict, workdir: Path, data: dict[str, HostCache], mesh: Mesh
) -> dict[str, float]:
    """Runs (or continues) the rounds of iterative global magnitude pruning; returns the last round's
    final val metrics and writes ``<workdir>/final_metrics.json`` with one row per round."""
    _check_teacher_model(config)
    teacher, teacher_vars = load_teacher(config, mesh)
    num_classes = data["train"].num_classes
    student = build_model(config, num_classes)
    base_key = jax.random.key(config.seed)
    # One schedule, optimizer and compiled step for all rounds (each round starts a fresh optimizer state).
    spe = TrainBatches(data["train"], config.batch_size, seed=config.seed, mesh=mesh).steps_per_epoch
    lr_fn = create_learning_rate_fn(config, spe)
    tx = create_optimizer(config, lr_fn)
    steps = _steps(config, student, teacher, teacher_vars, tx, lr_fn, mesh)
    previous = None  # the last state of the previous round (round 1 starts from the teacher)
    summary_rows, per_round = {}, []
    for r in range(1, config.prune.rounds + 1):
        rdir = round_dir(workdir, r)
        sparsity = round_sparsity(r, config.prune.rate)
        batches = TrainBatches(data["train"], config.batch_size, seed=config.seed + r, mesh=mesh)
        if previous is None:
            params, stats, old_masks = teacher_vars["params"], teacher_vars["batch_stats"], None
        else:
            params, stats, old_masks = previous.params, previous.batch_stats, previous.masks

        def init_state(params=params, stats=stats, old_masks=old_masks, sparsity=sparsity, r=r):
            masks = global_magnitude_masks(params, sparsity, old_masks)
            pruned = mask_params(params, masks)
            return fresh_state(pruned, stats, tx, jax.random.fold_in(base_key, r), masks)

        task = _task(config, student, teacher, teacher_vars, tx, lr_fn, mesh, init_state, steps)
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
