"""The localisation report's Markdown table: the paper's Tables 2 and 8 layout, a row per model and method."""

from __future__ import annotations

import numpy as np

from apjax.evaluators.mask_metrics import MASK_METRICS

LOCALIZATION_COLUMNS = (
    "model",
    "method",
    "checkpoint",
    "VOC mAP",
    "VOC mAP (devkit AP)",
    "per-image AP (paper's mAP)",
    "F1 (p > 0.5)",
    "F1 (logit >= 0.5, paper's F1)",
    "AUC",
    "Point",
    "Point (ref., classes <= k)",
    "Cos",
    "l2",
    "pairs (AUC, Point)",
    "pairs with the teacher (Cos, l2)",
    "constant maps",
)


def _selected_by(selection: dict | None) -> str:
    if not selection:
        return "-"  # a report written before the selection was recorded
    if selection.get("checkpoint") != "best":
        return str(selection.get("checkpoint"))
    return f"best {selection.get('best_metric', 'mAP')}"


def localization_table(results: dict, labels: dict[str, str]) -> str:
    """The paper's Tables 2 and 8 layout, a row per model and method, under a legend of its columns.

    Columns (:data:`LOCALIZATION_COLUMNS`): the checkpoint and the val metric that chose it; val
    classification (percent): VOC mAP with sklearn's AP and with the devkit's, the reference's per-image AP
    (the paper's "mAP"), sample F1 at probability 0.5 and at logit >= 0.5 (the paper's F1); AUC, Point,
    the reference's cumulative Point, Cos and l2; the pairs behind AUC and Point (the run's pairs: class
    in the mask and predicted) and behind Cos and l2 (those the teacher predicts too); constant maps.
    """
    size = results.get("image_size", "?")
    lines = [
        "Classification on val, percent: VOC mAP = mean over classes of the non-interpolated AP (sklearn's); "
        "devkit AP = the VOC devkit's (VOC2010+) area under the monotone precision envelope; per-image AP = "
        "the reference's metric, the paper's mAP; F1 = sample F1 at probability 0.5 and at logit >= 0.5 "
        "(the reference's threshold, the paper's F1). Localisation on segmentation_val over the run's pairs "
        "(class in the mask and predicted): AUC = per-pixel ROC-AUC (pairs whose class covers some but not "
        "all pixels); Point = the map's arg-max lies in the class's mask; Point (ref., classes <= k) = the "
        "reference's variant, accepting the masks of the image's present classes with index <= k; Cos, l2 "
        f"= to the teacher's map, both min-max normalised at {size}x{size}, over the pairs both predict; "
        "constant maps have no arg-max and are misses. checkpoint: the val metric that chose it.",
        "",
        "| " + " | ".join(LOCALIZATION_COLUMNS) + " |",
        "|" + "---|" * len(LOCALIZATION_COLUMNS),
    ]
    pct = lambda v: "-" if v is None or not np.isfinite(v) else f"{100 * v:.2f}"  # noqa: E731
    num = lambda v, f: "-" if v is None or not np.isfinite(v) else format(v, f)  # noqa: E731
    for name in results.get("run_order", results["runs"]):
        r = results["runs"][name]
        val = r["val"]
        for method, m in r["methods"].items():
            cells = [
                name,
                labels[method],
                _selected_by(r.get("checkpoint")),
                pct(val["mAP"]),
                pct(val.get("mAP_devkit")),
                pct(val.get("per_image_AP")),
                pct(val["F1"]),
                pct(val.get("F1_logit0.5")),
                pct(m["AUC"]),
                pct(m["Point"]),
                pct(m.get("Point_ref_cumulative")),
                num(m.get("Cos"), ".3f"),
                num(m.get("l2"), ".2f"),
                str(m["pairs"]),
                str(m.get("similarity_pairs", "-")),
                str(m["constant_maps"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    tables = [
        *_extra_table(results, labels, pct, MASK_METRICS, MASK_METRICS, MASK_LEGEND),
        *_extra_table(results, labels, pct, FAITHFULNESS_KEYS, FAITHFULNESS_HEADERS, FAITHFULNESS_LEGEND),
    ]
    return "\n".join(lines + tables) + "\n"


MASK_LEGEND = (
    "Against the class's mask, percent, means over the same pairs (apjax/evaluators/mask_metrics.py): "
    "RMA = share of the map's mass in the mask (Relevance Mass Accuracy); RRA = share of the |mask| "
    "highest pixels in the mask (Relevance Rank Accuracy); AttrLoc = share of |map| in the mask "
    "(Attribution Localisation); TopK = share of the top 2% of pixels in the mask (Top-K Intersection); "
    "EnergyPoint = share of the positive map in the mask's bounding box (energy-based pointing game)."
)
FAITHFULNESS_KEYS = ("deletion_auc", "insertion_auc", "morf_aopc")
FAITHFULNESS_HEADERS = ("deletion AUC", "insertion AUC", "MoRF AOPC")
FAITHFULNESS_LEGEND = (
    "Faithfulness, percent (apjax/evaluators/faithfulness.py): the area under the class probability as "
    "the pixels are deleted (lower is better) or inserted (higher is better) in the map's order, and the "
    "MoRF AOPC, the mean drop of that probability as the map's highest-scoring square regions are "
    "replaced one by one (region perturbation; higher is better), each run's own maps on its own model."
)


def _extra_table(results: dict, labels: dict[str, str], pct, keys, headers, legend: str) -> list[str]:
    """A table of ``keys`` (percent, under ``headers``) per model and method, below ``legend``; none when
    no method entry of the report holds them all."""
    rows = [
        [name, labels[method], *(pct(m[k]) for k in keys)]
        for name in results.get("run_order", results["runs"])
        for method, m in results["runs"][name]["methods"].items()
        if all(k in m for k in keys)
    ]
    if not rows:
        return []
    header, *body = ["| " + " | ".join(r) + " |" for r in [["model", "method", *headers], *rows]]
    return ["", legend, "", header, "|" + "---|" * (2 + len(headers)), *body]
