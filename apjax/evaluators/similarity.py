"""Teacher-student map similarity evaluator (SPEC section 7, the paper's Cos and l2): per attribution
method, the cosine similarity and l2 distance of a student's maps to its teacher's on the pairs both
predict, both maps min-max normalised at the input size."""

from __future__ import annotations

from typing import Any

import numpy as np

from apjax.errors import ConfigError
from apjax.evaluators.context import EvalContext, load_run
from apjax.evaluators.localization import Evaluator as LocalizationEvaluator
from apjax.evaluators.pairs import common_pairs, rows_of, similarity_summary


class Evaluator:
    """``run(variables)`` -> ``{'<method>/Cos', '<method>/l2', '<method>/similarity_pairs'}``.

    Config: ``teacher_workdir`` (default: the run's ``config.distill.teacher_workdir``),
    ``teacher_checkpoint`` (best or latest) and :class:`apjax.evaluators.localization.Evaluator`'s options.
    The teacher's maps and pairs are computed once and kept.
    """

    def __init__(
        self, ctx: EvalContext, teacher_workdir: str = "", teacher_checkpoint: str = "best", **options
    ):
        workdir = teacher_workdir or ctx.config.get("distill", {}).get("teacher_workdir", "")
        if not workdir:
            raise ConfigError("the similarity evaluator needs a teacher: set its teacher_workdir.")
        self.teacher = load_run(workdir, teacher_checkpoint)
        self.student = LocalizationEvaluator(ctx, **options)
        self.teacher_loc = LocalizationEvaluator(
            ctx.for_run(self.teacher.config, self.teacher.model), **options
        )
        self._teacher_maps: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _teacher(self, method: str) -> tuple[np.ndarray, np.ndarray]:
        """The teacher's pairs and its maps of all of them (computed once)."""
        if method not in self._teacher_maps:
            variables = self.teacher.variables
            pairs = self.teacher_loc.pairs(variables)
            keep = np.ones(len(pairs), bool)
            _, maps = self.teacher_loc.maps_and_scores(method, variables, pairs, keep)
            self._teacher_maps[method] = (pairs, maps)
        return self._teacher_maps[method]

    def run(self, variables: Any) -> dict[str, float]:
        pairs = self.student.pairs(variables)
        out = {}
        for method in self.student.methods:
            teacher_pairs, teacher_maps = self._teacher(method)
            common = common_pairs(teacher_pairs, pairs)
            _, mine = self.student.maps_and_scores(method, variables, common, np.ones(len(common), bool))
            summary = similarity_summary(mine, teacher_maps[rows_of(teacher_pairs, common)])
            out.update({f"{method}/{k}": v for k, v in summary.items()})
        return out
