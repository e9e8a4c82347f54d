"""Evaluation of trained runs: classification of a checkpoint; localisation of attribution maps, tables and
figures (the report ``eval.py`` and the sweep write). Restoring a checkpoint is the trainer's
(:mod:`apjax.trainer.checkpoints`); this module sits above the tasks."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from tqdm import tqdm

from apjax.attribution.maps import upsample_map
from apjax.compress.unstructured import count_nonzero_params
from apjax.data import class_names
from apjax.data.augment import eval_preprocess
from apjax.data.pipeline import data_mesh, eval_masks
from apjax.errors import ConfigError
from apjax.localization_table import localization_table
from apjax.models import count_params
from apjax.trainer.checkpoints import restore_state
from apjax.trainer.config import load_data, num_classes_of, synthetic_config
from apjax.trainer.evaluation import evaluate, make_eval_step, predict
from apjax.trainer.files import load_workdir_config, write_json_atomic, write_text_atomic

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
    if split not in ("train", "val", "segmentation_val"):
        raise ConfigError(f"unknown split {split!r}; choose train, val or segmentation_val.")
    model, state, meta = restore_state(config, workdir, which)
    mesh = data_mesh()
    cache = load_data(config, splits=(split,))[split]
    eval_step = make_eval_step(model, config.data.image_size, mesh)
    bs = max(config.batch_size, mesh.devices.size)
    with jax.set_mesh(mesh):
        metrics = evaluate(eval_step, state.params, state.batch_stats, cache, bs, mesh)
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


# ------------------------------------------------------------------------------------------------
# Localisation: attribution maps against the segmentation masks (SPEC section 7).
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalRun:
    """One model of a localisation report: its workdir's config, model and eval-mode weights."""

    name: str
    workdir: Path
    config: ml_collections.ConfigDict
    model: Any
    variables: dict
    step: int
    selection: dict = dataclasses.field(default_factory=dict)  # see checkpoint_selection


def checkpoint_selection(meta: dict, which: str) -> dict:
    """What chose a restored checkpoint, from its meta: ``{'checkpoint': 'latest'}``, or for the best
    checkpoint ``{'checkpoint': 'best', 'best_metric': the val metric that picked it, 'best_value': its
    value}``. A best checkpoint saved before the criterion was recorded was picked by VOC mAP."""
    if which != "best":
        return {"checkpoint": which}
    if "best_metric" in meta:
        return {"checkpoint": "best", "best_metric": meta["best_metric"], "best_value": meta["best_value"]}
    return {"checkpoint": "best", "best_metric": "mAP", "best_value": meta.get("mAP")}


def load_run(workdir: str | os.PathLike, which: str = "best") -> EvalRun:
    """A trained run for evaluation: config.json, model and the ``which`` checkpoint's weights."""
    workdir = Path(workdir).expanduser().absolute()
    config = load_workdir_config(workdir)
    model, state, meta = restore_state(config, workdir, which)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    selection = checkpoint_selection(dict(meta), which)
    return EvalRun(workdir.name, workdir, config, model, variables, int(meta["step"]), selection)


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


def _pair_batches(pairs: np.ndarray, batch_size: int):
    for start in range(0, len(pairs), batch_size):
        yield start, pairs[start : start + batch_size]


def _maps_for_pairs(fn, cache, batch_pairs: np.ndarray, size: int, batch_size: int) -> np.ndarray:
    """Maps (P, size, size) of ``fn`` for (image index, class) pairs of a HostCache, padded to a fixed
    batch shape."""
    n = len(batch_pairs)
    idx = np.concatenate([batch_pairs[:, 0], np.repeat(batch_pairs[-1:, 0], batch_size - n)])
    cls = np.concatenate([batch_pairs[:, 1], np.repeat(batch_pairs[-1:, 1], batch_size - n)])
    images = jnp.asarray(cache.images[np.sort(idx)][np.argsort(np.argsort(idx))])
    x = eval_preprocess(images, jnp.asarray(cache.extents[idx]), out_size=size)
    maps = upsample_map(fn(x, jnp.asarray(cls, jnp.int32)), size)
    return np.asarray(maps[:n], np.float32)


def evaluate_localization(
    maps_of: Callable[[np.ndarray], np.ndarray],
    masks: np.ndarray,
    pairs: np.ndarray,
    batch_size: int = 32,
    tolerance: float = 0.0,
    teacher_maps_of: Callable[[np.ndarray], np.ndarray] | None = None,
    teacher_pairs: np.ndarray | None = None,
    progress: Callable[[int], Any] | None = None,
) -> dict:
    """One run's localisation numbers for one attribution method: one entry of ``localization.json``.

    Args:
      maps_of: (B, 2) int64 pairs (image index, class index), B <= ``batch_size`` -> float maps (B, H, W)
        at the masks' resolution (the report: each pair's class map on its image, resized to the input
        size).
      masks: uint8 (N, H, W) class-index masks (0 background, 1..K classes, 255 void).
      pairs: (P, 2) the run's pairs, :func:`apjax.localization.localization_pairs` of its logits.
      batch_size: pairs per call of ``maps_of``.
      tolerance: the pointing game's tolerance in pixels (0: the arg-max pixel itself).
      teacher_maps_of, teacher_pairs: a teacher's maps and pairs; then Cos and l2 compare this run's maps
        with the teacher's on the pairs both have (in ``teacher_pairs``' order).
      progress: called with the number of pairs done after each batch (a progress bar's ``update``).

    Returns:
      :func:`apjax.localization.summarize_pair_scores`' keys (``AUC``: mean per-pixel ROC-AUC over the
      ``auc_pairs`` pairs whose class covers some but not all pixels; ``Point``: the arg-max lies in the
      pair's class mask, over all ``pairs``; ``Point_ref_cumulative``: the reference's variant;
      ``constant_maps``), ``pairs_per_s`` (maps and scores of the pairs), and with a teacher ``Cos`` and
      ``l2`` (means over the common pairs of :func:`apjax.localization.map_similarity`, both maps min-max
      normalised at the masks' resolution; NaN without a common pair) and ``similarity_pairs`` (their count).
    """
    from apjax import localization as loc

    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    chunks = []
    t0 = time.perf_counter()
    for _, chunk in _pair_batches(pairs, batch_size):
        chunks.append(loc.pair_scores(maps_of(chunk), masks, chunk, tolerance))
        if progress:
            progress(len(chunk))
    seconds = time.perf_counter() - t0
    keys = ("auc", "hit", "hit_ref_cumulative", "constant")
    scores = {k: np.concatenate([c[k] for c in chunks]) if chunks else np.zeros(0) for k in keys}
    out: dict[str, Any] = loc.summarize_pair_scores(scores)
    out["pairs_per_s"] = round(len(pairs) / seconds, 2) if len(pairs) and seconds > 0 else None
    if teacher_maps_of is not None:
        common = _common(np.asarray(teacher_pairs, np.int64).reshape(-1, 2), pairs)
        cos, l2 = [], []
        for _, chunk in _pair_batches(common, batch_size):
            sim = loc.map_similarity(maps_of(chunk), teacher_maps_of(chunk))
            cos.append(sim["cos"]), l2.append(sim["l2"])
            if progress:
                progress(len(chunk))
        out["Cos"] = float(np.mean(np.concatenate(cos))) if cos else float("nan")
        out["l2"] = float(np.mean(np.concatenate(l2))) if l2 else float("nan")
        out["similarity_pairs"] = int(len(common))
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
) -> dict:
    """Classification and localisation of a teacher (first workdir) and its students, per method.

    For each run: the val classification metrics
    (:func:`apjax.trainer.evaluation.classification_summary`), what chose its checkpoint, its parameter
    counts (``params``: all; ``params_nonzero``: the non-zero ones, head included; ``params_conv_bn``:
    :func:`conv_bn_param_count`, the paper's count for unstructured pruning); on ``segmentation_val``, for
    each method, :func:`evaluate_localization` of its maps: mean per-pixel ROC-AUC and pointing accuracy
    over the run's pairs (class in the mask AND predicted), the reference's cumulative pointing variant,
    the count of constant maps and, for each student, the cosine similarity and l2 distance of its maps to
    the teacher's (min-max normalised at the input size) on the pairs both predict. Writes
    ``localization.json``, ``localization.md`` and ``figures/<method>.png`` to ``out_dir`` (default:
    ``<first workdir>/localization``).
    """
    from apjax import localization as loc
    from apjax.attribution.methods import LABELS, METHODS, attribution_fn

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown attribution methods {unknown}; choose from {list(METHODS)}.")
    runs = [load_run(w, which) for w in workdirs]
    _check_comparable(runs)
    first = runs[0].config
    size = first.data.image_size
    caches = load_data(first, splits=("val", "segmentation_val"))
    seg = caches["segmentation_val"]
    masks = eval_masks(seg, size)  # each resized once (NEAREST) from its stored mask
    mesh = data_mesh()
    bs = max(batch_size, mesh.devices.size)
    results: dict = {
        "runs": {},
        "format": REPORT_FORMAT,
        "run_order": [r.name for r in runs],  # the teacher first (the JSON's keys are sorted)
        "methods": list(methods),
        "tolerance": tolerance,
        "image_size": size,
    }
    pairs, fns = {}, {}
    with jax.set_mesh(mesh):
        for r in runs:
            eval_step = make_eval_step(r.model, size, mesh)
            params, stats = r.variables["params"], r.variables["batch_stats"]
            val = evaluate(eval_step, params, stats, caches["val"], bs, mesh)
            seg_logits = predict(eval_step, params, stats, seg, bs, mesh)
            pairs[r.name] = loc.localization_pairs(masks, seg_logits)
            results["runs"][r.name] = {
                "workdir": str(r.workdir),
                "step": r.step,
                "model": r.config.model,
                "checkpoint": r.selection,
                "params": count_params(params),
                "params_nonzero": count_nonzero_params(params),
                "params_conv_bn": conv_bn_param_count(params),
                "val": val,
                "pairs": len(pairs[r.name]),
                "methods": {},
            }
    total = sum(len(p) for p in pairs.values()) * len(methods)
    total += sum(len(_common(pairs[runs[0].name], pairs[r.name])) for r in runs[1:]) * len(methods)
    bar = tqdm(total=total, desc="localization", unit="pair", disable=jax.process_index() != 0)
    for method in methods:
        for r in runs:
            fns[r.name] = attribution_fn(
                method, r.model, r.variables, ig_steps=ig_steps, smoothgrad_samples=smoothgrad_samples
            )

        def maps_of(name: str) -> Callable[[np.ndarray], np.ndarray]:
            return lambda chunk: _maps_for_pairs(fns[name], seg, chunk, size, batch_size)

        teacher = runs[0].name
        for i, r in enumerate(runs):
            results["runs"][r.name]["methods"][method] = evaluate_localization(
                maps_of(r.name),
                masks,
                pairs[r.name],
                batch_size,
                tolerance,
                teacher_maps_of=maps_of(teacher) if i > 0 else None,
                teacher_pairs=pairs[teacher] if i > 0 else None,
                progress=bar.update,
            )
        if figure_images > 0:
            results.setdefault("figures", {})[method] = _figure(
                runs,
                fns,
                seg,
                masks,
                pairs[runs[0].name],
                size,
                figure_images,
                LABELS[method],
                out_dir,
                method,
            )
    bar.close()
    out = Path(out_dir) if out_dir else runs[0].workdir / "localization"
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "localization.json", results)
        write_text_atomic(out / "localization.md", localization_table(results, LABELS))
    return results


def _common(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rows of pair arrays (P, 2) present in both, in ``a``'s order."""
    keys = {tuple(x) for x in b.tolist()}
    rows = [x for x in a.tolist() if tuple(x) in keys]
    return np.asarray(rows, np.int64).reshape(-1, 2)


def _figure(runs, fns, seg, masks, teacher_pairs, size, n, label, out_dir, method) -> str | None:
    """A PNG per method: for n images, the image, its mask and each run's map for the teacher's class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    chosen, seen = [], set()
    for i, k in teacher_pairs.tolist():
        if i not in seen:
            chosen.append((i, k))
            seen.add(i)
        if len(chosen) == n:
            break
    if not chosen:
        return None
    chosen = np.asarray(chosen, np.int64)
    c = runs[0].config
    synthetic = synthetic_config(c) if c.data.dataset == "synthetic" else None
    names = class_names(c.data.dataset, synthetic)
    maps = {r.name: _maps_for_pairs(fns[r.name], seg, chosen, size, len(chosen)) for r in runs}
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
        panels += [(maps[r.name][row], r.name, "jet") for r in runs]
        for col, (panel, title, cmap) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(panel, cmap=cmap)
            ax.set_axis_off()
            if row == 0 or col == 1:  # the class changes from row to row
                ax.set_title(title, fontsize=8)
    fig.suptitle(label)
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
