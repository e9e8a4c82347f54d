"""The ``teacher`` task: plain multi-label training with BCE (the teacher of the paper)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from apjax.compress.losses import bce_loss
from apjax.data.augment import train_augment
from apjax.data.pipeline import batch_sharding
from apjax.errors import ConfigError
from apjax.trainer import evaluation
from apjax.trainer.config import build_model
from apjax.trainer.loop import Task
from apjax.trainer.map_grid import MapGrid
from apjax.trainer.optim import create_optimizer
from apjax.trainer.state import (
    TrainState,
    abstract_train_state,
    apply_gradients,
    create_train_state,
    step_keys,
)

CONFIG_FILE = "configs/teacher_vgg16.py"


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigError` when a VOC teacher has neither ``init_from`` nor ``from_scratch``."""
    if config.data.dataset == "voc" and not config.get("init_from") and not config.get("from_scratch", False):
        raise ConfigError(
            "the paper's VOC teacher starts from torchvision's ImageNet weights: pass "
            "--config.init_from=/path/to/vgg16_bn.pth (or resnet50.pth ...; .npz too; in the sweep "
            "--config.teacher.init_from), or --config.from_scratch=True to train it from scratch."
        )


def make_train_step(
    model,
    tx: optax.GradientTransformation,
    lr_fn: optax.Schedule,
    image_size: int,
    mesh: Mesh,
    crop_scale: tuple[float, float] = (0.08, 1.0),
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted teacher step ``(state, batch) -> (state, metrics)`` on ``mesh``; state donated.

    ``batch`` holds ``images`` uint8 (B, S, S, 3), ``sizes`` and ``extents`` int32 (B, 2), ``labels``
    uint8 (B, K), split over 'data' (:class:`apjax.data.pipeline.TrainBatches`). Metrics (``loss``,
    ``lr``) stay on the device. ``crop_scale`` is the RandomResizedCrop area range.
    """

    def step(state: TrainState, batch: Mapping[str, jax.Array]):
        aug_key, dropout_key = step_keys(state, 2)
        x = train_augment(
            aug_key, batch["images"], batch["sizes"], batch["extents"], image_size, model.dtype, crop_scale
        )
        labels = batch["labels"].astype(jnp.float32)

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                x,
                train=True,
                rngs={"dropout": dropout_key},
                mutable=["batch_stats"],
            )
            return bce_loss(logits, labels), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return apply_gradients(state, tx, grads, batch_stats), {"loss": loss, "lr": lr_fn(state.step)}

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(replicated, batch_sharding(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


def build(
    config: ml_collections.ConfigDict, num_classes: int, mesh: Mesh, lr_fn: optax.Schedule, workdir: Path
) -> Task:
    """The teacher's :class:`Task`: BCE training from ``config.seed`` (and ``config.init_from``)."""
    del workdir  # the teacher writes nothing beside the loop's files
    model = build_model(config, num_classes)
    tx = create_optimizer(config, lr_fn)
    step = make_train_step(
        model, tx, lr_fn, config.data.image_size, mesh, crop_scale=tuple(config.data.crop_scale)
    )
    eval_step = evaluation.make_eval_step(model, config.data.image_size, mesh)
    eval_bs = max(config.batch_size, mesh.devices.size)
    return Task(
        init_state=lambda: create_train_state(config, model, tx),
        abstract_init=lambda sharding: abstract_train_state(config, model, tx, sharding),
        train_step=step,
        evaluate=lambda state, cache: evaluation.evaluate(
            eval_step, state.params, state.batch_stats, cache, eval_bs, mesh
        ),
        figure=MapGrid(model, config.data.image_size),  # Grad-CAM at the model's gradcam_tap
    )
