"""The report's numbers over a sweep's seeds: each table row's runs (a stage at every seed offset), the
mean of each number with its 95% Student t interval as a cell (:mod:`apjax.stats`), the Markdown table
helpers, and the paired-difference tables (a matching method minus KD or naive on the same seed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from apjax.compress.matching import MATCHING_MAPS, is_blackbox
from apjax.models.quantized import QUANT_SCHEMES
from apjax.stages import Stage
from apjax.stats import Interval, finite, mean_interval, paired_difference

PERCENT = ("mAP", "mAP_devkit", "per_image_AP", "F1", "F1_logit0.5", "AUC", "Point")
PERCENT += ("deletion_auc", "insertion_auc", "morf_aopc")
# The numbers a row aggregates over seeds (the rest, step and checkpoint, describe one run).
NUMBERS = (
    "mAP",
    "mAP_devkit",
    "per_image_AP",
    "F1",
    "F1_logit0.5",
    "AUC",
    "Point",
    "Cos",
    "l2",
    "map_cos",
    "deletion_auc",
    "insertion_auc",
    "morf_aopc",
    "params_nonzero",
    "params_conv_bn",
    "size_bytes",
)
# The paired tables' columns: (header, key).
PAIRED_COLUMNS = (
    ("VOC mAP", "mAP"),
    ("per-image AP", "per_image_AP"),
    ("AUC", "AUC"),
    ("Point", "Point"),
    ("Cos", "Cos"),
    ("l2", "l2"),
    ("map cos (val)", "map_cos"),
)
# The faithfulness tables' columns (apjax.evaluators.faithfulness: each run's own maps on its own model).
FAITHFULNESS_COLUMNS = (
    ("deletion AUC", "deletion_auc"),
    ("insertion AUC", "insertion_auc"),
    ("MoRF AOPC", "morf_aopc"),
)
INTERVAL_NOTE = (
    "Seeds: each cell is the mean over the row's n seeds (column n) ± the half-width of its two-sided 95% "
    "Student t interval, t_{0.975, n-1} * s / sqrt(n) with the sample standard deviation s; a row of one "
    "seed shows its value alone, and a table of single runs says (n = 1) in its title."
)


def method_name(method: str) -> str:
    """A method's name in tables: KD, Naive, or the matching map's label from its registry entry."""
    base = {"kd": "KD", "naive": "Naive"}
    return base[method] if method in base else MATCHING_MAPS[method].label


def fmt(metric: str, v: Any, signed: bool = False) -> str:
    """A table cell: percentages for the AP, F1, AUC and Point keys, 3 decimals for Cos, 2 for l2, '-' if
    missing; an :class:`~apjax.stats.Interval` of n > 1 as ``mean ± half-width``, of n = 1 as its value.
    ``signed``: a sign before every number (differences)."""
    if isinstance(v, Interval):
        if v.n == 1:
            return fmt(metric, v.mean, signed)
        return f"{fmt(metric, v.mean, signed)} ± {fmt(metric, v.half)}"
    if not finite(v):
        return "-"
    sign = "+" if signed else ""
    if metric in PERCENT:
        return f"{100 * v:{sign}.2f}"
    return f"{v:{sign}.3f}" if metric in ("Cos", "map_cos") else f"{v:{sign}.2f}"


def fmt_params(n: Any) -> str:
    """A parameter count (the mean over seeds of an :class:`~apjax.stats.Interval`)."""
    n = n.mean if isinstance(n, Interval) else n
    if not finite(n):
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def best_map_cos(workdir: str | None) -> float | None:
    """The training's own ``map_cos`` (teacher-student SWA map cosine over every val image) at the run's
    best checkpoint (unstructured pruning: its last round), from its ``final_metrics.json``; None for a run
    without one (a teacher, older runs)."""
    path = Path(workdir or "") / "final_metrics.json"
    if not workdir or not path.is_file():
        return None
    final = json.loads(path.read_text())
    best = [row for key, row in final.get("rows", {}).items() if key.startswith("val, best")]
    # Unstructured pruning's file has no rows: its "val" is the last round's, the checkpoint evaluated.
    return (best[0] if best else final.get("val", {})).get("map_cos")


def run_metrics(evaluation: dict | None, name: str, method: str = "gradcam") -> dict[str, Any]:
    """One run's numbers from a localisation report: the val classification metrics (``mAP``,
    ``mAP_devkit``, ``per_image_AP``, ``F1``, ``F1_logit0.5``), ``AUC``, ``Point``, ``Cos``, ``l2``,
    ``deletion_auc``, ``insertion_auc`` and ``morf_aopc`` (when the evaluation scored faithfulness), the
    parameter counts ``params_nonzero`` and ``params_conv_bn``, ``size_bytes``, ``step`` and
    ``checkpoint`` (what chose it). Keys a report written by an older apjax lacks are None."""
    if not evaluation or name not in evaluation["runs"]:
        return {}
    r = evaluation["runs"][name]
    m = r["methods"].get(method, {})
    val = r["val"]
    out = {k: val.get(k) for k in ("mAP", "mAP_devkit", "per_image_AP", "F1", "F1_logit0.5")}
    out.update(
        {k: m.get(k) for k in ("AUC", "Point", "Cos", "l2", "deletion_auc", "insertion_auc", "morf_aopc")}
    )
    out["map_cos"] = best_map_cos(r.get("workdir"))
    out["params_nonzero"] = r.get("params_nonzero", r.get("params"))
    out["params_conv_bn"] = r.get("params_conv_bn")
    out["size_bytes"] = r.get("size_bytes")
    out["step"] = r.get("step")
    out["checkpoint"] = r.get("checkpoint")
    return out


def group_metrics(evaluation: dict | None, names: list[str], method: str = "gradcam") -> dict[str, Any]:
    """The numbers of the evaluated runs among ``names`` (one stage's seeds): each key of :data:`NUMBERS`
    as an :class:`~apjax.stats.Interval` (None when no run has it) and ``n``, the runs found; {} if none."""
    runs = [m for m in (run_metrics(evaluation, n, method) for n in names) if m]
    if not runs:
        return {}
    return {"n": len(runs), **{k: mean_interval(m.get(k) for m in runs) for k in NUMBERS}}


def by_base(stages: list[Stage]) -> dict[str, list[Stage]]:
    """The training stages grouped by their name without the seed suffix (a table row), in sweep order."""
    groups: dict[str, list[Stage]] = {}
    for s in stages:
        if s.config is not None:
            groups.setdefault(s.base, []).append(s)
    return groups


def seeds_title(title: str, ns: list[int]) -> str:
    """A table's title: ``(n = 1)`` when every row is a single run, else a pointer to the interval."""
    return f"{title} (n = 1)" if all(n == 1 for n in ns) else f"{title} (mean ± 95% t interval over n seeds)"


def row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [row(header), "|" + "---|" * len(header), *[row(r) for r in rows]]


def paired_rows(ev: dict, comparisons, columns=PAIRED_COLUMNS, method: str = "gradcam") -> list[list[str]]:
    """A row per (label, method stages, baseline stages): each of ``columns``' (header, key) mean
    difference over the seeds both ran, with its t interval, and n; map numbers of attribution ``method``."""
    rows = []
    for label, name, method_stages, base_stages in comparisons:
        per_seed = lambda stages: {s.seed: run_metrics(ev, s.name, method) for s in stages}  # noqa: E731
        a = {k: m for k, m in per_seed(method_stages).items() if m}
        b = {k: m for k, m in per_seed(base_stages).items() if m}
        if not set(a) & set(b):
            continue
        diffs = [
            paired_difference(*({k: m[key] for k, m in x.items()} for x in (a, b))) for _, key in columns
        ]
        n = max((d.n for d in diffs if d), default=0)
        cells = [fmt(key, d, signed=True) for (_, key), d in zip(columns, diffs, strict=True)]
        rows.append([label, name, str(n), *cells])
    return rows


def comparisons(stages: list[Stage]) -> tuple[list, list]:
    """The paired comparisons of a sweep: (label, name, method stages, baseline stages) of each matching
    student against KD of its size (a black-box teacher's method also against SSWA, which reads the whole
    teacher), and of each pruning or quantization method against its naive run."""
    groups = by_base(stages)
    kd, other = [], []
    for base, group in groups.items():
        s = group[0]
        if s.kind == "distill" and s.method != "kd" and f"kd_{s.student}_kd" in groups:
            kd.append((s.student, f"{method_name(s.method)} - KD", group, groups[f"kd_{s.student}_kd"]))
        if s.kind == "distill" and is_blackbox(s.method) and f"kd_{s.student}_sswa" in groups:
            sswa = groups[f"kd_{s.student}_sswa"]
            kd.append((s.student, f"{method_name(s.method)} - SSWA", group, sswa))
        baseline = base.rsplit("_", 1)[0] + "_naive"
        if s.kind != "distill" and s.method != "naive" and baseline in groups:
            kind = {"prune_unstructured": "unstructured pruning", "prune_structured": "structured pruning"}
            label = kind.get(s.kind) or QUANT_SCHEMES[s.bits].label
            other.append((label, f"{method_name(s.method)} - Naive", group, groups[baseline]))
    return kd, other


def paired_tables(ev: dict | None, stages: list[Stage]) -> list[str]:
    """ "Paired differences (matching minus KD, same seed)" per student size, and the same for pruning and
    quantization against naive: the mean over seeds of (method - baseline) on the same seed, ± its 95%
    t interval."""
    if not ev:
        return []
    kd, other = comparisons(stages)
    lines = []
    header = ["compression", "difference", "n", *(h for h, _ in PAIRED_COLUMNS)]
    for title, pairs in (("matching minus KD", kd), ("matching minus naive", other)):
        rows = paired_rows(ev, pairs)
        if rows:
            full = seeds_title(f"Paired differences ({title}, same seed)", [int(r[2]) for r in rows])
            lines += [f"## {full}", "", *table(header, rows), ""]
    if lines:
        lines += [
            "Each row: for every seed with both runs, the method's number minus the baseline's on that seed "
            "(percentage points for mAP, AP, AUC and Point); the mean of these differences ± the half-width "
            "of its 95% Student t interval over the n seeds (a paired t interval). An interval that excludes "
            "0 says the method changes the number on these seeds beyond their seed-to-seed spread; for l2 "
            "lower is better. Cos and l2 compare Grad-CAM maps over the scored pairs only (classes present "
            "and predicted); map cos (val) is the training's own teacher-student cosine of the SWA maps at "
            "the matched taps over EVERY val image, at the best checkpoint.",
            "",
        ]
    return lines


# The columns of the tables of an evaluation method other than Grad-CAM (its maps' numbers only).
MAP_COLUMNS = (("AUC", "AUC"), ("Point", "Point"), ("Cos", "Cos"), ("l2", "l2"))


def method_tables(ev: dict | None, stages: list[Stage], label_of) -> list[str]:
    """For each evaluation method of ``ev`` other than Grad-CAM (the paper's tables already show it): every
    run's AUC, Point, Cos and l2 of that method's maps over its seeds, and the paired differences (a method
    minus KD, naive or SSWA, same seed). ``label_of(method)`` names an attribution method."""
    if not ev:
        return []
    lines = []
    groups = by_base(stages)
    kd, other = comparisons(stages)
    for method in [m for m in ev.get("methods", []) if m != "gradcam"]:
        rows = []
        for base, (s, *_) in groups.items():
            m = group_metrics(ev, [x.name for x in groups[base]], method)
            if m and m.get("AUC") is not None:
                name = method_name(s.method) if s.method else "-"
                rows.append([base, name, str(m["n"]), *(fmt(k, m[k]) for _, k in MAP_COLUMNS)])
        if not rows:
            continue
        title = seeds_title(f"{label_of(method)} maps of every run", [int(r[2]) for r in rows])
        header = ["run", "method", "n", *(h for h, _ in MAP_COLUMNS)]
        lines += [f"## {title}", "", *table(header, rows), ""]
        paired = paired_rows(ev, kd + other, MAP_COLUMNS, method)
        if paired:
            header = ["compression", "difference", "n", *(h for h, _ in MAP_COLUMNS)]
            lines += [f"Paired differences of the {label_of(method)} numbers (same seed):", ""]
            lines += [*table(header, paired), ""]
        lines += [
            f"AUC and Point score each run's {label_of(method)} maps against the masks, Cos and l2 compare "
            "them with the teacher's (min-max normalised), on the same pairs as the tables above.",
            "",
        ]
    return lines
