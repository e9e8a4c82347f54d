"""Evaluation runs: classification of a checkpoint; localisation of attribution maps, tables and figures."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from apjax import train_lib
from apjax.attribution.maps import upsample_map
from apjax.compress.unstructured import count_nonzero_params
from apjax.data import class_names
from apjax.data.augment import eval_preprocess, resize_masks_nearest
from apjax.data.pipeline import data_mesh
from apjax.models import count_params

CHECKPOINTS = ("best", "latest")


def load_workdir_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The ``config.json`` a training run saved in ``workdir``, with the model its weights have.

    A structurally pruned run records its smaller widths in ``model.json``; they replace ``model``.
    """
    workdir = Path(workdir).expanduser()
    path = workdir / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; pass the --workdir of a training run (it holds config.json)."
        )
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    model_file = workdir / "model.json"
    if model_file.exists():
        config.model = json.loads(model_file.read_text())["model"]
    return config


def checkpoint_workdir(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Path:
    """Where a run's checkpoints are: ``workdir`` itself, or for unstructured pruning (whose rounds are
    runs in ``round_XX/``) its last round that exists."""
    workdir = Path(workdir)
    if config.task == "prune_unstructured":
        rounds = sorted(p for p in workdir.glob("round_[0-9][0-9]") if p.is_dir())
        if rounds:
            return rounds[-1]
    return workdir


def restore_state(config: ml_collections.ConfigDict, workdir: str | os.PathLike, which: str):
    """(model, state, meta) of the ``which`` ('best' or 'latest') checkpoint of ``workdir``."""
    if which not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoint {which!r}; choose one of {list(CHECKPOINTS)}.")
    model = train_lib.build_model(config, train_lib.num_classes_of(config))
    tx = train_lib.create_optimizer(config, train_lib.create_learning_rate_fn(config, 1))
    abstract = jax.eval_shape(lambda: train_lib.create_train_state(config, model, tx))
    mesh = data_mesh()
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), abstract)
    workdir = checkpoint_workdir(config, workdir)
    checkpoints = train_lib.Checkpoints(workdir)
    try:
        manager = checkpoints.best if which == "best" else checkpoints.latest
        try:
            restored = train_lib.Checkpoints.restore(manager, abstract)
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"the {which} checkpoint in {workdir} does not match its config's model "
                f"({config.model}, {train_lib.num_classes_of(config)} classes): {e}"
            ) from e
    finally:
        checkpoints.close()
    if restored is None:
        raise FileNotFoundError(
            f"{workdir} has no {which} checkpoint yet; train first (train.py --workdir {workdir})."
        )
    state, meta = restored
    return model, state, meta


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
        raise ValueError(f"unknown split {split!r}; choose train, val or segmentation_val.")
    model, state, meta = restore_state(config, workdir, which)
    mesh = data_mesh()
    cache = train_lib.load_data(config, splits=(split,))[split]
    eval_step = train_lib.make_eval_step(model, config.data.image_size, mesh)
    bs = max(config.batch_size, mesh.devices.size)
    with jax.set_mesh(mesh):
        metrics = train_lib.evaluate(eval_step, state.params, state.batch_stats, cache, bs, mesh)
    result = {
        "workdir": str(workdir),
        "checkpoint": which,
        "step": int(meta["step"]),
        "split": split,
        **metrics,
    }
    if jax.process_index() == 0:
        train_lib.write_json_atomic(workdir / f"eval_{which}_{split}.json", result)
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


def load_run(workdir: str | os.PathLike, which: str = "best") -> EvalRun:
    """A trained run for evaluation: config.json, model and the ``which`` checkpoint's weights."""
    workdir = Path(workdir).expanduser().absolute()
    config = load_workdir_config(workdir)
    model, state, meta = restore_state(config, workdir, which)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return EvalRun(workdir.name, workdir, config, model, variables, int(meta["step"]))


def _check_comparable(runs: list[EvalRun]) -> None:
    first = runs[0].config
    for r in runs[1:]:
        c = r.config
        same = (
            c.data.dataset == first.data.dataset
            and c.data.image_size == first.data.image_size
            and train_lib.num_classes_of(c) == train_lib.num_classes_of(first)
        )
        if not same:
            raise ValueError(
                f"{r.workdir} was trained on other data ({c.data.dataset}, {c.data.image_size}px, "
                f"{train_lib.num_classes_of(c)} classes) than {runs[0].workdir}; compare runs of one dataset."
            )


def _pair_batches(pairs: np.ndarray, batch_size: int):
    for start in range(0, len(pairs), batch_size):
        yield start, pairs[start : start + batch_size]


def _maps_for_pairs(
    fn, images: np.ndarray, batch_pairs: np.ndarray, size: int, batch_size: int
) -> np.ndarray:
    """Maps (P, size, size) of ``fn`` for (image index, class) pairs, padded to a fixed batch shape."""
    n = len(batch_pairs)
    idx = np.concatenate([batch_pairs[:, 0], np.repeat(batch_pairs[-1:, 0], batch_size - n)])
    cls = np.concatenate([batch_pairs[:, 1], np.repeat(batch_pairs[-1:, 1], batch_size - n)])
    x = eval_preprocess(jnp.asarray(images[np.sort(idx)][np.argsort(np.argsort(idx))]), out_size=size)
    maps = upsample_map(fn(x, jnp.asarray(cls, jnp.int32)), size)
    return np.asarray(maps[:n], np.float32)


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

    For each run: val mAP/F1; on ``segmentation_val``, for each method, the mean per-pixel ROC-AUC and the
    pointing accuracy over the run's pairs (class in the mask AND predicted), the reference's pooled
    pointing variant and the count of constant maps; for each student, the cosine similarity and l2
    distance of its maps to the teacher's (min-max normalised at the input size) on the pairs both
    predict. Writes ``localization.json``, ``localization.md`` and ``figures/<method>.png`` to ``out_dir``
    (default: ``<first workdir>/localization``).
    """
    from apjax import localization as loc
    from apjax.attribution.methods import LABELS, METHODS, attribution_fn

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown attribution methods {unknown}; choose from {list(METHODS)}.")
    runs = [load_run(w, which) for w in workdirs]
    _check_comparable(runs)
    first = runs[0].config
    size = first.data.image_size
    caches = train_lib.load_data(first, splits=("val", "segmentation_val"))
    seg = caches["segmentation_val"]
    masks = np.concatenate(
        [
            np.asarray(resize_masks_nearest(jnp.asarray(seg.masks[i : i + 256]), size))
            for i in range(0, len(seg), 256)
        ]
    )
    mesh = data_mesh()
    bs = max(batch_size, mesh.devices.size)
    results: dict = {
        "runs": {},
        "run_order": [r.name for r in runs],  # the teacher first (the JSON's keys are sorted)
        "methods": list(methods),
        "tolerance": tolerance,
        "image_size": size,
    }
    pairs, fns = {}, {}
    with jax.set_mesh(mesh):
        for r in runs:
            eval_step = train_lib.make_eval_step(r.model, size, mesh)
            params, stats = r.variables["params"], r.variables["batch_stats"]
            val = train_lib.evaluate(eval_step, params, stats, caches["val"], bs, mesh)
            seg_logits = train_lib.predict(eval_step, params, stats, seg, bs, mesh)
            pairs[r.name] = loc.localization_pairs(masks, seg_logits)
            results["runs"][r.name] = {
                "workdir": str(r.workdir),
                "step": r.step,
                "model": r.config.model,
                "params": count_params(params),
                "params_nonzero": count_nonzero_params(params),
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
        for r in runs:
            p = pairs[r.name]
            auc, hits, pooled, constant = [], [], [], []
            t0 = time.perf_counter()
            for _, chunk in _pair_batches(p, batch_size):
                maps = _maps_for_pairs(fns[r.name], seg.images, chunk, size, batch_size)
                targets = loc.class_targets(masks, chunk)
                auc.append(loc.roc_auc(maps, targets))
                h, c = loc.pointing_game(maps, targets, tolerance)
                hp, _ = loc.pointing_game(maps, loc.pooled_targets(masks, chunk), tolerance)
                hits.append(h), pooled.append(hp), constant.append(c)
                bar.update(len(chunk))
            seconds = time.perf_counter() - t0
            cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
            a = cat(auc)
            results["runs"][r.name]["methods"][method] = {
                "AUC": float(np.nanmean(a)) if np.isfinite(a).any() else float("nan"),
                "Point": float(np.mean(cat(hits))) if len(p) else float("nan"),
                "Point_pooled": float(np.mean(cat(pooled))) if len(p) else float("nan"),
                "constant_maps": int(cat(constant).sum()),
                "pairs": int(len(p)),
                "pairs_per_s": round(len(p) / seconds, 2) if seconds > 0 else None,
            }
        teacher = runs[0]
        for r in runs[1:]:
            common = _common(pairs[teacher.name], pairs[r.name])
            cos, l2 = [], []
            for _, chunk in _pair_batches(common, batch_size):
                mt = _maps_for_pairs(fns[teacher.name], seg.images, chunk, size, batch_size)
                ms = _maps_for_pairs(fns[r.name], seg.images, chunk, size, batch_size)
                sim = loc.map_similarity(ms, mt)
                cos.append(sim["cos"]), l2.append(sim["l2"])
                bar.update(len(chunk))
            m = results["runs"][r.name]["methods"][method]
            m["Cos"] = float(np.mean(np.concatenate(cos))) if cos else float("nan")
            m["l2"] = float(np.mean(np.concatenate(l2))) if l2 else float("nan")
            m["similarity_pairs"] = int(len(common))
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
        train_lib.write_json_atomic(out / "localization.json", results)
        train_lib.write_text_atomic(out / "localization.md", localization_table(results, LABELS))
    return results


def _common(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rows of pair arrays (P, 2) present in both, in ``a``'s order."""
    keys = {tuple(x) for x in b.tolist()}
    rows = [x for x in a.tolist() if tuple(x) in keys]
    return np.asarray(rows, np.int64).reshape(-1, 2)


def localization_table(results: dict, labels: dict[str, str]) -> str:
    """The paper's Tables 2 and 8 layout: a row per model and method; mAP, F1, AUC, Point, Cos, l2."""
    lines = [
        "| model | method | mAP | F1 | AUC | Point | Point (pooled) | Cos | l2 | pairs | constant maps |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    pct = lambda v: "-" if v is None or not np.isfinite(v) else f"{100 * v:.2f}"  # noqa: E731
    num = lambda v, f: "-" if v is None or not np.isfinite(v) else format(v, f)  # noqa: E731
    for name in results.get("run_order", results["runs"]):
        r = results["runs"][name]
        for method, m in r["methods"].items():
            cells = [
                name,
                labels[method],
                pct(r["val"]["mAP"]),
                pct(r["val"]["F1"]),
                pct(m["AUC"]),
                pct(m["Point"]),
                pct(m["Point_pooled"]),
                num(m.get("Cos"), ".3f"),
                num(m.get("l2"), ".2f"),
                str(m["pairs"]),
                str(m["constant_maps"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
    synthetic = train_lib.synthetic_config(c) if c.data.dataset == "synthetic" else None
    names = class_names(c.data.dataset, synthetic)
    maps = {r.name: _maps_for_pairs(fns[r.name], seg.images, chosen, size, len(chosen)) for r in runs}
    cols = 2 + len(runs)
    fig, axes = plt.subplots(len(chosen), cols, figsize=(2.2 * cols, 2.2 * len(chosen)), squeeze=False)
    for row, (i, k) in enumerate(chosen.tolist()):
        image = np.asarray(Image.fromarray(np.asarray(seg.images[i])).resize((size, size), Image.BILINEAR))
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
