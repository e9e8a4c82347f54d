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
      seed: the seed offset of a training stage (``config.seeds``): its config's ``seed`` is the stage
        config's own plus this; offset 0 keeps the plain name, offset k adds ``@s<k>`` (:func:`seed_name`).
    """

    name: str
    kind: str
    method: str = ""
    student: str = ""
    config: ml_collections.ConfigDict | None = None
    bits: str = ""
    seed: int = 0

    @property
    def base(self) -> str:
        """The name without its seed suffix: the row of the report's tables this run counts in."""
        return base_name(self.name)


SEED_MARK = "@s"


def seed_name(base: str, seed: int) -> str:
    """A training stage's name (and workdir) at seed offset ``seed``: ``base`` for 0 (where a sweep
    without seeds keeps it), ``<base>@s<seed>`` otherwise."""
    return base if seed == 0 else f"{base}{SEED_MARK}{seed}"


def base_name(name: str) -> str:
    return name.split(SEED_MARK, 1)[0]


def eval_dir(root: Path, name: str, seed: int) -> Path:
    """Where an evaluation stage writes the report of the runs distilled from the teacher at seed offset
    ``seed``: ``<root>/<name>`` for 0 (a single, shared teacher included), ``<root>/<name>/s<seed>``
    otherwise (``config.teacher_per_seed``: Cos and l2 compare each student with its own seed's teacher)."""
    return root / name if seed == 0 else root / name / f"s{seed}"


def smallest_student(students) -> str | None:
    """The student with the largest width divisor (``x8`` of ``x2, x4, x8``), or None without students."""
    return max(students, key=lambda x: int(x.lstrip("x")), default=None)


def is_finished(root: Path, stage: Stage) -> bool:
    """A training stage is finished when its ``final_metrics.json`` exists."""
    return (root / stage.name / "final_metrics.json").exists()


def stage_results(root: Path, stages: list[Stage]) -> dict[str, dict]:
    """What the report reads: each finished training stage's final metrics and both eval reports (the
    reports of every teacher's group merged, :func:`eval_dir`)."""
    out: dict[str, Any] = {"final": {}, "eval": None, "eval_methods": None}
    for s in stages:
        if s.config is not None and is_finished(root, s):
            out["final"][s.name] = json.loads((root / s.name / "final_metrics.json").read_text())
    teacher_seeds = [s.seed for s in stages if s.kind == "teacher"]
    for name in ("eval", "eval_methods"):
        for seed in teacher_seeds:
            path = eval_dir(root, name, seed) / "localization.json"
            if path.exists():
                out[name] = merge_reports(out[name], json.loads(path.read_text()))
    return out


def merge_reports(a: dict | None, b: dict) -> dict:
    """One localisation report of two (a teacher per seed): ``a``'s runs, then ``b``'s; ``a``'s figures."""
    if a is None:
        return b
    return {**a, "runs": {**a["runs"], **b["runs"]}, "run_order": a["run_order"] + b["run_order"]}
