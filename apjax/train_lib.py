"""The trainer: state, optimizer and schedule, jitted steps, evaluation, checkpoints, logging.

One 'data' mesh spans all devices (of all processes): the train state is replicated (``P()``) and each
batch is split along its first axis (``P('data')``); the train step is one ``jax.jit`` with donated
state, so BatchNorm statistics, the loss and the gradients are over the global batch. Augmentation runs
inside the step on the device. Training is addressed by step: the batch of step s and its PRNG keys are
functions of (seed, s) alone, so a resumed run continues exactly where the checkpoint left it.

Checkpoints (Orbax ``CheckpointManager``) live in ``<workdir>/checkpoints/latest`` (every
``checkpoint_every_epochs``) and ``<workdir>/checkpoints/best`` (best by ``config.best_metric`` on val:
VOC mAP by default, the reference's per-image AP in the paper's sweep); each holds the state and a JSON of
step, epoch, the criterion's name and best value. Orbax writes each into a temporary folder and renames it
when complete, so a run killed mid-save resumes from the last complete one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from apjax import metrics as metrics_lib
from apjax.compress.losses import bce_loss
from apjax.data import DATASETS, HostCache, check_data_config, class_names, load_cached_split
from apjax.data.augment import eval_preprocess, train_augment
from apjax.data.pipeline import TrainBatches, batch_sharding, check_batch_size, data_mesh, eval_batches
from apjax.data.synthetic import SyntheticConfig
from apjax.models import INITS, check_input_size, create_model, init_variables, variant_widths

TASKS = ("teacher", "distill", "prune_unstructured", "prune_structured")
# The config blocks each task reads beyond the common ones, and the config file that has them.
TASK_BLOCKS = {
    "distill": ("distill",),
    "prune_unstructured": ("distill", "prune"),
    "prune_structured": ("distill", "prune"),
}
TASK_CONFIGS = {
    "teacher": "configs/teacher_vgg16.py",
    "distill": "configs/vgg16_kd.py",
    "prune_unstructured": "configs/prune_unstructured.py",
    "prune_structured": "configs/prune_structured.py",
}
# Errors that are the user's to fix (bad config, missing files...): the command lines print their one
# sentence instead of a traceback.
USER_ERRORS = (ValueError, KeyError, OSError, FloatingPointError, ImportError)
PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Config fields that may change when a run is resumed in the same workdir.
RESUMABLE_CHANGES = (
    "num_epochs",
    "log_every_steps",
    "eval_every_epochs",
    "checkpoint_every_epochs",
    "data.data_dir",
    "distributed",
)
# Config fields added after runs were saved, with the value those runs had: a config (saved or new)
# without one is compared as if it held that value, so older workdirs still resume.
ADDED_FIELDS = {
    "best_metric": "mAP",
    "model_init": "torchvision",
    "from_scratch": False,
    "distill.kd_log_eps": 0.0,
}


# ------------------------------------------------------------------------------------------------
# Config checks.
# ------------------------------------------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` with one sentence for the first bad value found."""
    if config.task not in TASKS:
        raise ValueError(f"unknown task {config.task!r}; choose one of {list(TASKS)}.")
    for block in TASK_BLOCKS.get(config.task, ()):
        if block not in config:
            raise ValueError(
                f"task {config.task!r} needs a config.{block} block; start from {TASK_CONFIGS[config.task]}."
            )
    if config.data.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {config.data.dataset!r}; choose one of {list(DATASETS)}.")
    check_data_config(config.data)  # cache_size (0: original resolution) and split_sizes
    variant_widths(config.model)  # a named variant or a widths list
    if config.get("model_init", "pytorch_default") not in INITS:
        raise ValueError(f"unknown config.model_init {config.model_init!r}; choose one of {list(INITS)}.")
    if config.task == "teacher" and config.data.dataset == "voc":
        if not config.get("init_from") and not config.get("from_scratch", False):
            raise ValueError(
                "the paper's VOC teacher starts from torchvision's ImageNet vgg16_bn weights: pass "
                "--config.init_from=/path/to/vgg16_bn.pth (or .npz; in the sweep "
                "--config.teacher.init_from), or --config.from_scratch=True to train it from scratch."
            )
    if config.get("from_scratch", False) and config.get("init_from"):
        raise ValueError("config.from_scratch is True but config.init_from is set; choose one of the two.")
    if config.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {config.precision!r}; choose one of {list(PRECISIONS)}.")
    if best_metric_of(config) not in BEST_METRICS:
        raise ValueError(
            f"unknown config.best_metric {config.best_metric!r}; choose one of {list(BEST_METRICS)}."
        )
    if config.optimizer.name != "sgd":
        raise ValueError(f"unknown optimizer {config.optimizer.name!r}; apjax's recipes use 'sgd'.")
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
            raise ValueError(f"config.{name} must be a positive integer, got {value!r}.")
    nonneg = {
        "optimizer.learning_rate": config.optimizer.learning_rate,
        "optimizer.momentum": config.optimizer.momentum,
        "optimizer.weight_decay": config.optimizer.weight_decay,
        "lr_decay_factor": config.lr_decay_factor,
    }
    for name, value in nonneg.items():
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"config.{name} must be a finite number >= 0, got {value!r}.")
    if not 0 <= config.dropout_rate < 1:
        raise ValueError(f"config.dropout_rate must be in [0, 1), got {config.dropout_rate!r}.")
    epochs = list(config.lr_decay_epochs)
    if epochs != sorted(epochs) or any(not isinstance(e, int) or e < 1 for e in epochs):
        raise ValueError(f"config.lr_decay_epochs must be increasing positive integers, got {tuple(epochs)}.")
    lo, hi = config.data.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"config.data.crop_scale must satisfy 0 < low <= high <= 1, got {(lo, hi)}.")
    if config.data.dataset == "synthetic":
        synthetic_config(config).validate()
    if config.task == "distill":
        from apjax.compress.distill import validate_distill_config

        validate_distill_config(config)
    if config.task.startswith("prune_"):
        from apjax.compress.prune import validate_prune_config

        validate_prune_config(config)
    check_input_size(create_model(config.model).widths, config.data.image_size)


def synthetic_config(config: ml_collections.ConfigDict) -> SyntheticConfig:
    """The generator settings of ``config.data.synthetic`` as a :class:`SyntheticConfig`."""
    fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
    given = dict(config.data.synthetic)
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ValueError(f"unknown config.data.synthetic fields {unknown}; the fields are {sorted(fields)}.")
    return SyntheticConfig(**given)


# ------------------------------------------------------------------------------------------------
# State, optimizer, schedule.
# ------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes.

    Attributes:
      step: int32 scalar, the number of steps taken.
      params: model parameters (float32).
      batch_stats: BatchNorm running statistics.
      opt_state: optimizer state.
      rng: uint32 key data (``jax.random.key_data``) of the run's base key; the key of step s is
        ``fold_in(key, s)``.
      masks: unstructured pruning masks, conv name -> bool array of that conv's kernel shape (True =
        kept); every update keeps the masked weights at exactly zero. Empty (``{}``) when not pruning.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    masks: Any = flax.struct.field(default_factory=dict)


def epochs_to_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> dict[str, Any]:
    """Every epoch-based duration of ``config`` in steps: the one place where epochs become steps.

    Returns ``{'total': num_epochs * steps_per_epoch, 'lr_decay': [e * steps_per_epoch, ...]}``; the
    learning rate drops at the first step of each decay epoch, as torch's MultiStepLR stepped once per
    epoch does.
    """
    return {
        "total": int(config.num_epochs) * steps_per_epoch,
        "lr_decay": [int(e) * steps_per_epoch for e in config.lr_decay_epochs],
    }


def create_learning_rate_fn(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Piecewise-constant learning rate: ``lr * factor**(number of decay epochs <= epoch of step)``."""
    steps = epochs_to_steps(config, steps_per_epoch)["lr_decay"]
    boundaries = {b: config.lr_decay_factor for b in steps}
    return optax.piecewise_constant_schedule(config.optimizer.learning_rate, boundaries)


def create_optimizer(
    config: ml_collections.ConfigDict, lr_fn: optax.Schedule
) -> optax.GradientTransformation:
    """SGD as torch does it: weight decay added to the gradient, then (optional) momentum."""
    o = config.optimizer
    return optax.chain(
        optax.add_decayed_weights(o.weight_decay),
        optax.sgd(lr_fn, momentum=o.momentum or None, nesterov=o.nesterov),
    )


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    return create_model(
        config.model,
        num_classes=num_classes,
        dtype=PRECISIONS[config.precision],
        dropout_rate=config.dropout_rate,
        init=config.get("model_init", "pytorch_default"),
    )


def create_train_state(
    config: ml_collections.ConfigDict, model, tx: optax.GradientTransformation, *, pretrained: bool = True
) -> TrainState:
    """A fresh state from ``config.seed``, with ``config.init_from``'s torchvision weights if set.

    ``pretrained=False`` never reads ``init_from``: the state a checkpoint is restored into (its shapes
    are the same), which may also be built under ``jax.eval_shape`` (see :func:`abstract_train_state`).
    """
    key = jax.random.key(config.seed)
    init_key, run_key = jax.random.split(key)
    variables = init_variables(model, init_key, config.data.image_size)
    if pretrained and config.get("init_from"):
        from apjax.models.torch_import import import_torchvision_vgg_bn, load_state_dict

        variables = import_torchvision_vgg_bn(
            load_state_dict(os.path.expanduser(config.init_from)), variables, model.widths
        )
    masks = {}
    if config.task == "prune_unstructured":
        from apjax.compress.unstructured import all_kept_masks

        masks = all_kept_masks(variables["params"])
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        rng=jax.random.key_data(run_key),
        masks=masks,
    )


def abstract_train_state(
    config: ml_collections.ConfigDict, model, tx: optax.GradientTransformation, sharding=None
) -> TrainState:
    """Shapes and dtypes of the state (``jax.ShapeDtypeStruct`` leaves, with ``sharding`` if given): what a
    checkpoint is restored into. Computes nothing and reads no weight file."""
    abstract = jax.eval_shape(lambda: create_train_state(config, model, tx, pretrained=False))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract)


# ------------------------------------------------------------------------------------------------
# Steps.
# ------------------------------------------------------------------------------------------------


def step_keys(state: TrainState, n: int) -> jax.Array:
    """``n`` PRNG keys for the step ``state.step``: a function of the run's key and the step alone."""
    return jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step), n)


def mask_params(tree: Any, masks: Mapping[str, jax.Array]) -> Any:
    """``tree`` (params or gradients) with the conv kernels zeroed where ``masks`` is False."""
    if not masks:
        return tree
    out = dict(tree)
    for name, m in masks.items():
        out[name] = {**tree[name], "kernel": jnp.where(m, tree[name]["kernel"], 0)}
    return out


def apply_gradients(
    state: TrainState, tx: optax.GradientTransformation, grads: Any, batch_stats: Any
) -> TrainState:
    """The state after one optimizer update with ``grads`` and the new BatchNorm statistics.

    With pruning masks, the gradient is masked before the optimizer (so weight decay and momentum of a
    pruned weight stay zero) and the new weights are masked again: pruned weights stay exactly zero.
    """
    grads = mask_params(grads, state.masks)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(
        step=state.step + 1,
        params=mask_params(optax.apply_updates(state.params, updates), state.masks),
        batch_stats=batch_stats,
        opt_state=opt_state,
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
            (logits, _), updates = model.apply(
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


def make_eval_step(model, image_size: int, mesh: Mesh) -> Callable:
    """The jitted ``(params, batch_stats, images, extents) -> logits (B, K)`` in eval mode.

    ``images`` uint8 (B, S, S, 3) and ``extents`` int32 (B, 2) as in :func:`apjax.data.pipeline.eval_batches`.
    """

    def step(params, batch_stats, images, extents):
        x = eval_preprocess(images, extents, out_size=image_size, dtype=model.dtype)
        logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, x)
        return logits

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(replicated, replicated, batch_sharding(mesh), batch_sharding(mesh)),
        out_shardings=batch_sharding(mesh),
    )


def _to_host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """Whether every leaf of ``tree`` is finite: one boolean scalar."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def sync_processes(name: str) -> None:
    """A barrier across processes (a no-op in a single process): e.g. after process 0 wrote a file."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def valid_rows(x: jax.Array, valid: jax.Array) -> np.ndarray:
    """The rows of a (padded) global eval output flagged by ``valid``, on the host."""
    return _to_host(x)[_to_host(valid)]


def classification_summary(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Every metric of :func:`apjax.metrics.classification_metrics` and the mean BCE: ``mAP`` (VOC mAP,
    sklearn's AP), ``mAP_devkit`` (the VOC devkit's envelope AP), ``per_image_AP`` (the reference's, the
    paper's "mAP"), ``F1`` (probability 0.5), ``F1_logit0.5`` (the reference's, the paper's F1),
    ``skipped_classes`` and ``bce``."""
    labels = np.asarray(labels, np.float32)
    m = metrics_lib.classification_metrics(logits, labels)
    m["bce"] = float(np.mean(optax.sigmoid_binary_cross_entropy(logits, labels)))
    return m


def predict(eval_step: Callable, params, batch_stats, cache: HostCache, batch_size: int, mesh: Mesh):
    """Logits of the whole split in order: float32 (N, K), on the host."""
    out = []
    for batch in eval_batches(cache, batch_size, mesh):
        out.append((eval_step(params, batch_stats, batch["images"], batch["extents"]), batch["valid"]))
    logits = np.concatenate([valid_rows(lg, v) for lg, v in out])
    return logits


def evaluate(eval_step, params, batch_stats, cache: HostCache, batch_size: int, mesh: Mesh) -> dict:
    """Classification metrics of the split (:func:`classification_summary`)."""
    return classification_summary(
        predict(eval_step, params, batch_stats, cache, batch_size, mesh), cache.labels
    )


# ------------------------------------------------------------------------------------------------
# Checkpoints.
# ------------------------------------------------------------------------------------------------


class Checkpoints:
    """The latest and the best (by ``config.best_metric`` on val) checkpoints of a workdir, one each."""

    def __init__(self, workdir: str | os.PathLike):
        root = Path(workdir).absolute() / "checkpoints"

        def options(name: str) -> ocp.CheckpointManagerOptions:
            # Both managers may commit at once (in background threads); in a multi-process run each needs
            # barrier names of its own, or Orbax fails with 'Barrier ... is already ongoing'.
            sync = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=f"apjax_{name}")
            return ocp.CheckpointManagerOptions(max_to_keep=1, create=True, multiprocessing_options=sync)

        self.latest = ocp.CheckpointManager(root / "latest", options=options("latest"))
        self.best = ocp.CheckpointManager(root / "best", options=options("best"))

    @staticmethod
    def _save(manager: ocp.CheckpointManager, state: TrainState, meta: dict) -> None:
        manager.save(
            int(meta["step"]),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        )

    def save_latest(self, state: TrainState, meta: dict) -> None:
        self._save(self.latest, state, meta)

    def save_best(self, state: TrainState, meta: dict) -> None:
        self._save(self.best, state, meta)

    @staticmethod
    def restore(manager: ocp.CheckpointManager, abstract_state: TrainState) -> tuple[TrainState, dict] | None:
        """The newest complete checkpoint of ``manager`` as (state, meta), or None if there is none."""
        step = manager.latest_step()
        if step is None:
            return None
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["meta"])

    def close(self) -> None:
        for m in (self.latest, self.best):
            m.wait_until_finished()
            m.close()


# ------------------------------------------------------------------------------------------------
# Files.
# ------------------------------------------------------------------------------------------------


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file renamed into place (removed if that fails)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Writes JSON to ``path`` through a temporary file renamed into place."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _flat(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def check_resume_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume a workdir whose saved config differs in a field that changes the run."""
    path = workdir / "config.json"
    if not path.exists():
        return
    old = {**ADDED_FIELDS, **_flat(json.loads(path.read_text()))}
    new = {**ADDED_FIELDS, **_flat(json.loads(config.to_json_best_effort()))}
    changed = sorted(
        k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES
    )
    if changed:
        raise ValueError(
            f"{workdir} holds a run with another config (differs in {', '.join(changed)}); "
            "use a new --workdir, or the same config to resume it."
        )


class MetricsLog:
    """Metrics as JSON lines in ``<workdir>/metrics.jsonl`` (process 0 only)."""

    def __init__(self, workdir: Path):
        self.path = workdir / "metrics.jsonl"
        self.enabled = jax.process_index() == 0

    def write(self, **row: Any) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")

    def truncate_after(self, step: int) -> None:
        """Keeps the rows up to ``step`` (and drops a line a crash cut short): called on resume."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", 0) <= step:
                kept.append(line)
        write_text_atomic(self.path, "".join(k + "\n" for k in kept))


def format_table(rows: Mapping[str, Mapping[str, float]], percent: tuple[str, ...] = ()) -> str:
    """A small Markdown table: one row per entry, one column per metric."""
    cols = list(next(iter(rows.values())).keys())
    head = "| split | " + " | ".join(cols) + " |"
    sep = "|---|" + "---|" * len(cols)
    lines = [head, sep]
    for name, r in rows.items():
        cells = [f"{100 * r[c]:.2f}" if c in percent else f"{r[c]:.4g}" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------------


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


def num_classes_of(config: ml_collections.ConfigDict) -> int:
    synthetic = synthetic_config(config) if config.data.dataset == "synthetic" else None
    return len(class_names(config.data.dataset, synthetic))


CLASSIFICATION_PERCENT = ("mAP", "mAP_devkit", "per_image_AP", "F1", "F1_logit0.5")
# Val metrics that may pick the best checkpoint (config.best_metric; higher is better): VOC mAP (sklearn's
# AP), VOC mAP with the devkit's AP, and the reference's criterion, its per-image AP (the paper's "mAP").
BEST_METRICS = ("mAP", "mAP_devkit", "per_image_AP")


def best_metric_of(config: ml_collections.ConfigDict) -> str:
    """The val metric that picks the best checkpoint: ``config.best_metric``, or ``'mAP'`` for a config
    saved before the field existed (those runs were all selected by VOC mAP)."""
    return config.get("best_metric", "mAP")


def resumed_best(meta: Mapping[str, Any], metric: str) -> float:
    """The best value of ``metric`` so far, from the meta of the latest checkpoint a run resumes from.

    A checkpoint saved before the criterion was recorded holds ``best_mAP`` (its runs chose by VOC mAP);
    with no usable record the next evaluation picks the best checkpoint afresh (-1, below any metric).
    """
    if "best_metric" in meta:
        return float(meta["best_value"]) if meta["best_metric"] == metric else -1.0
    return float(meta.get("best_mAP", -1.0)) if metric == "mAP" else -1.0


@dataclasses.dataclass
class Task:
    """What a task (teacher training, distillation, ...) gives the common training loop.

    Attributes:
      init_state: () -> a fresh :class:`TrainState` (not yet on the mesh).
      train_step: (state, batch) -> (state, metrics); jitted, metrics stay on the device. Metrics are
        averaged between log steps; ``loss`` must be among them.
      evaluate: (state, cache) -> dict of floats on a split; must hold the ``config.best_metric`` that picks
        the best checkpoint (:data:`BEST_METRICS`).
      describe: optional (final state) -> dict of extra entries for ``final_metrics.json`` (e.g. the
        parameter counts of a pruned net).
      abstract_init: optional (sharding) -> the state's shapes (``jax.ShapeDtypeStruct`` leaves) to
        restore a checkpoint into, built without computing the initial state (and so without reading a
        weight file); by default the shapes of ``init_state()``.
    """

    init_state: Callable[[], TrainState]
    train_step: Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]
    evaluate: Callable[[TrainState, HostCache], dict[str, float]]
    describe: Callable[[TrainState], dict[str, Any]] | None = None
    abstract_init: Callable[[Any], TrainState] | None = None

    def abstract_state(self, sharding) -> TrainState:
        """What a checkpoint of this task is restored into (see ``abstract_init``)."""
        if self.abstract_init is not None:
            return self.abstract_init(sharding)
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), self.init_state()
        )


def teacher_task(
    config: ml_collections.ConfigDict, num_classes: int, mesh: Mesh, lr_fn: optax.Schedule
) -> Task:
    """Plain multi-label training with BCE (the teacher of the paper)."""
    model = build_model(config, num_classes)
    tx = create_optimizer(config, lr_fn)
    step = make_train_step(
        model, tx, lr_fn, config.data.image_size, mesh, crop_scale=tuple(config.data.crop_scale)
    )
    eval_step = make_eval_step(model, config.data.image_size, mesh)
    eval_bs = max(config.batch_size, mesh.devices.size)
    return Task(
        init_state=lambda: create_train_state(config, model, tx),
        abstract_init=lambda sharding: abstract_train_state(config, model, tx, sharding),
        train_step=step,
        evaluate=lambda state, cache: evaluate(
            eval_step, state.params, state.batch_stats, cache, eval_bs, mesh
        ),
    )


def build_task(config: ml_collections.ConfigDict, num_classes: int, mesh: Mesh, lr_fn, workdir: Path) -> Task:
    """The :class:`Task` of ``config.task`` (``prune_unstructured`` runs through its own rounds)."""
    if config.task == "teacher":
        return teacher_task(config, num_classes, mesh, lr_fn)
    if config.task == "distill":
        from apjax.compress.distill import distill_task

        return distill_task(config, num_classes, mesh, lr_fn)
    if config.task == "prune_structured":
        from apjax.compress.prune import structured_task

        return structured_task(config, num_classes, mesh, lr_fn, workdir)
    raise ValueError(f"task {config.task!r} has no single training run; use train_and_evaluate.")


def prepare_workdir(workdir: Path, config: ml_collections.ConfigDict, check: bool = True) -> None:
    """Creates ``workdir`` (process 0), refuses a different run in it (unless ``check`` is False), and
    saves ``config.json``."""
    if jax.process_index() != 0:
        return
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(
            f"cannot create the workdir {workdir} ({e.strerror}); choose a writable --workdir."
        ) from e
    if not os.access(workdir, os.W_OK):
        raise PermissionError(f"the workdir {workdir} is not writable; choose a writable --workdir.")
    if check:
        check_resume_config(workdir, config)
    write_json_atomic(workdir / "config.json", json.loads(config.to_json_best_effort()))


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
    if config.task == "prune_unstructured":
        from apjax.compress.prune import train_unstructured

        return train_unstructured(config, workdir, data, mesh)
    batches = TrainBatches(data["train"], config.batch_size, seed=config.seed, mesh=mesh)
    lr_fn = create_learning_rate_fn(config, batches.steps_per_epoch)
    task = build_task(config, data["train"].num_classes, mesh, lr_fn, workdir)
    return run_training(config, workdir, task, data, batches, mesh)


def run_training(
    config: ml_collections.ConfigDict,
    workdir: Path,
    task: Task,
    data: Mapping[str, HostCache],
    batches: TrainBatches,
    mesh: Mesh,
    desc: str | None = None,
) -> dict[str, float]:
    """The training loop of one run in a prepared ``workdir``: resume, train, evaluate, checkpoint.

    ``desc`` labels the progress bar (the task's name by default).
    """
    is_main = jax.process_index() == 0
    spe = batches.steps_per_epoch
    total_steps = epochs_to_steps(config, spe)["total"]
    replicated = NamedSharding(mesh, PartitionSpec())
    checkpoints = Checkpoints(workdir)
    metric = best_metric_of(config)  # picks the best checkpoint
    best_value = -1.0
    # A resumed run never rebuilds its initial state (nor reads init_from's weight file again).
    restored = Checkpoints.restore(checkpoints.latest, task.abstract_state(replicated))
    if restored is None:
        state = jax.device_put(task.init_state(), replicated)
    else:
        state, meta = restored
        state = jax.device_put(state, replicated)
        best_value = resumed_best(meta, metric)
        if is_main:
            print(f"Resuming {workdir} from step {int(meta['step'])} (epoch {meta['epoch']}).")

    log = MetricsLog(workdir)
    start = int(jax.device_get(state.step))
    log.truncate_after(start)  # rows a killed run logged after its last checkpoint are logged again
    with jax.set_mesh(mesh):
        label = desc or config.task
        bar = tqdm(total=total_steps, initial=start, disable=not is_main, desc=label, unit="step")
        acc, acc_n, t0, last = None, 0, time.perf_counter(), start
        for step, batch in batches.iterate(start, total_steps):
            state, m = task.train_step(state, batch)
            acc = m if acc is None else jax.tree.map(jnp.add, acc, m)  # stays on the device
            acc_n += 1
            done = step + 1
            if done % config.log_every_steps == 0 or done % spe == 0:
                host = {k: float(v) / acc_n for k, v in jax.device_get(acc).items()}  # the loop's only sync
                if not all(math.isfinite(v) for v in host.values()):
                    bad = ", ".join(f"{k}={v}" for k, v in host.items() if not math.isfinite(v))
                    raise FloatingPointError(
                        f"training became non-finite ({bad}) by step {done}; the last good checkpoint is "
                        f"step {checkpoints.latest.latest_step()} in {workdir / 'checkpoints' / 'latest'} "
                        "(lower the learning rate or check the data)."
                    )
                rate = (done - last) / (time.perf_counter() - t0)
                log.write(step=done, epoch=done / spe, steps_per_s=rate, **host)
                bar.set_postfix(loss=f"{host['loss']:.4f}", lr=f"{host['lr']:.3g}")
                bar.update(done - bar.n)
                acc, acc_n, t0, last = None, 0, time.perf_counter(), done
            if done % spe == 0:
                epoch = done // spe
                # The loss is computed before each update: check the weights themselves before they are
                # evaluated or saved, so that no checkpoint ever holds non-finite parameters.
                if not bool(all_finite(state.params)):
                    raise FloatingPointError(
                        f"the parameters became non-finite by step {done}; the last good checkpoint is "
                        f"step {checkpoints.latest.latest_step()} in {workdir / 'checkpoints' / 'latest'} "
                        "(lower the learning rate or check the data)."
                    )
                if epoch % config.eval_every_epochs == 0 or done == total_steps:
                    val = task.evaluate(state, data["val"])
                    log.write(step=done, epoch=epoch, **{f"val/{k}": v for k, v in val.items()})
                    if val[metric] > best_value:
                        best_value = val[metric]
                        best_meta = {"best_metric": metric, "best_value": best_value, "mAP": val["mAP"]}
                        checkpoints.save_best(state, {"step": done, "epoch": epoch, **best_meta, "val": val})
                    if is_main:
                        line = f"epoch {epoch}: val mAP {100 * val['mAP']:.2f}"
                        if metric != "mAP":
                            line += f", {metric} {100 * val[metric]:.2f}"
                        bar.write(f"{line} (best {metric} {100 * best_value:.2f})")
                if epoch % config.checkpoint_every_epochs == 0 or done == total_steps:
                    # The data position is the step: batches are addressed by step (TrainBatches).
                    meta = {"step": done, "epoch": epoch, "data_position": done}
                    meta.update(best_metric=metric, best_value=best_value)
                    checkpoints.save_latest(state, meta)
        bar.close()

        final = task.evaluate(state, data["val"])
        last_step = int(jax.device_get(state.step))
        rows = {f"val, last (step {last_step})": final}
        best = Checkpoints.restore(checkpoints.best, state)
        checkpoints.close()
        if best is not None:
            rows[f"val, best (step {best[1]['step']})"] = task.evaluate(best[0], data["val"])
    if is_main:
        extra = task.describe(state) if task.describe else {}
        summary = {"step": last_step, "val": final, "rows": rows, **extra}
        write_json_atomic(workdir / "final_metrics.json", summary)
        print(format_table(rows, percent=CLASSIFICATION_PERCENT))
    return final
