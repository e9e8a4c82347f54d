"""Evaluators of one shape, found by name in one registry (:data:`EVALUATORS`).

Each is a module with an ``Evaluator(ctx, **config)`` class, built from an
:class:`apjax.evaluators.context.EvalContext` (the run's config, model and mesh) and its own config
entries, whose ``run(variables)`` (``{'params', 'batch_stats'}`` of a train state or a restored run)
returns a dict of named numbers:

- ``classification``: mAP, devkit AP, per-image AP, F1, BCE of a split;
- ``localization``: per attribution method, AUC and pointing over the run's pairs;
- ``similarity``: per attribution method, Cos and l2 of the run's maps to a teacher's;
- ``faithfulness``: per attribution method, the deletion and insertion AUC and the MoRF region-perturbation
  AOPC of the run's own maps on its own model.

A training config lists extra evaluators under ``config.evals`` (name -> ConfigDict of the evaluator's
options; ``type`` picks the evaluator when the name is not one, as in big_vision); they run at every
evaluation of the loop beside the task's own (classification), their numbers logged as
``val/<name>/<key>``. This package sits above attribution/, compress/ and trainer/; tasks/ and
:mod:`apjax.evaluation` use it. Adding an evaluator is a module and one line of :data:`EVALUATORS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import ml_collections

from apjax.errors import ConfigError
from apjax.evaluators import classification, faithfulness, localization, similarity
from apjax.evaluators.context import EvalContext

EVALUATORS: dict[str, ModuleType] = {
    "classification": classification,
    "localization": localization,
    "similarity": similarity,
    "faithfulness": faithfulness,
}


def _entries(evals: Mapping | None) -> list[tuple[str, str, dict]]:
    """(name, evaluator type, options) of each entry of a ``config.evals``."""
    out = []
    for name, cfg in dict(evals or {}).items():
        options = dict(cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg or {})
        kind = options.pop("type", name)
        if kind not in EVALUATORS:
            raise ConfigError(
                f"config.evals.{name} names no evaluator {kind!r}; choose one of {list(EVALUATORS)}."
            )
        out.append((name, kind, options))
    return out


def validate(evals: Mapping | None) -> None:
    """Raises :class:`ConfigError` (one sentence) for an entry of ``config.evals`` naming no evaluator."""
    _entries(evals)


def create(kind: str, ctx: EvalContext, **options) -> Any:
    """The evaluator ``kind`` (a name of :data:`EVALUATORS`) built on ``ctx`` with ``options``."""
    if kind not in EVALUATORS:
        raise ConfigError(f"unknown evaluator {kind!r}; choose one of {list(EVALUATORS)}.")
    try:
        return EVALUATORS[kind].Evaluator(ctx, **options)
    except TypeError as e:  # an option the evaluator does not take
        raise ConfigError(f"evaluator {kind!r}: {e}; see apjax.evaluators.{kind}.Evaluator.") from e


def from_config(evals: Mapping | None, ctx: EvalContext) -> dict[str, Any]:
    """name -> evaluator of every entry of a ``config.evals``."""
    return {name: create(kind, ctx, **options) for name, kind, options in _entries(evals)}


def run_all(evaluators: Mapping[str, Any], variables: Any) -> dict[str, float]:
    """``{'<name>/<key>': value}`` of every evaluator run on ``variables``."""
    out = {}
    for name, ev in evaluators.items():
        out.update({f"{name}/{k}": v for k, v in ev.run(variables).items()})
    return out


def with_evals(task: Any, config: ml_collections.ConfigDict, model: Any, mesh: Any, data: dict) -> Any:
    """``task`` (a :class:`apjax.trainer.loop.Task`) whose evaluation also runs ``config.evals`` on the
    evaluated state's weights; the task itself when there are none."""
    evals = config.get("evals")
    if not evals:
        return task
    evaluators = from_config(evals, EvalContext(config, model, mesh, dict(data)))
    own: Callable = task.evaluate

    def evaluate(state, cache):
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return {**own(state, cache), **run_all(evaluators, variables)}

    return dataclasses.replace(task, evaluate=evaluate)


__all__ = ["EVALUATORS", "EvalContext", "create", "from_config", "run_all", "validate", "with_evals"]
