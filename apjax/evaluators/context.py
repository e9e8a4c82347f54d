"""What an evaluator is built with and runs on: the run's config, model and mesh (:class:`EvalContext`), and
a trained run restored for evaluation (:class:`EvalRun`)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from jax.sharding import Mesh

from apjax.data import HostCache
from apjax.data.pipeline import eval_masks
from apjax.trainer.checkpoints import restore_state
from apjax.trainer.config import load_data, num_classes_of
from apjax.trainer.files import load_workdir_config


@dataclasses.dataclass
class EvalContext:
    """The run an evaluator evaluates: its ``config`` (data block, batch size), ``model`` and ``mesh``.

    ``data`` holds the splits already loaded (a training run's train and val); others are loaded on first
    use. :meth:`for_run` gives another model a context sharing the same splits and resized masks.
    """

    config: ml_collections.ConfigDict
    model: Any
    mesh: Mesh
    data: dict[str, HostCache] = dataclasses.field(default_factory=dict)
    _masks: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return int(self.config.data.image_size)

    @property
    def num_classes(self) -> int:
        return int(num_classes_of(self.config))

    def cache(self, split: str) -> HostCache:
        """The split's host cache (loaded once)."""
        if split not in self.data:
            self.data.update(load_data(self.config, splits=(split,)))
        return self.data[split]

    def masks(self, split: str) -> np.ndarray:
        """The split's masks at the input size, uint8 (N, S, S) (resized once)."""
        if split not in self._masks:
            self._masks[split] = eval_masks(self.cache(split), self.image_size)
        return self._masks[split]

    def for_run(self, config: ml_collections.ConfigDict, model: Any) -> EvalContext:
        """A context of another model on the same data (the splits and masks are shared, not copied)."""
        return dataclasses.replace(self, config=config, model=model)


@dataclasses.dataclass
class EvalRun:
    """A trained run for evaluation: its workdir's config, model and eval-mode weights."""

    name: str
    workdir: Path
    config: ml_collections.ConfigDict
    model: Any
    variables: dict
    step: int
    selection: dict = dataclasses.field(default_factory=dict)  # see checkpoint_selection


def checkpoint_selection(meta: dict, which: str) -> dict:
    """What chose a restored checkpoint, from its meta: ``{'checkpoint': 'latest'}``, or for the best
    checkpoint ``{'checkpoint': 'best', 'best_metric': the val metric that picked it, 'best_value': its
    value}``. A best checkpoint saved before the criterion was recorded was picked by VOC mAP."""
    if which != "best":
        return {"checkpoint": which}
    if "best_metric" in meta:
        return {"checkpoint": "best", "best_metric": meta["best_metric"], "best_value": meta["best_value"]}
    return {"checkpoint": "best", "best_metric": "mAP", "best_value": meta.get("mAP")}


def load_run(workdir: str | os.PathLike, which: str = "best") -> EvalRun:
    """A trained run for evaluation: config.json, model and the ``which`` checkpoint's weights."""
    workdir = Path(workdir).expanduser().absolute()
    config = load_workdir_config(workdir)
    model, state, meta = restore_state(config, workdir, which)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    selection = checkpoint_selection(dict(meta), which)
    return EvalRun(workdir.name, workdir, config, model, variables, int(meta["step"]), selection)
