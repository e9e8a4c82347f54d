"""The config every task shares: its checks, and what it names (precision, data, classes, model).

Each task checks its own blocks (:mod:`apjax.tasks`); :func:`validate_common` checks the rest and raises
:class:`apjax.errors.ConfigError` with one sentence for the first bad value found.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import ml_collections

from apjax.data import DATASETS, HostCache, check_data_config, class_names, load_cached_split
from apjax.data.pipeline import DeviceCache, TrainBatches, bytes_text
from apjax.data.synthetic import SyntheticConfig
from apjax.errors import ConfigError
from apjax.models import INITS, create_model, family_of
from apjax.models.quantized import quant_bits_of, quantize_model
from apjax.trainer.files import sync_processes

PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Val metrics that may pick the best checkpoint (config.best_metric; higher is better): VOC mAP (sklearn's
# AP), VOC mAP with the devkit's AP, and the reference's criterion, its per-image AP (the paper's "mAP").
BEST_METRICS = ("mAP", "mAP_devkit", "per_image_AP")


def best_metric_of(config: ml_collections.ConfigDict) -> str:
    """The val metric that picks the best checkpoint: ``config.best_metric``, or ``'mAP'`` for a config
    saved before the field existed (those runs were all selected by VOC mAP)."""
    return config.get("best_metric", "mAP")


def validate_common(config: ml_collections.ConfigDict) -> None:
    """Checks what every task reads; raises :class:`ConfigError` (one sentence) for the first bad value."""
    if config.data.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {config.data.dataset!r}; choose one of {list(DATASETS)}.")
    check_data_config(config.data)  # cache_size (0: original resolution) and split_sizes
    create_model(config.model)  # a model of a registered family
    if config.get("model_init", "pytorch_default") not in INITS:
        raise ConfigError(f"unknown config.model_init {config.model_init!r}; choose one of {list(INITS)}.")
    if config.get("from_scratch", False) and config.get("init_from"):
        raise ConfigError("config.from_scratch is True but config.init_from is set; choose one of the two.")
    if config.precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {config.precision!r}; choose one of {list(PRECISIONS)}.")
    if best_metric_of(config) not in BEST_METRICS:
        raise ConfigError(
            f"unknown config.best_metric {config.best_metric!r}; choose one of {list(BEST_METRICS)}."
        )
    if config.optimizer.name != "sgd":
        raise ConfigError(f"unknown optimizer {config.optimizer.name!r}; apjax's recipes use 'sgd'.")
    positive = {
        "batch_size": config.batch_size,
        "num_epochs": config.num_epochs,
        "log_every_steps": config.log_every_steps,
        "eval_every_epochs": config.eval_every_epochs,
        "checkpoint_every_epochs": config.checkpoint_every_epochs,
        "data.image_size": config.data.image_size,
    }
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"config.{name} must be a positive integer, got {value!r}.")
    nonneg = {
        "optimizer.learning_rate": config.optimizer.learning_rate,
        "optimizer.momentum": config.optimizer.momentum,
        "optimizer.weight_decay": config.optimizer.weight_decay,
        "optimizer.clip_norm": config.optimizer.get("clip_norm", 0.0),
        "lr_decay_factor": config.lr_decay_factor,
    }
    for name, value in nonneg.items():
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"config.{name} must be a finite number >= 0, got {value!r}.")
    if not 0 <= config.dropout_rate < 1:
        raise ConfigError(f"config.dropout_rate must be in [0, 1), got {config.dropout_rate!r}.")
    epochs = list(config.lr_decay_epochs)
    if epochs != sorted(epochs) or any(not isinstance(e, int) or e < 1 for e in epochs):
        raise ConfigError(
            f"config.lr_decay_epochs must be increasing positive integers, got {tuple(epochs)}."
        )
    lo, hi = config.data.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"config.data.crop_scale must satisfy 0 < low <= high <= 1, got {(lo, hi)}.")
    if not isinstance(config.get("tensorboard", True), bool):
        raise ConfigError(f"config.tensorboard must be True or False, got {config.tensorboard!r}.")
    if config.data.dataset == "synthetic":
        synthetic_config(config).validate()


def check_model_input(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigError` when ``config.data.image_size`` is too small for ``config.model``."""
    model = create_model(config.model)
    family_of(model).check_input(model, config.data.image_size)


def synthetic_config(config: ml_collections.ConfigDict) -> SyntheticConfig:
    """The generator settings of ``config.data.synthetic`` as a :class:`SyntheticConfig`."""
    fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
    given = dict(config.data.synthetic)
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ConfigError(f"unknown config.data.synthetic fields {unknown}; the fields are {sorted(fields)}.")
    return SyntheticConfig(**given)


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    """The config's model (``config.model``, precision, dropout, init) with ``num_classes`` outputs,
    quantized (:func:`apjax.models.quantized.quantize_model`) when the config has a ``quant`` block: a
    quantized run's workdir rebuilds its quantized model from its ``config.json``."""
    model = create_model(
        config.model,
        num_classes=num_classes,
        dtype=PRECISIONS[config.precision],
        dropout_rate=config.dropout_rate,
        init=config.get("model_init", "pytorch_default"),
    )
    bits = quant_bits_of(config)
    return quantize_model(model, bits) if bits else model


def num_classes_of(config: ml_collections.ConfigDict) -> int:
    """The number of classes of the config's dataset."""
    synthetic = synthetic_config(config) if config.data.dataset == "synthetic" else None
    return len(class_names(config.data.dataset, synthetic))


def load_data(config: ml_collections.ConfigDict, splits=("train", "val")) -> dict[str, HostCache]:
    """Host caches of the config's dataset (the synthetic benchmark is generated on first use)."""
    d = config.data
    synthetic = synthetic_config(config) if d.dataset == "synthetic" else None
    sizes = dict(d.split_sizes) if d.dataset == "synthetic" else None
    data_dir = os.path.expanduser(d.data_dir)

    def load() -> dict[str, HostCache]:
        return {
            s: load_cached_split(d.dataset, s, data_dir, d.cache_size, synthetic=synthetic, split_sizes=sizes)
            for s in splits
        }

    # Several processes sharing one data_dir would generate and cache it at the same time and collide when
    # renaming their finished folders into place: process 0 goes first, the others then find it ready.
    first = load() if jax.process_index() == 0 else None
    sync_processes("apjax: data ready")
    return first if first is not None else load()


def resident_cache(config: ml_collections.ConfigDict, train: HostCache, mesh) -> DeviceCache | None:
    """The training split held in device memory when ``config.data.on_device`` is set, else None."""
    if not config.data.get("on_device", False):
        return None
    resident = DeviceCache(train, mesh)
    if jax.process_index() == 0:
        print(f"Training images held on the devices: {bytes_text(resident.nbytes)} on each device.")
    return resident


def train_batches(
    config: ml_collections.ConfigDict,
    train: HostCache,
    mesh,
    seed: int | None = None,
    resident: DeviceCache | None = None,
) -> TrainBatches:
    """The run's training batches (seed ``config.seed`` unless given), gathered on the devices from
    ``resident`` (see :func:`resident_cache`) when given."""
    seed = config.seed if seed is None else seed
    return TrainBatches(train, config.batch_size, seed=seed, mesh=mesh, resident=resident)
