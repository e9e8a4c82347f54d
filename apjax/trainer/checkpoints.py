"""Checkpoints: the latest and the best of a run (Orbax), and restoring a workdir's state from them.

``<workdir>/checkpoints/latest`` (every ``checkpoint_every_epochs``) and ``<workdir>/checkpoints/best``
(best by ``config.best_metric`` on val) each hold the state and a JSON of step, epoch, the criterion's
name and best value. Orbax writes each into a temporary folder and renames it when complete, so a run
killed mid-save resumes from the last complete one. A run of rounds (unstructured pruning) keeps one
such run per round in ``round_XX/`` (:func:`round_dir`), with its pruning masks in the state.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from apjax.data.pipeline import data_mesh
from apjax.errors import ConfigError, MissingFileError
from apjax.trainer.config import build_model, num_classes_of
from apjax.trainer.optim import create_learning_rate_fn, create_optimizer
from apjax.trainer.state import TrainState, abstract_train_state

CHECKPOINTS = ("best", "latest")


@functools.cache
def _save_arrays_whole_on_cpu() -> None:
    """On XLA:CPU, has Orbax save each array whole instead of replica-parallel (its default there).

    Replica-parallel saving splits each replicated array among its devices with op-by-op slices, one
    compile per shape and slice: on 8 CPU devices the first save of a tiny VGG's state took 4.1 s and
    later saves 0.75 s, against 0.3 s each whole (2026-12-03, this repository's 2-core machine). On
    the CPU every device shares the host's memory, so the split buys nothing. GPUs already save whole
    (Orbax's own default); TPUs keep replica-parallel. The checkpoint format is the same either way.
    """
    if jax.default_backend() == "cpu":
        handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


class Checkpoints:
    """The latest and the best (by ``config.best_metric`` on val) checkpoints of a workdir, one each."""

    def __init__(self, workdir: str | os.PathLike):
        _save_arrays_whole_on_cpu()
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
        """Saves ``state`` and ``meta`` (its ``step`` names it) as the latest checkpoint, in background."""
        self._save(self.latest, state, meta)

    def save_best(self, state: TrainState, meta: dict) -> None:
        """Saves ``state`` and ``meta`` as the best checkpoint, replacing the previous best."""
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
        """Waits for the saves in flight and closes both managers."""
        for m in (self.latest, self.best):
            m.wait_until_finished()
            m.close()


def resumed_best(meta: Mapping[str, Any], metric: str) -> float:
    """The best value of ``metric`` so far, from the meta of the latest checkpoint a run resumes from.

    A checkpoint saved before the criterion was recorded holds ``best_mAP`` (its runs chose by VOC mAP);
    with no usable record the next evaluation picks the best checkpoint afresh (-1, below any metric).
    """
    if "best_metric" in meta:
        return float(meta["best_value"]) if meta["best_metric"] == metric else -1.0
    return float(meta.get("best_mAP", -1.0)) if metric == "mAP" else -1.0


def round_dir(workdir: str | os.PathLike, round_index: int) -> Path:
    """The workdir of round ``round_index`` (1-based) of a run of rounds."""
    return Path(workdir) / f"round_{round_index:02d}"


def in_rounds(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config`` describes a run of rounds (``config.prune.rounds``: unstructured pruning), each
    round a run in ``round_XX/`` whose state holds the pruning masks."""
    return bool((config.get("prune") or {}).get("rounds"))


def checkpoint_workdir(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Path:
    """Where a run's checkpoints are: ``workdir`` itself, or for a run of rounds (:func:`in_rounds`) its
    last round that exists."""
    workdir = Path(workdir)
    if in_rounds(config):
        rounds = sorted(p for p in workdir.glob("round_[0-9][0-9]") if p.is_dir())
        if rounds:
            return rounds[-1]
    return workdir


def restore_state(config: ml_collections.ConfigDict, workdir: str | os.PathLike, which: str):
    """(model, state, meta) of the ``which`` ('best' or 'latest') checkpoint of ``workdir``.

    A run of rounds restores its last round's state, with its pruning masks; restoring never reads
    ``config.init_from``: the checkpoint holds the weights.
    """
    if which not in CHECKPOINTS:
        raise ConfigError(f"unknown checkpoint {which!r}; choose one of {list(CHECKPOINTS)}.")
    model = build_model(config, num_classes_of(config))
    tx = create_optimizer(config, create_learning_rate_fn(config, 1))
    replicated = NamedSharding(data_mesh(), PartitionSpec())
    abstract = abstract_train_state(config, model, tx, replicated, masks=in_rounds(config))
    workdir = checkpoint_workdir(config, workdir)
    checkpoints = Checkpoints(workdir)
    try:
        manager = checkpoints.best if which == "best" else checkpoints.latest
        try:
            restored = Checkpoints.restore(manager, abstract)
        except (ValueError, KeyError) as e:
            raise ConfigError(
                f"the {which} checkpoint in {workdir} does not match its config's model "
                f"({config.model}, {num_classes_of(config)} classes): {e}"
            ) from e
    finally:
        checkpoints.close()
    if restored is None:
        raise MissingFileError(
            f"{workdir} has no {which} checkpoint yet; train first (train.py --workdir {workdir})."
        )
    state, meta = restored
    return model, state, meta
