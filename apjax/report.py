"""The sweep's report: the paper's tables filled with a sweep's numbers, plots and figures (Markdown).

Every number comes from the stages' JSON files: classification (VOC mAP, the reference's per-image AP, F1
at probability 0.5 and at logit >= 0.5, of the best checkpoint), AUC, pointing accuracy, teacher-student
Cos and l2, parameter counts and what chose each checkpoint from ``eval/localization.json`` (and
``eval_methods/localization.json`` for Table 8). On VOC the paper's value follows ours in parentheses in
the column of the same quantity (SPEC sections 7 and 8): its mAP beside the per-image AP, its F1 beside F1
at logit >= 0.5, its #Param beside the column that counts what it counted.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from apjax.attribution.methods import method_label
from apjax.models.quantized import QUANT_SCHEMES
from apjax.report_deploy import deployment_table
from apjax.report_plots import plot_lines
from apjax.report_seeds import (
    FAITHFULNESS_COLUMNS,
    INTERVAL_NOTE,
    by_base,
    comparisons,
    fmt,
    fmt_params,
    group_metrics,
    method_name,
    method_tables,
    paired_rows,
    paired_tables,
    run_metrics,
    seeds_title,
)
from apjax.report_seeds import table as _table
from apjax.stages import base_name, smallest_student, stage_results
from apjax.stats import finite as _finite
from apjax.trainer.files import write_text_atomic

# The paper's numbers on VOC 2012 (SPEC section 8). Rows: mAP, F1, AUC, Point, Cos, l2 (percent except
# Cos and l2); the paper's mAP is the reference's per-image AP and its F1 thresholds the logit at 0.5.
PAPER_TEACHER = {"params": 15.22e6, "mAP": 91.83, "F1": 78.44, "AUC": 88.79, "Point": 80.21}
PAPER_KD = {
    ("x2", "kd"): (83.75, 65.92, 82.53, 72.01, 0.705, 29.84),
    ("x2", "ewa"): (86.48, 68.19, 85.05, 80.42, 0.788, 21.21),
    ("x2", "swa"): (86.56, 67.78, 88.12, 80.66, 0.873, 12.98),
    ("x2", "sswa"): (86.42, 67.94, 88.89, 81.13, 0.859, 14.36),
    ("x4", "kd"): (81.31, 62.50, 80.61, 68.86, 0.650, 35.52),
    ("x4", "ewa"): (82.46, 63.57, 84.18, 79.34, 0.750, 25.24),
    ("x4", "swa"): (83.67, 65.14, 87.90, 80.05, 0.841, 16.23),
    ("x4", "sswa"): (84.47, 66.13, 88.10, 80.26, 0.837, 16.63),
    ("x8", "kd"): (76.91, 52.51, 78.74, 67.26, 0.563, 44.10),
    ("x8", "ewa"): (79.56, 58.91, 81.99, 78.49, 0.652, 34.90),
    ("x8", "swa"): (80.14, 60.70, 87.88, 79.59, 0.813, 19.04),
    ("x8", "sswa"): (80.86, 61.43, 88.06, 79.12, 0.842, 19.49),
}
PAPER_PRUNE = {
    "prune_u": {
        "naive": (87.42, 70.24, 84.13, 75.43, 0.790, 21.21),
        "ewa": (89.75, 74.83, 86.67, 79.37, 0.895, 10.71),
        "swa": (89.79, 75.11, 88.22, 79.86, 0.913, 8.407),
        "sswa": (89.96, 75.51, 88.45, 79.25, 0.920, 7.826),
    },
    "prune_s": {
        "naive": (83.76, 60.71, 79.98, 75.29, 0.764, 30.04),
        "ewa": (87.62, 66.05, 83.96, 78.84, 0.855, 14.74),
        "swa": (88.39, 67.70, 86.99, 81.65, 0.911, 9.102),
        "sswa": (89.07, 68.28, 88.34, 81.08, 0.910, 9.232),
    },
}
PAPER_PARAMS = {"teacher": 15.22e6, "kd_x8": 0.29e6, "prune_s": 3.27e6, "prune_u": 0.53e6}
# Table 8: AUC / Point of other methods for the teacher, KD VGG16/8 without matching and with SSWA.
PAPER_TABLE8 = {
    "gradcam": ((88.79, 80.21), (78.74, 67.26), (88.06, 79.12)),
    "excitation_bp": ((84.14, 74.80), (76.31, 66.31), (82.31, 71.24)),
    "lrp": ((85.29, 65.48), (79.60, 53.43), (82.46, 64.08)),
    "rap": ((84.54, 69.49), (80.85, 56.87), (83.53, 65.66)),
}
PAPER_FIELDS = ("mAP", "F1", "AUC", "Point", "Cos", "l2")  # the order of the tuples above


# The columns of Tables 2 and 4-7: (header, our key, the paper's field of the same quantity or None). The
# paper's "mAP" is the reference's per-image AP and its F1 thresholds the logit at 0.5 (SPEC section 7):
# its numbers stand beside those columns only; VOC mAP and F1 at probability 0.5 have no paper number.
COLUMNS = (
    ("VOC mAP", "mAP", None),
    ("per-image AP (paper's mAP)", "per_image_AP", "mAP"),
    ("F1 (p > 0.5)", "F1", None),
    ("F1 (logit >= 0.5, paper's F1)", "F1_logit0.5", "F1"),
    ("AUC", "AUC", "AUC"),
    ("Point", "Point", "Point"),
    ("Cos", "Cos", "Cos"),
    ("l2", "l2", "l2"),
)
# What each #Param column counts. The paper counts all parameters for the teacher, the KD students and
# structured pruning (15.22M, 0.29M, 3.27M), but for unstructured pruning only the non-zero conv weights,
# conv biases and BN scale and bias, without the head (0.53M at conv sparsity 1 - 0.8^15; SPEC section 6).
PARAMS_ALL = "#Param (non-zero parameters, head included)"
PARAMS_CONV_BN = "#Param (non-zero conv weights + conv biases + BN, head excluded)"


def _paper(field: str, v: Any) -> str:
    if v is None:
        return ""
    return f" ({v:.3f})" if field == "Cos" else f" ({v:.2f})"


def _metric_cells(m: dict, paper: tuple | None) -> list[str]:
    """The cells of :data:`COLUMNS`, the paper's value in parentheses where it is the same quantity."""
    cells = []
    for _, key, field in COLUMNS:
        p = paper[PAPER_FIELDS.index(field)] if paper and field else None
        cells.append(fmt(key, m.get(key)) + _paper(field, p))
    return cells


def _params_cell(n: Any, paper: float | None) -> str:
    return fmt_params(n) + (f" ({paper / 1e6:.2f}M)" if paper else "")


def _chosen_by(selection: dict | None) -> tuple[str, str]:
    """(criterion, value) cells of the checkpoint a run was evaluated at."""
    if not selection:
        return "-", "-"
    if selection.get("checkpoint") != "best":
        return str(selection.get("checkpoint")), "-"
    metric = selection.get("best_metric", "mAP")
    return f"best val {metric}", fmt(metric, selection.get("best_value"))


def _rows_title(title: str, rows: list[list[str]], n_col: int) -> str:
    return seeds_title(title, [int(r[n_col]) for r in rows])


def _table1(ev: dict, groups: dict, smallest: str | None, voc: bool) -> list[str]:
    """Table 1: the teacher and each compression without matching, and KD with SSWA (AUC, Point)."""
    lines: list[str] = []
    t1 = [("teacher", "Full (teacher)", "teacher")]
    if smallest:
        t1.append((f"kd_{smallest}_kd", f"KD {smallest}", "kd_x8"))
    t1.append(("prune_s_naive", "Structured pruning", "prune_s"))
    t1.append(("prune_u_naive", "Unstructured pruning", "prune_u"))
    if smallest:
        t1.append((f"kd_{smallest}_sswa", f"KD {smallest} + SSWA", "kd_x8"))
    paper1 = {
        "teacher": (88.79, 80.21),
        "kd_x8_kd": (78.74, 67.26),
        "prune_s_naive": (79.98, 75.29),
        "prune_u_naive": (84.13, 75.43),
        "kd_x8_sswa": (88.06, 79.12),
    }
    rows = []
    for name, label, pkey in t1:
        m = _metrics(ev, groups, name)
        if not m:
            continue
        p = paper1.get(name) if voc else None  # the paper's rows are the x8 student's
        # The paper's count stands in the column that counts what it counted.
        paper_params = PAPER_PARAMS[pkey] if p else None
        unstructured = pkey == "prune_u"
        cells = [
            label,
            str(m["n"]),
            _params_cell(m["params_nonzero"], None if unstructured else paper_params),
            _params_cell(m["params_conv_bn"], paper_params if unstructured else None),
        ]
        for k, i in (("AUC", 0), ("Point", 1)):
            cells.append(fmt(k, m.get(k)) + (f" ({p[i]:.2f})" if p else ""))
        rows.append(cells)
    title = "Table 1: compression deforms attribution (Grad-CAM, pairs with correct predictions)"
    lines += [f"## {_rows_title(title, rows, 1)}", ""]
    if rows:
        lines += _table(["model", "n", PARAMS_ALL, PARAMS_CONV_BN, "AUC", "Point"], rows)
        if voc:
            lines += [
                "",
                "The paper's #Param counts all parameters except for unstructured pruning, where it counts "
                "the non-zero conv weights, conv biases and BN without the head (0.53M at conv sparsity "
                "1 - 0.8^15): each paper count stands in the column that counts the same.",
            ]
    else:
        lines.append("(no finished runs yet)")
    lines.append("")

    return lines


def _metrics(ev: dict | None, groups: dict, base: str, method: str = "gradcam") -> dict:
    """The numbers of the row ``base`` over its seeds (:func:`apjax.report_seeds.group_metrics`)."""
    return group_metrics(ev, [s.name for s in groups.get(base, [])], method)


def _table2(ev: dict, groups: dict, voc: bool) -> list[str]:
    """Table 2: the teacher and every distilled student."""
    lines: list[str] = []
    rows = []
    headers = [h for h, _, _ in COLUMNS]
    teacher = _metrics(ev, groups, "teacher")
    teacher_paper = tuple(PAPER_TEACHER.get(f) for f in PAPER_FIELDS) if voc else None
    if teacher:
        paper_params = PAPER_PARAMS["teacher"] if voc else None
        cells = _metric_cells(teacher, teacher_paper)
        n = str(teacher["n"])
        rows.append(["teacher", "-", n, _params_cell(teacher["params_nonzero"], paper_params), *cells])
    for base, (s, *_) in groups.items():
        m = _metrics(ev, groups, base)
        if s.kind != "distill" or not m:
            continue
        p = PAPER_KD.get((s.student, s.method)) if voc else None
        paper_params = PAPER_PARAMS["kd_x8"] if p and s.student == "x8" else None
        cells = [str(m["n"]), _params_cell(m["params_nonzero"], paper_params), *_metric_cells(m, p)]
        rows.append([s.student, method_name(s.method), *cells])
    title = "Table 2: knowledge distillation (Grad-CAM at the last conv; Cos and l2 to the teacher)"
    lines += [f"## {_rows_title(title, rows, 2)}", ""]
    lines += _table(["student", "method", "n", PARAMS_ALL, *headers], rows)
    lines.append("")

    return lines


def _pruning_tables(ev: dict, groups: dict, voc: bool) -> list[str]:
    """Tables 4-5 and 6-7: unstructured and structured pruning, one row per method."""
    lines: list[str] = []
    headers = [h for h, _, _ in COLUMNS]
    pruning = (("prune_u", "Tables 4-5: unstructured pruning"), ("prune_s", "Tables 6-7: structured pruning"))
    for prefix, title in pruning:
        rows = []
        for base, (s, *_) in groups.items():
            m = _metrics(ev, groups, base)
            if not base.startswith(prefix + "_") or not m:
                continue
            p = PAPER_PRUNE[prefix][s.method] if voc else None
            paper_params = PAPER_PARAMS[prefix] if p else None
            if prefix == "prune_u":
                counts = [
                    _params_cell(m["params_nonzero"], None),
                    _params_cell(m["params_conv_bn"], paper_params),
                ]
            else:
                counts = [_params_cell(m["params_nonzero"], paper_params)]
            rows.append([method_name(s.method), str(m["n"]), *counts, *_metric_cells(m, p)])
        if rows:
            count_headers = [PARAMS_ALL, PARAMS_CONV_BN] if prefix == "prune_u" else [PARAMS_ALL]
            lines += [f"## {_rows_title(title, rows, 1)}", ""]
            lines += _table(["method", "n", *count_headers, *headers], rows)
            lines.append("")

    return lines


def _quantization_table(ev: dict, groups: dict) -> list[str]:
    """Quantization: the float teacher and each quantized run, with the bytes each stores."""
    teacher = _metrics(ev, groups, "teacher")
    runs = [(("float32 (teacher)", "-"), teacher)] if teacher else []
    for base, (s, *_) in groups.items():
        if s.kind == "quantize" and _metrics(ev, groups, base):
            runs.append(((QUANT_SCHEMES[s.bits].label, method_name(s.method)), _metrics(ev, groups, base)))
    if len(runs) < 1 + bool(teacher):  # no quantized run
        return []
    base_size = teacher["size_bytes"].mean if teacher and teacher["size_bytes"] else None
    rows = []
    for label, m in runs:
        size = m["size_bytes"].mean if m["size_bytes"] else None
        ratio = f"{100 * size / base_size:.1f}%" if _finite(size) and _finite(base_size) else "-"
        size_cell = f"{round(size):,}" if _finite(size) else "-"
        rows.append([*label, str(m["n"]), size_cell, ratio, *_metric_cells(m, None)])
    header = ["scheme", "method", "n", "size (bytes)", "of the teacher's", *(h for h, _, _ in COLUMNS)]
    title = "Quantization (quantization-aware training of the teacher; not in the paper)"
    lines = [f"## {_rows_title(title, rows, 2)}", ""]
    note = (
        "Size: what the model stores, quantized kernels packed at their bits with a float32 scale per output "
        "channel, every bias, BatchNorm parameter and statistic in float32. Grad-CAM runs through the "
        "quantized net (qwix's straight-through backward pass); Cos and l2 compare with the float teacher."
    )
    return [*lines, *_table(header, rows), "", note, ""]


def _table8(ev8: dict, smallest: str | None, voc: bool) -> list[str]:
    """Table 8: other attribution methods on the teacher and the smallest student without and with SSWA
    (a column pair per run, over its seeds)."""
    if not ev8:
        return []
    bases = list(dict.fromkeys(base_name(n) for n in ev8["run_order"]))
    names = {b: [n for n in ev8["run_order"] if base_name(n) == b] for b in bases}
    rows = []
    for method in ev8["methods"]:
        cells = [method_label(method)]
        for j, b in enumerate(bases):
            m = group_metrics(ev8, names[b], method)
            p = PAPER_TABLE8.get(method, (None,) * 3)[min(j, 2)] if voc and smallest == "x8" else None
            for k, i in (("AUC", 0), ("Point", 1)):
                cells.append(fmt(k, m.get(k)) + (f" ({p[i]:.2f})" if p else ""))
        rows.append(cells)
    header = ["method"] + [f"{b} {k}" for b in bases for k in ("AUC", "Point")]
    title = seeds_title(
        f"Table 8: other attribution methods (teacher, KD {smallest}, KD {smallest} + SSWA)",
        [len(v) for v in names.values()],
    )
    seeds = "; ".join(f"{b}: n = {len(v)}" for b, v in names.items())
    return [f"## {title}", "", *_table(header, rows), "", f"Seeds per run: {seeds}.", ""]


def _faithfulness_tables(ev: dict | None, stages) -> list[str]:
    """Faithfulness: each run's deletion and insertion AUC (its own Grad-CAM maps on its own model) over its
    seeds, and their paired differences against KD / naive on the same seed; none without the numbers."""
    groups = by_base(stages)
    found = {base: _metrics(ev, groups, base) for base in groups}
    found = {base: m for base, m in found.items() if m and m.get("deletion_auc") is not None}
    if not found:
        return []
    # The columns some run has (an evaluation written before MoRF was added has no AOPC).
    columns = [(h, k) for h, k in FAITHFULNESS_COLUMNS if any(m.get(k) is not None for m in found.values())]
    rows = []
    for base, m in found.items():
        s = groups[base][0]
        cells = [fmt(k, m[k]) for _, k in columns]
        rows.append([base, method_name(s.method) if s.method else "-", str(m["n"]), *cells])
    aopc = " and MoRF AOPC" if any(k == "morf_aopc" for _, k in columns) else ""
    title = f"Faithfulness: deletion and insertion AUC{aopc} of each run's own maps"
    title = seeds_title(title, [int(r[2]) for r in rows])
    header = ["run", "method", "n", *(h for h, _ in columns)]
    lines = [f"## {title}", "", *_table(header, rows), ""]
    kd, other = comparisons(stages)
    paired = paired_rows(ev, kd + other, columns)
    if paired:
        header = ["compression", "difference", "n", *(h for h, _ in columns)]
        lines += ["Paired differences (same seed):", "", *_table(header, paired), ""]
    lines += [
        "Deletion removes the pixels in the map's order (highest first) and insertion adds them, the class's "
        "probability read at each step (apjax/evaluators/faithfulness.py); the AUC is the area under that "
        "curve over the fraction of pixels, in percent. MoRF AOPC (region perturbation, Samek et al. 2017) "
        "replaces the map's highest-scoring square regions one by one (with uniform noise by default) and "
        "averages the probability's drop from the image's, in percent. Lower deletion, higher insertion and "
        "higher AOPC: the map ranks first what the run itself relies on. Each run is scored on its own "
        "model, over its own pairs.",
        "",
    ]
    return lines


def _checkpoints_table(ev: dict) -> list[str]:
    """The checkpoints behind the numbers and the val metric that chose each."""
    lines: list[str] = []
    if ev:
        rows = []
        for name in ev.get("run_order", ev["runs"]):
            m = run_metrics(ev, name)
            rows.append([name, str(m["step"]), *_chosen_by(m["checkpoint"])])
        lines += ["## Checkpoints evaluated (the val metric that chose each)", ""]
        lines += _table(["run", "step", "chosen by", "its val value"], rows)
        lines.append("")
    return lines


def tables(config, stages, results: dict, voc: bool) -> list[str]:
    """The Markdown of Tables 1, 2, 4-7 and 8 for the finished stages, and the checkpoints they used."""
    ev, ev8 = results["eval"], results["eval_methods"]
    smallest = smallest_student(config.students)
    groups = by_base(stages)
    return [
        *_table1(ev, groups, smallest, voc),
        *_table2(ev, groups, voc),
        *_pruning_tables(ev, groups, voc),
        *_quantization_table(ev, groups),
        *paired_tables(ev, stages),
        *_faithfulness_tables(ev, stages),
        *method_tables(ev, stages, method_label),
        *_table8(ev8, smallest, voc),
        *_checkpoints_table(ev),
    ]


def plot_against_params(root: Path, stages, results: dict) -> list[str]:
    """``figures/auc_vs_params.png`` and ``figures/cos_vs_params.png``: one line per compression method, a
    point per stage at the mean over its seeds with its 95% t interval as an error bar when n > 1
    (:func:`apjax.report_plots.plot_lines`); returns the written paths relative to ``root``."""
    ev = results["eval"]
    if not ev:
        return []
    points: dict[str, list] = {}
    kinds = {"distill": "KD", "prune_unstructured": "unstructured", "prune_structured": "structured"}
    groups = by_base(stages)
    for base, (s, *_) in groups.items():
        m = _metrics(ev, groups, base)
        if s.kind in kinds and m and m["params_nonzero"]:
            label = f"{kinds[s.kind]}: {method_name(s.method)}"
            points.setdefault(label, []).append((m["params_nonzero"].mean, m["AUC"], m["Cos"]))
    teacher = _metrics(ev, groups, "teacher")
    star = (teacher["params_nonzero"].mean, teacher["AUC"]) if teacher and teacher["params_nonzero"] else None
    return plot_lines(root, points, star)


def write_report(config, root: Path, stages) -> Path:
    """Writes ``<root>/report.md`` (and its plots) from the stages' JSON files; returns its path."""
    results = stage_results(root, stages)
    voc = config.data.dataset == "voc"
    lines = [
        f"# apjax sweep report: {config.variant}",
        "",
        f"Data: {config.data.dataset} ({config.data.image_size}x{config.data.image_size}); root: `{root}`; "
        f"written {time.strftime('%Y-%m-%d %H:%M')}.",
        "Numbers (percent, on val at each run's best checkpoint): VOC mAP = mean over classes of the "
        "non-interpolated AP (sklearn's); per-image AP = the reference's metric, AP over the classes of each "
        "image averaged over images (the paper's mAP); F1 = sample F1 at probability 0.5 and at logit >= 0.5 "
        "(the reference's threshold, the paper's F1). AUC and Point (pointing accuracy) of Grad-CAM on "
        "segmentation_val over the pairs (image, class) with the class present and predicted; Cos and l2 "
        "compare a run's map with the teacher's (min-max normalised) on the pairs both predict.",
        INTERVAL_NOTE,
    ]
    if voc:
        lines.append(
            "The paper's value follows ours in parentheses, in the column of the same quantity only: its mAP "
            "beside our per-image AP, its F1 beside our F1 at logit >= 0.5."
        )
    lines.append("")
    stage_log = root / "stages.json"
    if stage_log.exists():
        import json

        log = json.loads(stage_log.read_text())
        order = [s.name for s in stages if s.name in log]  # the sweep's order (the JSON's keys are sorted)
        lines += _table(
            ["stage", "status", "wall time (s)"],
            [[n, log[n].get("status", ""), str(log[n].get("seconds", ""))] for n in order],
        )
        lines.append("")
    lines += tables(config, stages, results, voc)
    lines += deployment_table(root)
    plots = plot_against_params(root, stages, results)
    if plots:
        lines += ["## Attribution against parameter count", ""]
        lines += [f"![{p}]({p})" for p in plots]
        lines.append("")
    figures = []
    for name in ("eval", "eval_methods"):
        ev = results[name]
        for method, path in ((ev or {}).get("figures") or {}).items():
            if path:
                figures.append(f"![{method}]({Path(path).relative_to(root)})")
    if figures:
        lines += ["## Attribution maps (image, mask, then each run's map for the teacher's class)", ""]
        lines += figures
        lines.append("")
    path = root / "report.md"
    write_text_atomic(path, "\n".join(lines))
    return path
