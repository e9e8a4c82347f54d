"""The ``quantize`` task: attribution-preserving quantization-aware training (issue 15 part 2).

A trained network (``config.quant.source_workdir``: the teacher itself when empty, or a distilled student)
is quantized with :func:`apjax.models.quantized.quantize_model` (qwix's quantized training; schemes
``int8``: int8 weights and activations, ``int4w``: int4 weights) and fine-tuned with

    L = BCE + beta * sum_taps matching(M_quantized, M_teacher)

as in pruning (:mod:`apjax.compress.prune`): the same one-jitted-step distillation step with a BCE
base loss, the matching teacher the FLOAT teacher of ``config.distill.teacher_workdir`` (frozen, eval
mode), methods ``naive`` (no matching), ``ewa``, ``swa``, ``sswa``. The quantized net starts from the
source's best checkpoint (its latent float weights and BatchNorm statistics). Its tap gradients, and so
its SWA maps and the second-order gradient of the matching term, run through the quantized forward pass
with qwix's straight-through backward pass.

The workdir's ``config.json`` holds ``config.quant.bits``, from which :func:`apjax.trainer.config.build_model`
rebuilds the quantized model (``eval.py`` and the sweep's evaluation see the quantized net);
``final_metrics.json`` adds the model's size (:func:`apjax.compress.quantize.model_size_bytes`).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from apjax.compress.distill import load_teacher, teacher_config, validate_distill_config
from apjax.compress.prune import fresh_state, methods, pruning_steps
from apjax.compress.quantize import model_size_bytes
from apjax.errors import ConfigError, MissingFileError
from apjax.models import create_model
from apjax.models.quantized import quant_bits_of, scheme
from apjax.trainer.checkpoints import restore_state
from apjax.trainer.config import build_model, num_classes_of
from apjax.trainer.files import load_workdir_config
from apjax.trainer.loop import Task
from apjax.trainer.map_grid import MapGrid
from apjax.trainer.optim import create_optimizer

CONFIG_FILE = "configs/quantize.py"
BLOCKS = ("distill", "quant")  # the config blocks this task reads beyond the common ones


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigError` for a bad ``config.quant`` or ``config.distill`` value (the workdirs
    are checked when the task is built, as the teacher's is)."""
    scheme(config.quant.bits)
    validate_distill_config(config, methods())


def source_variables(config: ml_collections.ConfigDict, mesh: Mesh) -> dict:
    """The weights to quantize: the best checkpoint of ``config.quant.source_workdir`` (the teacher's when
    empty), a float run of ``config.model`` on the same data; ``ConfigError`` (one sentence) otherwise."""
    given = config.quant.source_workdir
    workdir = Path(os.path.expanduser(given or config.distill.teacher_workdir))
    if not (workdir / "config.json").exists():
        raise MissingFileError(
            f"no trained run in {workdir} (config.quant.source_workdir): point it at the --workdir of the "
            "teacher or of a distilled student, or leave it empty to quantize the teacher."
        )
    sc = load_workdir_config(workdir)
    if quant_bits_of(sc):
        raise ConfigError(f"{workdir} holds a quantized run; quantize a float run (the teacher, a student).")
    if sc.data.dataset != config.data.dataset or num_classes_of(sc) != num_classes_of(config):
        raise ConfigError(f"the run in {workdir} was trained on other data; quantize a run of the same data.")
    if create_model(sc.model) != create_model(config.model):
        raise ConfigError(
            f"config.model ({config.model}) is not the model of {workdir} ({sc.model}); quantization starts "
            f"from its weights, so set --config.model={sc.model}."
        )
    _, state, _ = restore_state(sc, workdir, "best")
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))


def build(
    config: ml_collections.ConfigDict, num_classes: int, mesh: Mesh, lr_fn: optax.Schedule, workdir: Path
) -> Task:
    """The quantization-aware fine-tuning :class:`Task`: the source's weights in the quantized model, BCE
    plus matching against the float teacher; writes nothing beside the loop's files."""
    del workdir
    teacher_config(config)  # the teacher exists and was trained on the same data
    source = source_variables(config, mesh)
    teacher, teacher_vars = load_teacher(config, mesh)
    student = build_model(config, num_classes)  # quantized: config.quant
    tx = create_optimizer(config, lr_fn)
    step, evaluate, wrap_batches = pruning_steps(config, student, teacher, teacher_vars, tx, lr_fn, mesh)
    key = jax.random.split(jax.random.key(config.seed))[1]
    bits = config.quant.bits
    return Task(
        batches=wrap_batches,  # distill.teacher_cache > 0: the float teacher's cached outputs
        init_state=lambda: fresh_state(source["params"], source["batch_stats"], tx, key),
        train_step=lambda state, batch: step(state, teacher_vars, batch),
        evaluate=evaluate,
        describe=lambda state: {
            "quant_bits": bits,
            **model_size_bytes({"params": state.params, "batch_stats": state.batch_stats}, bits),
        },
        figure=MapGrid(student, config.data.image_size, config.distill.taps, (teacher, teacher_vars)),
    )
