"""A finished run's checkpoint exported for deployment: two ``jax.export`` functions, its weights and a meta.

:func:`export_run` restores a run's checkpoint as ``eval.py`` does (its ``config.json``, a structurally
pruned run's ``model.json``, the last round of unstructured pruning, the qwix-quantized model of a
quantization run) and writes, into a folder renamed into place when complete:

- ``predict.stablehlo``: ``(weights, images uint8 (B, H, W, 3)) -> logits float32 (B, K)``, the eval
  forward pass with the normalisation inside;
- ``explain.stablehlo``: ``(weights, images) -> (logits (B, K), maps float32 (B, H, W))``: the Grad-CAM map
  of each image's top-1 class at the model's ``gradcam_tap``, resized bilinearly to the input: the same
  map as the localisation evaluation's (:func:`apjax.attribution.methods.attribution_fn` ``'gradcam'``
  then :func:`apjax.attribution.maps.upsample_map`), from one forward and one backward pass;
- ``weights.npz``: the eval-mode weights (``params`` and ``batch_stats``): float32 arrays, a quantized run's
  conv kernels as int8 or packed int4 values with per-channel scales, an unstructured pruning run's as a
  bitmask and their non-zero values (:mod:`apjax.deploy.weights`, :mod:`apjax.deploy.storage`);
- ``meta.json``: what :mod:`apjax.deploy.load` and a reader need (see :func:`export_run`).

The batch dimension is symbolic (``jax.export.symbolic_shape('b, H, W, 3')``), so one export serves any
batch size. The weights are arguments of both functions and stored once beside them, not constants baked
into each: embedded, a VGG16 (134M parameters, 537 MB) would be stored twice. A quantized run's functions
take the stored integer values and scales and dequantize inside.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from apjax.attribution.maps import gradcam_map, upsample_map
from apjax.attribution.methods import gradcam_tap
from apjax.data import class_names
from apjax.data.augment import MEAN, STD, normalize
from apjax.deploy.load import (
    EXPLAIN_FILE,
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    PREDICT_FILE,
    WEIGHTS_FILE,
    check_serialization,
    read_meta,
)
from apjax.deploy.weights import StoredWeights, stored_weights
from apjax.errors import ConfigError, MissingFileError
from apjax.models import family_of, tap_gradients, top1_seed
from apjax.models.quantized import quant_bits_of, scheme
from apjax.trainer.checkpoints import CHECKPOINTS, checkpoint_workdir, restore_state
from apjax.trainer.config import synthetic_config
from apjax.trainer.files import load_workdir_config, write_json_atomic

# Lowered for the CPU and for NVIDIA GPUs (jax lowers for CUDA without a GPU present).
PLATFORMS = ("cpu", "cuda")


def deploy_functions(model, treedef, prepare: Callable | None = None) -> tuple[Callable, Callable]:
    """``(predict, explain)`` of ``model`` taking ``(weights, images uint8 (B, H, W, 3))``, where ``weights``
    is the tuple of arrays that ``treedef`` unflattens into ``{'params', 'batch_stats'}``, or, with
    ``prepare`` (a quantized run's stored weights, :mod:`apjax.deploy.weights`), the tuple of stored arrays
    that ``prepare(model, weights)`` turns into ``(model, those leaves)`` inside the functions.

    ``predict`` is the eval step's forward pass (:func:`apjax.trainer.evaluation.make_eval_step`: at the
    input size its resize is the identity, so the pixels are only normalised, then cast to the model's
    dtype). ``explain`` is the localisation evaluation's Grad-CAM (float32 input, ``gradcam_map`` with
    summed gradients and a ReLU) with the top-1 class chosen from the logits of the same forward pass: the
    registry's ``map_fn('gradcam')`` takes the class as an input and so would need a forward pass of its
    own first; tests/test_deploy.py checks that the two give the same maps.
    """
    tap = gradcam_tap(model)

    def unpack(weights):
        m, leaves = (model, weights) if prepare is None else prepare(model, weights)
        return m, jax.tree.unflatten(treedef, list(leaves))

    def predict(weights, images):
        m, variables = unpack(weights)
        return m.apply(variables, normalize(images).astype(m.dtype)).astype(jnp.float32)

    def explain(weights, images):
        m, variables = unpack(weights)
        logits, acts, grads, _ = tap_gradients(m, variables, normalize(images), top1_seed, [tap])
        maps = gradcam_map(acts[tap], grads[tap], reduce="sum", relu=True).astype(jnp.float32)
        return logits.astype(jnp.float32), upsample_map(maps, images.shape[1:3])

    return predict, explain


def export_functions(
    model, variables: Mapping[str, Any], image_size: int, platforms=PLATFORMS, task: str = "teacher",
    bits: str | None = None,
) -> tuple[bytes, bytes, StoredWeights]:  # fmt: skip
    """The serialized ``predict`` and ``explain`` of :func:`deploy_functions` for square uint8 images of
    side ``image_size`` and any batch size, and the stored weights they take
    (:func:`apjax.deploy.weights.stored_weights` of a run of ``task`` quantized at ``bits``)."""
    stored = stored_weights(variables, task, bits)
    predict, explain = deploy_functions(model, stored.treedef, stored.prepare)
    weights = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for _, a, _ in stored.arguments)
    images = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"b, {image_size}, {image_size}, 3"), jnp.uint8)
    out = []
    for fn in (predict, explain):
        try:
            exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(weights, images)
        except Exception as e:
            raise ConfigError(
                f"jax.export cannot export this {family_of(model).name} model ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); it cannot be deployed this way."
            ) from e
        out.append(bytes(exported.serialize()))
    return out[0], out[1], stored


def _classes(config: ml_collections.ConfigDict) -> list[str]:
    synthetic = synthetic_config(config) if config.data.dataset == "synthetic" else None
    return list(class_names(config.data.dataset, synthetic))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def compression(config: ml_collections.ConfigDict, workdir: Path, final: Mapping[str, Any]) -> dict:
    """What compressed this run: its task and method, the pruning or quantization settings, and the
    counts its ``final_metrics.json`` records (sparsity, parameters, packed size)."""
    task = config.get("task", "teacher")
    distill = config.get("distill") or {}
    out: dict[str, Any] = {"task": task, "method": distill.get("method") if task != "teacher" else None}
    if task == "distill":
        out["teacher_workdir"] = distill.get("teacher_workdir")
    if task == "prune_unstructured":
        out.update(rounds=config.prune.rounds, rate=config.prune.rate)
        out["note"] = (
            "each conv kernel is stored as a bitmask of its non-zeros and their float32 values (weights."
            "storage 'sparse_bitmask'); the loader rebuilds the dense kernels, which the functions take"
        )
    if task == "prune_structured":
        out.update(ratio=config.prune.ratio, pattern=list(config.prune.pattern))
        out["model_json"] = _read_json(workdir / "model.json")
    bits = quant_bits_of(config)
    if bits:
        s = scheme(bits)
        out["quantization"] = {
            "bits": bits,
            "scheme": s.label,
            "weight_qtype": s.weight_qtype,
            "act_qtype": s.act_qtype,
            "source_workdir": config.quant.get("source_workdir", ""),
            "note": "each conv kernel is stored as qwix's integer values (weights.storage) and float32 "
            "per-output-channel scales, dequantized inside the functions, which run qwix's quantized forward "
            "on them; the Dense head's kernel, biases and BatchNorm are float32 (qwix's backward pass "
            "through the head uses its float kernel)",
        }
    counts = {k: v for k, v in final.items() if k not in ("val", "rows", "rounds", "step")}
    if counts:
        out["final_metrics"] = counts
    return out


def val_metrics(run_dir: Path, which: str, step: int) -> dict[str, Any]:
    """The val metrics ``final_metrics.json`` records for the exported checkpoint: its row (``'val, best
    (step N)'`` or ``'val, last (step N)'``), else the last state's; ``MissingFileError`` for a run that
    has not finished."""
    path = run_dir / "final_metrics.json"
    if not path.is_file():
        raise MissingFileError(
            f"{path} does not exist, so the run has not finished; let it finish (train.py resumes it) "
            "before exporting it."
        )
    final = json.loads(path.read_text())
    row = f"val, {'best' if which == 'best' else 'last'} (step {step})"
    if row in final.get("rows", {}):
        return {"row": row, "metrics": final["rows"][row]}
    return {"row": f"val, last state (step {final.get('step')})", "metrics": final.get("val", {})}


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuses an existing ``out_dir``, unless ``overwrite`` and it is an export or empty (so that a
    mistyped --out never deletes anything else)."""
    if not out_dir.exists():
        return
    if not overwrite:
        raise ConfigError(
            f"{out_dir} already exists; pass --overwrite to replace it, or choose another --out."
        )
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        return
    try:
        read_meta(out_dir)
    except ConfigError:
        raise ConfigError(
            f"{out_dir} exists and is not an apjax export, so --overwrite does not replace it; choose "
            "another --out."
        ) from None


def _write_folder(out_dir: Path, files: Mapping[str, bytes], meta: dict, overwrite: bool) -> None:
    """Writes ``files`` and ``meta.json`` into a temporary folder beside ``out_dir`` and renames it into
    place (an existing export is moved aside first and deleted after)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        meta["files"] = {name: (tmp / name).stat().st_size for name in files}
        write_json_atomic(tmp / META_FILE, meta)
        _check_out_dir(out_dir, overwrite)  # again: another process may have written it meanwhile
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _weights_file(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


# What the two functions take and give, as meta.json says it.
FUNCTIONS = {
    "predict": {
        "file": PREDICT_FILE,
        "inputs": "weights, images uint8 (B, H, W, 3)",
        "outputs": "logits float32 (B, K)",
    },
    "explain": {
        "file": EXPLAIN_FILE,
        "inputs": "weights, images uint8 (B, H, W, 3)",
        "outputs": "logits float32 (B, K), Grad-CAM maps float32 (B, H, W) of the top-1 class",
    },
}


def input_meta(size: int) -> dict[str, Any]:
    """What the functions take: uint8 RGB images of ``size x size``, and how they were normalised."""
    return {
        "height": size,
        "width": size,
        "channels": 3,
        "dtype": "uint8",
        "color": "RGB",
        "resize": "the whole image to height x width, aspect not kept, bilinear (antialiased when "
        "shrinking, as PIL's BILINEAR), as the eval resizes",
        "normalization": {
            "scale": 255.0,
            "mean": list(MEAN),
            "std": list(STD),
            "formula": "(pixel / scale - mean) / std, per channel, inside the functions",
        },
    }


def weights_meta(stored: StoredWeights, file_bytes: int) -> dict[str, Any]:
    """The weight file: its storage form, the variables (names, shapes, storage and bytes dense and as
    stored, in jax's flattening order), the functions' arguments in order (name, shape, dtype, how the
    file holds it), the counts of values and trainable parameters and the bytes of each form."""
    names, arrays = stored.names, stored.arrays
    return {
        "file": WEIGHTS_FILE,
        "storage": stored.storage,
        "dtype": "float32",
        "count": int(sum(a.size for a in arrays)),
        "params": int(sum(a.size for n, a in zip(names, arrays, strict=True) if n.startswith("params/"))),
        "bytes": int(sum(a.nbytes for a in arrays)),
        "stored_bytes": int(sum(r["stored_bytes"] for r in stored.rows)),
        "file_bytes": int(file_bytes),
        "arrays": stored.rows,
        "arguments": [
            {"name": n, "shape": list(a.shape), "dtype": str(a.dtype), "stored_as": how}
            for n, a, how in stored.arguments
        ],
    }


def _restore(workdir: Path, checkpoint: str):
    """(config, the folder holding the checkpoints, model, eval-mode variables, checkpoint meta)."""
    config = load_workdir_config(workdir)
    if config.get("task") == "experiment":
        runs = sorted(p.name for p in workdir.iterdir() if (p / "final_metrics.json").is_file())
        example = "teacher" if "teacher" in runs or not runs else runs[0]
        raise ConfigError(
            f"{workdir} is a sweep's folder, not a run; export one of its {len(runs)} finished runs, e.g. "
            f"--workdir {workdir / example}."
        )
    run_dir = checkpoint_workdir(config, workdir)
    if not (run_dir / "checkpoints" / checkpoint).is_dir():  # before Orbax, which would create it
        raise MissingFileError(
            f"{run_dir} has no {checkpoint} checkpoint; train first (train.py --workdir {workdir})."
        )
    model, state, ckpt = restore_state(config, workdir, checkpoint)
    return config, run_dir, model, {"params": state.params, "batch_stats": state.batch_stats}, dict(ckpt)


def export_run(
    workdir: str | os.PathLike,
    out_dir: str | os.PathLike,
    checkpoint: str = "best",
    overwrite: bool = False,
    platforms=PLATFORMS,
) -> dict[str, Any]:
    """Exports the ``checkpoint`` ('best' or 'latest') of the finished run in ``workdir`` to ``out_dir``.

    Refuses an existing ``out_dir`` unless ``overwrite`` (and then replaces only an earlier export or an
    empty folder). ``meta.json`` holds the format version, the classes, the input size and
    normalisation, the model (family, ``config.model``, Grad-CAM layer, precision), the compression (task,
    method, pruning or quantization settings), the source workdir, checkpoint and step, the run's val
    metrics of that checkpoint from ``final_metrics.json``, the weights (storage, names, shapes, bytes) and
    the size of each file. Returns the meta.
    """
    workdir, out_dir = Path(workdir).expanduser().absolute(), Path(out_dir).expanduser().absolute()
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"unknown checkpoint {checkpoint!r}; choose one of {list(CHECKPOINTS)}.")
    _check_out_dir(out_dir, overwrite)
    check_serialization()
    config, run_dir, model, variables, ckpt = _restore(workdir, checkpoint)
    step = int(ckpt["step"])
    metrics = val_metrics(run_dir, checkpoint, step)
    size = int(config.data.image_size)
    task = config.get("task", "teacher")
    bits = quant_bits_of(config)
    predict, explain, stored = export_functions(model, variables, size, platforms, task, bits)
    weights_file = _weights_file(stored.files)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "platforms": list(platforms),
        "functions": FUNCTIONS,
        "classes": _classes(config),
        "input": input_meta(size),
        "model": {
            "family": family_of(model).name,
            "config_model": config.model,
            "gradcam_tap": gradcam_tap(model),
            "precision": config.precision,
            "multi_label": "sigmoid of each logit is that class's probability",
        },
        "compression": compression(config, run_dir, _read_json(workdir / "final_metrics.json")),
        "source": {
            "workdir": str(workdir),
            "checkpoint": checkpoint,
            "step": step,
            "checkpoint_dir": str(run_dir / "checkpoints" / checkpoint),
            **{k: ckpt[k] for k in ("epoch", "best_metric", "best_value") if k in ckpt},
        },
        "val_metrics": metrics,
        "weights": weights_meta(stored, len(weights_file)),
    }
    files = {PREDICT_FILE: predict, EXPLAIN_FILE: explain, WEIGHTS_FILE: weights_file}
    _write_folder(out_dir, files, meta, overwrite)
    return meta
