"""Evaluation of trained runs, at the level of workdirs: classification of a checkpoint, any registered
evaluator on a checkpoint (:mod:`apjax.evaluators`), and the localisation report (the tables and figures
that ``eval.py`` and the sweep write). The evaluators do the measuring; this module loads the runs, puts
their numbers together and writes the files. It sits above the evaluators and the tasks."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util
from tqdm import tqdm

from apjax import evaluators
from apjax.attribution.methods import check_methods, method_label
from apjax.attribution.overlay import overlay
from apjax.compress.quantize import model_size_bytes
from apjax.compress.unstructured import count_nonzero_params
from apjax.data import class_names
from apjax.data.pipeline import data_mesh
from apjax.errors import ConfigError
from apjax.evaluators import classification
from apjax.evaluators import faithfulness as faithfulness_eval
from apjax.evaluators import localization as loc_eval
from apjax.evaluators.context import EvalContext, EvalRun, checkpoint_selection, load_run
from apjax.evaluators.localization import evaluate_localization
from apjax.evaluators.pairs import common_pairs, rows_of, similarity_summary
from apjax.localization_table import localization_table
from apjax.models import count_params
from apjax.models.quantized import quant_bits_of
from apjax.trainer.checkpoints import restore_state
from apjax.trainer.config import num_classes_of, synthetic_config
from apjax.trainer.files import load_workdir_config, write_json_atomic, write_text_atomic

__all__ = [
    "REPORT_FORMAT",
    "EvalRun",
    "checkpoint_selection",
    "conv_bn_param_count",
    "evaluate_localization",
    "evaluate_workdir",
    "load_run",
    "localization_report",
    "run_evaluators",
]

# The layout of localization.json; a sweep re-evaluates a report written in an older layout.
REPORT_FORMAT = 2


def evaluate_workdir(
    workdir: str | os.PathLike,
    which: str = "best",
    split: str = "val",
    config: ml_collections.ConfigDict | None = None,
) -> dict:
    """Classification metrics of a checkpoint on a split; writes ``eval_<which>_<split>.json``."""
    workdir = Path(workdir).expanduser().absolute()
    config = config or load_workdir_config(workdir)
    if split not in classification.SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose train, val or segmentation_val.")
    model, state, meta = restore_state(config, workdir, which)
    ctx = EvalContext(config, model, data_mesh())
    metrics = classification.Evaluator(ctx, split).run(
        {"params": state.params, "batch_stats": state.batch_stats}
    )
    result = {
        "workdir": str(workdir),
        "checkpoint": which,
        "step": int(meta["step"]),
        "split": split,
        **metrics,
    }
    if jax.process_index() == 0:
        write_json_atomic(workdir / f"eval_{which}_{split}.json", result)
    return result


def run_evaluators(
    workdir: str | os.PathLike,
    names: list[str],
    which: str = "best",
    config: ml_collections.ConfigDict | None = None,
) -> dict:
    """The evaluators ``names`` on a checkpoint, each with the options of the run's ``config.evals.<name>``
    (its defaults when the run has none); writes ``evals_<which>.json``: ``{'<name>/<key>': value}``."""
    workdir = Path(workdir).expanduser().absolute()
    config = config or load_workdir_config(workdir)
    given = dict(config.get("evals") or {})
    evals = ml_collections.ConfigDict({n: given.get(n, {}) for n in names})
    evaluators.validate(evals)
    run = load_run(workdir, which)
    built = evaluators.from_config(evals, EvalContext(config, run.model, data_mesh()))
    numbers = evaluators.run_all(built, run.variables)
    result = {"workdir": str(workdir), "checkpoint": which, "step": run.step, "evals": numbers}
    if jax.process_index() == 0:
        write_json_atomic(workdir / f"evals_{which}.json", result)
    return result


# ------------------------------------------------------------------------------------------------
# The localisation report: attribution maps against the segmentation masks (SPEC section 7).
# ------------------------------------------------------------------------------------------------


def conv_bn_param_count(params: Any) -> int:
    """The paper's #Param for unstructured pruning (SPEC section 6): the NON-ZERO conv kernel weights, plus
    every conv bias and every BatchNorm scale and bias (all counted, zero or not: they are never pruned; BN
    running statistics are not parameters); the Dense head is excluded. VGG16 at conv sparsity 1 - 0.8^15:
    517,578 + 12,672 = 530,250, the paper's 0.53M.

    ``params``: a model's params; every module but the top-level ``head`` counts (a ResNet's convs have no
    bias: its count is the non-zero conv weights plus the BN scales and biases).
    """
    total = 0
    for path, leaf in traverse_util.flatten_dict(dict(params)).items():
        if path[0] == "head":
            continue
        x = np.asarray(jax.device_get(leaf))
        total += int(np.count_nonzero(x)) if path[-1] == "kernel" and x.ndim == 4 else int(x.size)
    return total


def _check_comparable(runs: list[EvalRun]) -> None:
    first = runs[0].config
    for r in runs[1:]:
        c = r.config
        same = (
            c.data.dataset == first.data.dataset
            and c.data.image_size == first.data.image_size
            and num_classes_of(c) == num_classes_of(first)
        )
        if not same:
            raise ConfigError(
                f"{r.workdir} was trained on other data ({c.data.dataset}, {c.data.image_size}px, "
                f"{num_classes_of(c)} classes) than {runs[0].workdir}; compare runs of one dataset."
            )


def _run_entry(r: EvalRun, ctx: EvalContext, batch_size: int) -> dict:
    """A run's report entry without its pairs and methods: val classification, what chose its checkpoint,
    its parameter counts."""
    params = r.variables["params"]
    val = classification.Evaluator(ctx, "val", batch_size).run(r.variables)
    entry = {
        "workdir": str(r.workdir),
        "step": r.step,
        "model": r.config.model,
        "checkpoint": r.selection,
        "params": count_params(params),
        "params_nonzero": count_nonzero_params(params),
        "params_conv_bn": conv_bn_param_count(params),
        # What the model stores, in bytes (quantized kernels at their bits): apjax.compress.quantize.
        "size_bytes": model_size_bytes(r.variables, quant_bits_of(r.config))["size_bytes"],
        "quant_bits": quant_bits_of(r.config),
        "val": val,
    }
    return entry


def _method_numbers(method: str, runs: list[EvalRun], locs: list, pairs: list[np.ndarray], bar) -> list[dict]:
    """One method's numbers for every run: AUC and pointing over its pairs, and for each student Cos and l2
    to the teacher (``runs[0]``) over the pairs both predict. Each run's maps are computed once: the
    teacher's maps of the pairs some student shares are kept for the comparisons."""
    commons = [common_pairs(pairs[0], p) for p in pairs[1:]]
    shared = np.zeros(len(pairs[0]), bool)
    for common in commons:
        shared[rows_of(pairs[0], common)] = True
    teacher, teacher_maps = locs[0].maps_and_scores(method, runs[0].variables, pairs[0], shared, bar.update)
    where = pairs[0][shared]
    out = [teacher]
    for r, ev, p, common in zip(runs[1:], locs[1:], pairs[1:], commons, strict=True):
        keep = np.zeros(len(p), bool)
        keep[rows_of(p, common)] = True
        numbers, maps = ev.maps_and_scores(method, r.variables, p, keep, bar.update)
        mine = maps[rows_of(p[keep], common)]
        numbers.update(similarity_summary(mine, teacher_maps[rows_of(where, common)]))
        out.append(numbers)
    return out


def localization_report(
    workdirs: list[str | os.PathLike],
    methods: tuple[str, ...] = ("gradcam",),
    out_dir: str | os.PathLike | None = None,
    which: str = "best",
    batch_size: int = 32,
    tolerance: float = 0.0,
    figure_images: int = 6,
    ig_steps: int = 32,
    smoothgrad_samples: int = 16,
    method_options: Mapping[str, Any] | None = None,
    faithfulness: Mapping[str, Any] | None = None,
) -> dict:
    """Classification and localisation of a teacher (first workdir) and its students, per method.

    Per run: val classification (:mod:`apjax.evaluators.classification`), what chose its checkpoint, its
    parameter counts (``params``, ``params_nonzero`` head included, ``params_conv_bn`` the paper's count);
    per method on ``segmentation_val``, :mod:`apjax.evaluators.localization`'s numbers over the run's
    pairs (class in the mask AND predicted) and, for each student, Cos and l2 to the teacher's maps on the
    pairs both predict. ``method_options``: other MethodOptions fields; ``faithfulness``: the faithfulness
    evaluator's options, to add ``deletion_auc``, ``insertion_auc`` and ``morf_aopc`` (None: not scored).
    Writes the JSON, ``localization.md`` and ``figures/<method>.png`` to ``out_dir`` (default: the teacher's).
    """
    check_methods(methods)
    runs = [load_run(w, which) for w in workdirs]
    _check_comparable(runs)
    base = EvalContext(runs[0].config, runs[0].model, data_mesh())
    options = dict(methods=methods, tolerance=tolerance, batch_size=batch_size, ig_steps=ig_steps,
                   smoothgrad_samples=smoothgrad_samples, method_options=method_options)  # fmt: skip
    locs = [loc_eval.Evaluator(base.for_run(r.config, r.model), **options) for r in runs]
    results: dict = {
        "runs": {},
        "format": REPORT_FORMAT,
        "run_order": [r.name for r in runs],  # the teacher first (the JSON's keys are sorted)
        "methods": list(methods),
        "tolerance": tolerance,
        "image_size": base.image_size,
        "method_options": dataclasses.asdict(locs[0].options),  # the options every method ran with
    }
    pairs = [ev.pairs(r.variables) for r, ev in zip(runs, locs, strict=True)]
    for r, ev, p in zip(runs, locs, pairs, strict=True):
        results["runs"][r.name] = {**_run_entry(r, ev.ctx, batch_size), "pairs": len(p), "methods": {}}
    total = sum(len(p) for p in pairs) * len(methods)
    bar = tqdm(total=total, desc="localization", unit="pair", disable=jax.process_index() != 0)
    for method in methods:
        for r, numbers in zip(runs, _method_numbers(method, runs, locs, pairs, bar), strict=True):
            results["runs"][r.name]["methods"][method] = numbers
        if figure_images > 0:
            figure = _figure(runs, locs, base, pairs[0], figure_images, method, out_dir)
            results.setdefault("figures", {})[method] = figure
    bar.close()
    if faithfulness is not None:
        _add_faithfulness(results, runs, locs, pairs, dict(faithfulness))
    if jax.process_index() == 0:
        out = Path(out_dir) if out_dir else runs[0].workdir / "localization"
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "localization.json", results)
        table = localization_table(results, {m: method_label(m) for m in methods})
        write_text_atomic(out / "localization.md", table)
    return results


def _add_faithfulness(results: dict, runs, locs, pairs, settings: dict) -> None:
    """Each run's mean deletion and insertion AUC and MoRF AOPC per method
    (:mod:`apjax.evaluators.faithfulness`: its own maps, made with its localisation evaluator's method
    options, on its own model, over its pairs) into its method entries; ``results['faithfulness']`` records
    the settings."""
    for r, loc, p in zip(runs, locs, pairs, strict=True):
        options = dict(batch_size=loc.batch_size, method_options=dataclasses.asdict(loc.options))
        ev = faithfulness_eval.Evaluator(loc.ctx, loc.methods, **options, **settings)
        for method in loc.methods:
            results["runs"][r.name]["methods"][method].update(ev.summary(method, r.variables, p))
    results["faithfulness"] = settings


def _figure_pairs(teacher_pairs: np.ndarray, n: int) -> np.ndarray:
    """The first pair of each of the first ``n`` images among the teacher's pairs, (<= n, 2)."""
    chosen, seen = [], set()
    for i, k in teacher_pairs.tolist():
        if i not in seen:
            chosen.append((i, k))
            seen.add(i)
        if len(chosen) == n:
            break
    return np.asarray(chosen, np.int64).reshape(-1, 2)


def _figure(runs, locs, ctx: EvalContext, teacher_pairs, n, method, out_dir) -> str | None:
    """A PNG per method: for n images, the image, its mask and each run's map for the teacher's class,
    overlaid on the image (a semi-transparent colormap of the min-max scaled map over its RGB pixels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    chosen = _figure_pairs(teacher_pairs, n)
    if not len(chosen):
        return None
    c, size = runs[0].config, ctx.image_size
    seg, masks = ctx.cache("segmentation_val"), ctx.masks("segmentation_val")
    names = class_names(c.data.dataset, synthetic_config(c) if c.data.dataset == "synthetic" else None)
    everything = np.ones(len(chosen), bool)
    maps = {
        r.name: ev.maps_and_scores(method, r.variables, chosen, everything)[1]
        for r, ev in zip(runs, locs, strict=True)
    }
    cols = 2 + len(runs)
    fig, axes = plt.subplots(len(chosen), cols, figsize=(2.2 * cols, 2.2 * len(chosen)), squeeze=False)
    for row, (i, k) in enumerate(chosen.tolist()):
        h, w = seg.extents[i]  # the stored image, never its slot's padding
        stored = Image.fromarray(np.ascontiguousarray(seg.images[i, :h, :w]))
        image = np.asarray(stored.resize((size, size), Image.BILINEAR))
        panels = [
            (image, "image", None),
            ((masks[i] == k + 1).astype(np.float32), f"mask: {names[k]}", "gray"),
        ]
        panels += [(overlay(image, maps[r.name][row]), r.name, None) for r in runs]
        for col, (panel, title, cmap) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(panel, cmap=cmap)
            ax.set_axis_off()
            if row == 0 or col == 1:  # the class changes from row to row
                ax.set_title(title, fontsize=8)
    fig.suptitle(method_label(method))
    fig.tight_layout()
    out = Path(out_dir) if out_dir else runs[0].workdir / "localization"
    path = out / "figures" / f"{method}.png"
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=80)
        os.replace(tmp, path)
    plt.close(fig)
    return str(path)
