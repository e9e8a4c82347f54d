"""Attribution-preserving pruning (SPEC section 6): what the ``prune_unstructured`` and ``prune_structured``
tasks (:mod:`apjax.tasks.prune_unstructured`, :mod:`apjax.tasks.prune_structured`) share.

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

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from apjax.compress.distill import (
    SimilarityEval,
    teacher_config,
    training_step,
    validate_distill_config,
)
from apjax.compress.matching import matching_methods
from apjax.compress.unstructured import (
    count_nonzero_params,
    count_zero_conv_weights,
)
from apjax.errors import ConfigError
from apjax.models import conv_names, count_params, create_model, family_of, variant_widths
from apjax.trainer.loop import Task
from apjax.trainer.map_grid import MapGrid
from apjax.trainer.state import TrainState

MODEL_FILE = "model.json"


def methods() -> tuple[str, ...]:
    """Pruning's methods: ``naive`` (no matching term) and every registered matching map."""
    return ("naive", *matching_methods())


def validate_prune_config(config: ml_collections.ConfigDict, structured: bool) -> None:
    """Raises ``ConfigError`` (one sentence) for a bad ``config.prune`` or ``config.distill`` value of
    structured (``ratio``, ``pattern``) or unstructured (``rounds``, ``rate``) pruning."""
    validate_distill_config(config, methods())
    p = config.prune
    if not structured:
        if not isinstance(p.rounds, int) or p.rounds < 1:
            raise ConfigError(f"config.prune.rounds must be a positive integer, got {p.rounds!r}.")
        if not 0 < p.rate < 1:
            raise ConfigError(f"config.prune.rate must be in (0, 1), got {p.rate!r}.")
    else:
        if not 0 <= p.ratio < 1:
            raise ConfigError(f"config.prune.ratio must be in [0, 1), got {p.ratio!r}.")
        family = family_of(config.model)
        if not family.plain_chain:
            raise ConfigError(
                f"structured pruning is implemented for plain conv chains (the VGG family) only: a "
                f"{family.name}'s channels are tied by its residual additions; use task=prune_unstructured."
            )
        n = len(conv_names(variant_widths(config.model)))
        pattern = tuple(p.pattern)
        if len(pattern) != n or any(x not in (0, 1) for x in pattern):
            raise ConfigError(
                f"config.prune.pattern must hold one 0 or 1 per conv ({n} for {config.model}), got {pattern}."
            )


def check_teacher_model(config: ml_collections.ConfigDict) -> None:
    """Raises ``ConfigError`` unless ``config.model`` is the teacher's: pruning starts from its weights."""
    tc = teacher_config(config)
    if create_model(tc.model) != create_model(config.model):
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


def pruning_task(config, student, teacher, teacher_vars, tx, lr_fn, mesh, init_state, steps=None) -> Task:
    """A pruning run's Task; ``steps`` = (train step, evaluation) to reuse compiled steps across rounds."""
    step, evaluate, wrap_batches = steps or pruning_steps(
        config, student, teacher, teacher_vars, tx, lr_fn, mesh
    )
    return Task(
        batches=wrap_batches,
        init_state=init_state,
        train_step=lambda state, batch: step(state, teacher_vars, batch),
        evaluate=evaluate,
        describe=lambda state: parameter_counts(state.params),
        figure=MapGrid(student, config.data.image_size, config.distill.taps, (teacher, teacher_vars)),
    )


def pruning_steps(config, student, teacher, teacher_vars, tx, lr_fn, mesh):
    """The jitted fine-tuning step (BCE + beta * matching; live teacher or its cached outputs), the evaluation
    against the teacher and the batch wrapper of the cached step (None for the live one)."""
    step, wrap_batches = training_step(
        config, student, teacher, teacher_vars, tx, lr_fn, mesh, base_loss="bce"
    )
    return step, SimilarityEval(student, teacher, teacher_vars, config, mesh), wrap_batches
