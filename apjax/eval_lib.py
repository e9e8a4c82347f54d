"""Evaluation runs: a workdir's checkpoint on a split, as a table and a JSON file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from apjax import train_lib
from apjax.data.pipeline import data_mesh

CHECKPOINTS = ("best", "latest")


def load_workdir_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The ``config.json`` a training run saved in ``workdir``."""
    path = Path(workdir).expanduser() / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; pass the --workdir of a training run (it holds config.json)."
        )
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def restore_state(config: ml_collections.ConfigDict, workdir: str | os.PathLike, which: str):
    """(model, state, meta) of the ``which`` ('best' or 'latest') checkpoint of ``workdir``."""
    if which not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoint {which!r}; choose one of {list(CHECKPOINTS)}.")
    model = train_lib.build_model(config, train_lib.num_classes_of(config))
    tx = train_lib.create_optimizer(config, train_lib.create_learning_rate_fn(config, 1))
    abstract = jax.eval_shape(lambda: train_lib.create_train_state(config, model, tx))
    mesh = data_mesh()
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), abstract)
    checkpoints = train_lib.Checkpoints(workdir)
    try:
        manager = checkpoints.best if which == "best" else checkpoints.latest
        try:
            restored = train_lib.Checkpoints.restore(manager, abstract)
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"the {which} checkpoint in {workdir} does not match its config's model "
                f"({config.model}, {train_lib.num_classes_of(config)} classes): {e}"
            ) from e
    finally:
        checkpoints.close()
    if restored is None:
        raise FileNotFoundError(
            f"{workdir} has no {which} checkpoint yet; train first (train.py --workdir {workdir})."
        )
    state, meta = restored
    return model, state, meta


def evaluate_workdir(
    workdir: str | os.PathLike,
    which: str = "best",
    split: str = "val",
    config: ml_collections.ConfigDict | None = None,
) -> dict:
    """Classification metrics of a checkpoint on a split; writes ``eval_<which>_<split>.json``."""
    workdir = Path(workdir).expanduser().absolute()
    config = config or load_workdir_config(workdir)
    if split not in ("train", "val", "segmentation_val"):
        raise ValueError(f"unknown split {split!r}; choose train, val or segmentation_val.")
    model, state, meta = restore_state(config, workdir, which)
    mesh = data_mesh()
    cache = train_lib.load_data(config, splits=(split,))[split]
    eval_step = train_lib.make_eval_step(model, config.data.image_size, mesh)
    bs = max(config.batch_size, mesh.devices.size)
    with jax.set_mesh(mesh):
        metrics = train_lib.evaluate(eval_step, state.params, state.batch_stats, cache, bs, mesh)
    result = {
        "workdir": str(workdir),
        "checkpoint": which,
        "step": int(meta["step"]),
        "split": split,
        **metrics,
    }
    if jax.process_index() == 0:
        train_lib.write_json_atomic(workdir / f"eval_{which}_{split}.json", result)
    return result
