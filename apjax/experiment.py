"""The paper's experiment as one sweep: teacher, compression runs, evaluation and a report.

A sweep is a list of stages, each with its own workdir under one root:

- ``teacher``;
- ``kd_<student>_<method>``: distillation into each student size with ``kd``, ``ewa``, ``swa``, ``sswa``,
  or a black-box teacher's method (``bb_gradcam``, ``bb_input_grad``: its stage reads the teacher through
  its logits only, ``distill.teacher_access = 'blackbox'``);
- ``prune_u_<method>`` and ``prune_s_<method>``: unstructured and structured pruning with ``naive``,
  ``ewa``, ``swa``, ``sswa``;
- ``quant_<bits>_<method>``: quantization-aware training of the teacher (``int8``: int8 weights and
  activations; ``int4w``: int4 weights) with ``naive``, ``ewa``, ``swa``, ``sswa``;
- ``eval``: the localisation report (Grad-CAM) of the teacher and every finished run;
- ``eval_methods``: the other attribution methods (the paper's Table 8) on the teacher and the smallest
  student with and without SSWA;
- ``deploy`` (``config.deploy.enabled``; on in the science variant): every finished seed-0 run exported
  (``deploy/exports/<run>``, as ``export.py`` does) and its ``predict`` and ``explain`` timed
  (:mod:`apjax.deploy.latency`) into ``deploy/latency.json``, the report's Deployment table;
- ``report``: ``report.md`` with the paper's tables filled with this sweep's numbers (and on VOC the
  paper's beside the same quantities: its mAP beside the reference's per-image AP, its F1 beside F1 at
  logit >= 0.5), the val metric that chose each run's checkpoint, plots of AUC and similarity against
  parameter count, and the figures.

Seeds: ``config.seeds`` lists seed offsets (default ``(0,)``, the sweep as before). Every training stage
runs once per offset k, its config's ``seed`` plus k, in the workdir ``<stage>`` for k = 0 (where a sweep
without seeds has it, so it resumes) and ``<stage>@s<k>`` otherwise (``kd_x2_sswa@s1``). One teacher
(offset 0) serves every seed's students unless ``config.teacher_per_seed``: then each offset has its own
teacher (``teacher@s<k>``) and its students distill from it, and the evaluations compare each student's
maps with its own seed's teacher (``<eval>/s<k>/``). The report's tables show each number's mean over the
seeds with its 95% Student t interval, and paired differences (a method minus KD or naive, same seed).

A training stage whose ``final_metrics.json`` exists is skipped, an unfinished one resumes from its last
checkpoint, so an interrupted sweep continues when the command is run again. An evaluation stage is
skipped when its report already covers the same finished runs (and was written in the current layout,
``evaluation.REPORT_FORMAT``). ``config.only`` (comma-separated glob
patterns over stage names, e.g. ``teacher,kd_x8_*``) runs a subset; ``eval`` and ``report`` then cover
whatever runs are finished.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import jax
import ml_collections

from apjax import evaluation
from apjax.attribution.methods import check_methods, method_options
from apjax.compress.matching import is_blackbox
from apjax.errors import ConfigError
from apjax.evaluators.faithfulness import check_faithfulness
from apjax.models import family_of
from apjax.report import write_report
from apjax.report_deploy import LATENCY_FILE
from apjax.stages import Stage, eval_dir, is_finished, seed_name, smallest_student
from apjax.tasks import TASKS, train_and_evaluate, validate_config
from apjax.trainer.files import prepare_workdir, sync_processes, write_json_atomic

TRAIN_KINDS = tuple(TASKS)  # the training stages' kinds: every registered task
PRUNE_PREFIX = {"prune_unstructured": "prune_u", "prune_structured": "prune_s"}


def student_model(teacher_model: str, student: str) -> str:
    """The ``config.model`` of a student: the teacher's with every width divided by the size factor (``x8``
    -> every width // 8), in the teacher's family (a VGG widths list, ``resnet18/8``)."""
    return family_of(teacher_model).student(teacher_model, int(student.lstrip("x")))


def _stage_config(template: ml_collections.ConfigDict, sweep: ml_collections.ConfigDict) -> Any:
    c = ml_collections.ConfigDict(copy.deepcopy(template.to_dict()))
    c.data = ml_collections.ConfigDict(copy.deepcopy(sweep.data.to_dict()))
    c.distributed = sweep.distributed
    return c


def seed_offsets(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """``config.seeds``: distinct non-negative seed offsets, (0,) when unset."""
    seeds = tuple(config.get("seeds", None) or (0,))
    valid = all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in seeds)
    if not valid or len(set(seeds)) < len(seeds):
        raise ConfigError(f"config.seeds must be distinct non-negative integers (offsets), got {seeds}.")
    return seeds


def _seeded(stage: Stage, seed: int) -> Stage:
    """``stage`` at seed offset ``seed``: its name gets ``@s<seed>`` (none for 0), its config's seed grows."""
    stage.name, stage.seed = seed_name(stage.name, seed), seed
    stage.config.seed = stage.config.seed + seed
    return stage


def _compression_stages(config: ml_collections.ConfigDict, teacher_model: str, teacher_dir: str) -> list:
    """The distillation, pruning and quantization stages of one seed, from the teacher in ``teacher_dir``."""
    stages = []
    for student in config.students:
        for method in config.kd_methods:
            c = _stage_config(config.kd, config)
            c.model = student_model(teacher_model, student)
            c.distill.method, c.distill.teacher_workdir = method, teacher_dir
            if is_blackbox(method):
                c.distill.teacher_access = "blackbox"  # its teacher answers with logits only
            stages.append(Stage(f"kd_{student}_{method}", "distill", method, student, c))
    for kind in config.prune_kinds:
        task = f"prune_{kind}"
        for method in config.prune_methods:
            c = _stage_config(config[task], config)
            c.model = teacher_model
            c.distill.method, c.distill.teacher_workdir = method, teacher_dir
            stages.append(Stage(f"{PRUNE_PREFIX[task]}_{method}", task, method, config=c))
    for bits in config.get("quant_bits", ()):
        for method in config.quant_methods:
            c = _stage_config(config.quantize, config)
            c.model, c.quant.bits, c.quant.source_workdir = teacher_model, bits, ""  # the teacher itself
            c.distill.method, c.distill.teacher_workdir = method, teacher_dir
            stages.append(Stage(f"quant_{bits}_{method}", "quantize", method, config=c, bits=bits))
    return stages


def plan(config: ml_collections.ConfigDict, root: Path) -> list[Stage]:
    """Every stage of the sweep ``config`` in order (before ``config.only`` is applied): for each seed
    offset of ``config.seeds``, its teacher (``config.teacher_per_seed``; otherwise one teacher, at offset
    0, for every seed) and the compression stages distilled from it; then the evaluations and the report."""
    per_seed_teacher = bool(config.get("teacher_per_seed", False))
    teacher = _stage_config(config.teacher, config)
    stages = [] if per_seed_teacher else [_seeded(Stage("teacher", "teacher", config=teacher), 0)]
    for seed in seed_offsets(config):
        if per_seed_teacher:
            stages.append(_seeded(Stage("teacher", "teacher", config=copy.deepcopy(teacher)), seed))
        teacher_dir = str(root / seed_name("teacher", seed if per_seed_teacher else 0))
        stages += [_seeded(s, seed) for s in _compression_stages(config, teacher.model, teacher_dir)]
    stages.append(Stage("eval", "eval"))
    if config.table8_methods and config.students:
        stages.append(Stage("eval_methods", "eval_methods"))
    if deploy_settings(config) is not None:
        stages.append(Stage("deploy", "deploy"))
    stages.append(Stage("report", "report"))
    return stages


def validate_sweep(config: ml_collections.ConfigDict, stages: list[Stage]) -> None:
    """Checks every stage's config and the ``only`` patterns before anything runs (one sentence)."""
    for s in stages:
        if s.config is not None:
            try:
                validate_config(s.config)
            except ConfigError as e:
                raise ConfigError(f"stage {s.name}: {e}") from e
    for s in stages:
        cache_dir = s.config.get("distill", {}).get("teacher_cache_dir") if s.config is not None else ""
        if cache_dir and len(seed_offsets(config)) > 1:
            raise ConfigError(
                f"stage {s.name}: one teacher_cache_dir cannot hold the caches of several seeds (each seed "
                "draws its own crops); leave distill.teacher_cache_dir empty (a cache per seed, under the "
                "teacher)."
            )
    check_methods(config.eval_methods, "config.eval_methods")
    check_methods(config.table8_methods, "config.table8_methods")
    method_options(config.get("method_options"))  # a ConfigError names a bad one now, not after training
    check_faithfulness(faithfulness_settings(config), config.data.image_size)
    bad = {k: v for k, v in (deploy_settings(config) or {}).items() if not isinstance(v, int) or v < 1}
    if bad:
        raise ConfigError(f"config.deploy's {bad} must be positive integers (timed calls and batch size).")
    names = [s.name for s in stages]
    for pattern in _patterns(config.only):
        if not fnmatch.filter(names, pattern):
            raise ConfigError(
                f"config.only pattern {pattern!r} matches no stage; the stages are {', '.join(names)}."
            )


def _patterns(only: str) -> list[str]:
    return [p.strip() for p in (only or "").split(",") if p.strip()]


def selected(stages: list[Stage], only: str) -> list[Stage]:
    patterns = _patterns(only)
    if not patterns:
        return stages
    return [s for s in stages if any(fnmatch.fnmatch(s.name, p) for p in patterns)]


# ------------------------------------------------------------------------------------------------
# Running.
# ------------------------------------------------------------------------------------------------


def _log_stage(root: Path, name: str, **entry: Any) -> None:
    """Appends the stage's status and wall time to ``<root>/stages.json`` (process 0)."""
    if jax.process_index() != 0:
        return
    path = root / "stages.json"
    log = json.loads(path.read_text()) if path.exists() else {}
    log[name] = {**log.get(name, {}), **entry}
    write_json_atomic(path, log)


def _eval_groups(root: Path, stages: list[Stage], kind: str, config) -> list[tuple[int, list[Stage]]]:
    """The finished runs an evaluation stage covers, one group per finished teacher (its seed offset,
    the teacher first): every seed's runs with one shared teacher; each seed's with its own."""
    trained = [s for s in stages if s.config is not None and is_finished(root, s)]
    if kind == "eval_methods":
        smallest = smallest_student(config.students)
        trained = [s for s in trained if s.base in ("teacher", f"kd_{smallest}_kd", f"kd_{smallest}_sswa")]
    teachers = [s for s in trained if s.kind == "teacher"]
    if not bool(config.get("teacher_per_seed", False)):
        return [(0, teachers + [s for s in trained if s.kind != "teacher"])] if teachers else []
    return [
        (t.seed, [t] + [s for s in trained if s.kind != "teacher" and s.seed == t.seed]) for t in teachers
    ]


def faithfulness_settings(config) -> dict[str, Any] | None:
    """The eval stage's faithfulness options (``config.faithfulness`` without ``enabled``), or None when
    it is off (the default) or absent."""
    f = config.get("faithfulness")
    if not f or not f.get("enabled"):
        return None
    return {k: v for k, v in dict(f).items() if k != "enabled"}


def deploy_settings(config) -> dict[str, int] | None:
    """The deploy stage's timing settings (``config.deploy`` without ``enabled``), or None when it is off
    (the default) or absent."""
    d = config.get("deploy")
    if not d or not d.get("enabled"):
        return None
    return {k: d[k] for k in ("calls", "batch_calls", "batch_size")}


def _run_deploy(root: Path, stages: list[Stage], config) -> str:
    """Exports and times every finished seed-0 run (the teacher first) unless ``deploy/latency.json``
    already covers the same runs with the same settings and their exports are in place."""
    from apjax.deploy.latency import latency_report, write_latency  # imports the exporter (Orbax)
    from apjax.deploy.load import META_FILE

    if jax.process_count() > 1:
        return (
            "skipped: exporting and timing run in one process; run python -m benchmarks.latency --sweep "
            f"{root} --out {root / LATENCY_FILE}"
        )
    trained = [s for s in stages if s.config is not None and s.seed == 0 and is_finished(root, s)]
    runs = [(s.name, root / s.name) for s in trained]
    if not any(name == "teacher" for name, _ in runs):
        return "skipped: the teacher is not trained yet"
    settings, out = deploy_settings(config), root / LATENCY_FILE
    exports = out.parent / "exports"
    if out.exists():
        previous = json.loads(out.read_text())
        covered = [r["run"] for r in previous.get("rows", [])] == [name for name, _ in runs]
        same = covered and all(previous.get("settings", {}).get(k) == v for k, v in settings.items())
        # ... and its exports all there (a stage stopped while exporting again has deleted them).
        if same and all((exports / name / META_FILE).is_file() for name, _ in runs):
            return "skipped: already covers these runs"
    shutil.rmtree(exports, ignore_errors=True)  # a run trained again is exported again
    log = lambda line: print(f"  {line}", flush=True)  # noqa: E731
    report = latency_report(runs, exports, **settings, command=f"sweep {root}: deploy stage", log=log)
    write_latency(report, out)
    return f"exported and timed {len(runs)} runs (exports in {exports})"


def _run_eval(root: Path, stage: Stage, stages: list[Stage], config) -> str:
    groups = _eval_groups(root, stages, stage.kind, config)
    if not groups:
        return "skipped: the teacher is not trained yet"
    methods = tuple(config.eval_methods if stage.kind == "eval" else config.table8_methods)
    options = dict(config.get("method_options") or {})
    faithfulness = faithfulness_settings(config) if stage.kind == "eval" else None
    current = asdict(method_options(options))  # a report from before they were recorded had the defaults
    evaluated = 0
    for seed, runs in groups:
        out = eval_dir(root, stage.name, seed)
        done = out / "localization.json"
        names = [r.name for r in runs]
        if done.exists():
            previous = json.loads(done.read_text())
            same = previous.get("run_order") == names and previous["methods"] == list(methods)
            same = same and previous.get("method_options", current) == current
            same = same and previous.get("faithfulness") == faithfulness
            if same and previous.get("format") == evaluation.REPORT_FORMAT:
                continue
        evaluation.localization_report(
            [root / n for n in names],
            methods=methods,
            out_dir=out,
            batch_size=config.eval_batch_size,
            figure_images=config.figure_images,
            method_options=options,
            faithfulness=faithfulness,
        )
        evaluated += len(names)
    return f"evaluated {evaluated} runs" if evaluated else "skipped: already covers these runs"


def run_sweep(config: ml_collections.ConfigDict, root: str | os.PathLike) -> Path:
    """Runs the selected stages of the sweep under ``root``; returns the report's path."""
    root = Path(root).expanduser().absolute()
    stages = plan(config, root)
    validate_sweep(config, stages)
    # The sweep's config may grow (more stages) between invocations: each stage guards its own workdir.
    prepare_workdir(root, config, check=False)
    chosen = selected(stages, config.only)
    is_main = jax.process_index() == 0
    report = root / "report.md"
    for i, stage in enumerate(chosen, 1):
        if is_main:
            print(f"[{i}/{len(chosen)}] {stage.name}", flush=True)
        t0 = time.perf_counter()
        if stage.config is not None:
            if is_finished(root, stage):
                if is_main:
                    print(f"  finished earlier ({root / stage.name}); skipping it.")
                continue
            train_and_evaluate(stage.config, root / stage.name)
            status = "trained"
        elif stage.kind in ("eval", "eval_methods", "deploy"):
            if stage.kind == "deploy":
                status = _run_deploy(root, stages, config)  # one process: exporting restores checkpoints
            else:
                status = _run_eval(root, stage, stages, config)
            if is_main:
                print(f"  {status}")
            if status.startswith("skipped"):
                continue  # the stage log keeps the run that did the work
        else:
            if is_main:
                write_report(config, root, stages)
                print(f"  written to {report}")
            status = "written"
        _log_stage(root, stage.name, status=status, seconds=round(time.perf_counter() - t0, 1))
        sync_processes(f"apjax stage {stage.name}")
    return report
