"""The stages of a sweep and what they left on disk: what the sweep (:mod:`apjax.experiment`) runs and the
report (:mod:`apjax.report`) reads."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import ml_collections


@dataclasses.dataclass
class Stage:
    """One step of a sweep.

    Attributes:
      name: the stage's workdir name under the sweep's root (and its name in ``config.only``).
      kind: a training task (``teacher``, ``distill``, ``prune_unstructured``, ``prune_structured``,
        ``quantize``), ``eval``, ``eval_methods`` or ``report``.
      method: the compression method (``kd``/``naive``, ``ewa``, ``swa``, ``sswa``), or ''.
      student: the student size (``x2``, ``x4``, ``x8``) of a distillation stage, or ''.
      config: the training config of a training stage (None otherwise).
      bits: the quantization scheme (``int8``, ``int4w``) of a quantization stage, or ''.
    """

    name: str
    kind: str
    method: str = ""
    student: str = ""
    config: ml_collections.ConfigDict | None = None
    bits: str = ""


def smallest_student(students) -> str | None:
    """The student with the largest width divisor (``x8`` of ``x2, x4, x8``), or None without students."""
    return max(students, key=lambda x: int(x.lstrip("x")), default=None)


def is_finished(root: Path, stage: Stage) -> bool:
    """A training stage is finished when its ``final_metrics.json`` exists."""
    return (root / stage.name / "final_metrics.json").exists()


def stage_results(root: Path, stages: list[Stage]) -> dict[str, dict]:
    """What the report reads: each finished training stage's final metrics and both eval reports."""
    out: dict[str, Any] = {"final": {}, "eval": None, "eval_methods": None}
    for s in stages:
        if s.config is not None and is_finished(root, s):
            out["final"][s.name] = json.loads((root / s.name / "final_metrics.json").read_text())
    for name in ("eval", "eval_methods"):
        path = root / name / "localization.json"
        if path.exists():
            out[name] = json.loads(path.read_text())
    return out
