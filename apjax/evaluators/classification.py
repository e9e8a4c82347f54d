"""Classification evaluator: the multi-label metrics of a split (SPEC section 7: mAP, devkit AP, per-image
AP, F1, BCE), from :mod:`apjax.trainer.evaluation`'s eval-mode step on the mesh."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from apjax.errors import ConfigError
from apjax.evaluators.context import EvalContext
from apjax.trainer.evaluation import classification_summary, make_eval_step, predict

SPLITS = ("train", "val", "segmentation_val")


class Evaluator:
    """``run(variables)`` -> :func:`apjax.trainer.evaluation.classification_summary` of ``split``.

    Config: ``split`` (train, val or segmentation_val), ``batch_size`` (images per global batch; 0: the
    run's ``config.batch_size``; at least one per device).
    """

    def __init__(self, ctx: EvalContext, split: str = "val", batch_size: int = 0):
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; choose train, val or segmentation_val.")
        self.ctx, self.split = ctx, split
        self.batch_size = max(batch_size or ctx.config.batch_size, ctx.mesh.devices.size)
        self._step = None

    def logits(self, variables: Any) -> np.ndarray:
        """The split's logits in order, float32 (N, K) on the host."""
        if self._step is None:
            self._step = make_eval_step(self.ctx.model, self.ctx.image_size, self.ctx.mesh)
        cache = self.ctx.cache(self.split)
        with jax.set_mesh(self.ctx.mesh):
            return predict(
                self._step,
                variables["params"],
                variables["batch_stats"],
                cache,
                self.batch_size,
                self.ctx.mesh,
            )

    def run(self, variables: Any) -> dict[str, float]:
        return classification_summary(self.logits(variables), self.ctx.cache(self.split).labels)
