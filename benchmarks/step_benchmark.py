"""Step benchmark (issue 8, "Speed"): images/s, compile time and memory of apjax's jitted steps.

GPU, the paper's sizes (VGG16 teacher, students VGG16/2, /4, /8, 227x227, batch 64 and 256, fp32 and
bf16); ``--isolate`` runs every case in a process of its own, so that each peak memory is the case's own:

    python -m benchmarks.step_benchmark --isolate --out step_benchmark.json

The whole grid (64 cases) takes longer than one 10-minute call on a lent machine: split it there, e.g.
``--precisions bf16 --batch-sizes 64`` per call, or ``--cases teacher_forward,kd_swa --students x8``.

CPU (64x64, batch 8, student /8, fp32, 3 timed steps, 16 localisation images; a few minutes on 2 cores,
mostly compiling; add ``--precisions fp32,bf16`` for the bf16 cases too, which about doubles it; timings
drift with other load on the host, whose load average the JSON records):

    python -m benchmarks.step_benchmark --cpu-small --out cpu_small.json

Every case is the project's own jitted function, built the way training builds it, with its on-device
augmentation; nothing is trained (the weights come from ``init_variables``). The cases are in ``CASES``:

- ``teacher_forward``: the teacher in eval mode (``make_eval_step``), the ceiling every other
  case is compared with (``x fwd`` = the case's images/s over the forward's, same precision and batch;
  for a training case the forward is timed again in alternation with the case's own steps, so that
  drifting load on the host cancels out of the ratio; ``--unpaired`` turns that off);
- ``teacher_train``: the teacher's SGD step with BCE (``make_train_step``);
- ``kd[s]``, ``kd_swa[s]``, ``kd_sswa[s]``: ``distill.make_distill_step`` from the VGG16 teacher to
  student ``s`` (x2, x4, x8) with plain logit KD, KD + SWA and KD + SSWA matching (the paper's config:
  post-pool tap, beta 100, the reference's fixed-count channel drop 0.3);
- ``kd_sswa_cached[s]``: the same KD + SSWA step without the teacher (``make_cached_distill_step``): the
  teacher's logits, tap activations and channel weights come with the batch, as from the teacher cache
  (``distill.teacher_cache``; random bfloat16 values here); ``teacher_cache_build``: one batch of the pass
  that builds that cache (the draw's crops, the teacher's outputs, cast to bfloat16);
- ``kd_bb_gradcam_cached[s]``, ``kd_bb_input_grad_cached[s]``: a black-box teacher
  (``distill.teacher_access = 'blackbox'``): KD plus the student's Grad-CAM or input-gradient map against
  the teacher's cached 16 x 16 RISE map (random bfloat16 values here); ``teacher_cache_build_rise``: one
  batch of the pass that builds that cache, the teacher's logits and RISE map (N + 1 forward passes per
  image; below 128 px the small configs' 128 masks, else 1000);
- ``prune_ft_sswa``: the unstructured-pruning fine-tune step (``make_distill_step`` with a BCE base loss,
  masks in the train state, SSWA matching against the unpruned teacher) at the paper's last sparsity;
- ``loc[m]``: localisation evaluation of the teacher with attribution method ``m``, as ``eval.py`` does
  it per batch of (image, class) pairs: ``attribution_fn`` maps, resized to the input, then per-pixel
  AUC and the pointing game (class and the reference's cumulative variant) on the host, over the
  synthetic segmentation split.

Data sources: ``random`` is a few uint8 batches in the host-cache layout (images (B, S, S, 3), original
sizes, multi-hot labels) placed on the devices beforehand and used in turn; ``pipeline`` is the real input
path, ``TrainBatches`` over a ``HostCache`` of the synthetic benchmark, iterated with prefetch; the time of
a pipeline step runs from the end of the previous step to the end of this one, so it includes any wait for
data; ``resident`` is the same with the training split held on the devices (``config.data.on_device``), each
batch gathered there.

Method: each case is lowered and compiled ahead of time first (``compile s`` is that, lowering included;
the step's first real call then reuses the executable), then warmed up, then ``--steps`` steps are timed
one by one, each ended by ``block_until_ready``; the table gives the median. Memory: the compiled
program's own analysis (temporaries, arguments, outputs) on every backend, and the device's
``peak_bytes_in_use`` where the backend reports it (GPU, not CPU): a high-water mark of the whole process,
so it is the case's own peak only with ``--isolate``. The bf16 check: the count of convolutions and dot
products by operand dtype in the lowered program (``convs`` column; all should be bf16 in bf16 mode).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from apjax.compress import distill, teacher_cache
from apjax.compress.blackbox import forward_passes
from apjax.compress.matching import MATCHING_MAPS, is_blackbox
from apjax.data.pipeline import DeviceCache, TrainBatches, batch_sharding, data_mesh
from apjax.models import create_model, init_variables
from apjax.tasks.teacher import make_train_step
from apjax.trainer.config import PRECISIONS as DTYPES
from apjax.trainer.config import build_model
from apjax.trainer.evaluation import make_eval_step
from apjax.trainer.files import write_json_atomic, write_text_atomic
from apjax.trainer.optim import create_learning_rate_fn, create_optimizer
from apjax.trainer.state import create_train_state, mask_params
from configs import teacher_vgg16, vgg16_kd

PRECISIONS = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
SHORT = {"float32": "fp32", "bfloat16": "bf16"}
TEACHER_SEED = 1
# shared/DEVICE.md: the reference PyTorch code on one H100, 227x227, random data (bf16 = torch autocast).
REFERENCE_H100 = {
    ("kd_swa[x8]", "float32", 64): 382,
    ("kd_swa[x8]", "bfloat16", 64): 476,
    ("kd_swa[x8]", "float32", 256): 397,
    ("kd_swa[x8]", "bfloat16", 256): 493,
    ("teacher_train", "float32", 64): 855,
    ("teacher_train", "bfloat16", 64): 1082,
}
CPU_SMALL = dict(
    image_size=64,
    cache_size=72,
    batch_sizes="8",
    precisions="fp32",
    students="x8",
    steps=3,
    warmup=1,
    loc_images=16,
    loc_methods="gradcam",
    rotate=2,
)


# ------------------------------------------------------------------------------------------------
# What one case runs.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setting:
    """The sizes shared by the cases of one (precision, batch size) combination."""

    precision: str  # 'float32' | 'bfloat16'
    batch_size: int
    image_size: int
    cache_size: int
    teacher: str
    num_classes: int


@dataclasses.dataclass
class Workload:
    """A jitted step ready to run.

    Attributes:
      jitted: the ``jax.jit`` function (lowered and compiled ahead of time for compile time and memory).
      carry: what is threaded from step to step (a train state) or held fixed (eval variables).
      call: (carry, batch) -> (new carry, output); the real call of the step.
      args: (carry, batch) -> the jitted function's positional arguments.
      config: what the JSON records about the case.
    """

    jitted: Any
    carry: Any
    call: Callable[[Any, dict], tuple[Any, Any]]
    args: Callable[[Any, dict], tuple]
    config: dict


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _teacher(s: Setting, mesh: Mesh):
    """The VGG16 teacher computing in the setting's precision (float32 weights), as load_teacher makes it."""
    model = create_model(s.teacher, num_classes=s.num_classes, dtype=DTYPES[s.precision])
    variables = init_variables(model, jax.random.key(TEACHER_SEED), s.image_size)
    return model, jax.device_put(variables, _replicated(mesh))


def _sized(c, s: Setting):
    c.precision, c.batch_size = s.precision, s.batch_size
    c.data.image_size, c.data.cache_size = s.image_size, s.cache_size
    return c


def _optimizer(c):
    lr_fn = create_learning_rate_fn(c, steps_per_epoch=100)
    return lr_fn, create_optimizer(c, lr_fn)


def _param_dtypes(state) -> list[str]:
    return sorted({str(x.dtype) for x in jax.tree.leaves(state.params)})


def _summary(c) -> dict:
    out = {
        "task": c.task,
        "model": c.model,
        "precision": c.precision,
        "dropout_rate": c.dropout_rate,
        "crop_scale": list(c.data.crop_scale),
        "optimizer": dict(c.optimizer),
    }
    if c.get("prune") is not None:
        out["prune"] = dict(c.prune)
    if c.get("distill") is not None:
        d = c.distill
        out["distill"] = {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in d.to_dict().items()
            if k not in ("teacher_workdir", "teacher_checkpoint")
        }
    return out


def build_teacher_forward(s: Setting, mesh: Mesh, variant: str | None) -> Workload:
    model, variables = _teacher(s, mesh)
    step = make_eval_step(model, s.image_size, mesh)
    return Workload(
        jitted=step,
        carry=variables,
        call=lambda v, b: (v, step(v["params"], v["batch_stats"], b["images"], b["extents"])),
        args=lambda v, b: (v["params"], v["batch_stats"], b["images"], b["extents"]),
        config={"model": s.teacher, "precision": s.precision, "mode": "eval", "step": "make_eval_step"},
    )


def build_teacher_train(s: Setting, mesh: Mesh, variant: str | None) -> Workload:
    c = _sized(teacher_vgg16.get_config(), s)
    c.model = s.teacher
    lr_fn, tx = _optimizer(c)
    model = build_model(c, s.num_classes)
    crop = tuple(c.data.crop_scale)
    step = make_train_step(model, tx, lr_fn, s.image_size, mesh, crop_scale=crop)
    state = jax.device_put(create_train_state(c, model, tx), _replicated(mesh))
    config = {**_summary(c), "param_dtypes": _param_dtypes(state)}
    return Workload(step, state, lambda st, b: step(st, b), lambda st, b: (st, b), config)


def build_distill(method: str) -> Callable[[Setting, Mesh, str | None], Workload]:
    """The builder of ``make_distill_step`` cases for one method (``kd``, ``swa``, ``sswa``, ``ewa``)."""

    def build(s: Setting, mesh: Mesh, student: str | None) -> Workload:
        c = _sized(vgg16_kd.get_config(f"student={student},method={method}"), s)
        lr_fn, tx = _optimizer(c)
        student_model = build_model(c, s.num_classes)
        teacher, teacher_vars = _teacher(s, mesh)
        step = distill.make_distill_step(student_model, teacher, tx, lr_fn, c, mesh)
        state = jax.device_put(create_train_state(c, student_model, tx), _replicated(mesh))
        config = {**_summary(c), "teacher": s.teacher, "param_dtypes": _param_dtypes(state)}
        return Workload(
            step,
            state,
            lambda st, b: step(st, teacher_vars, b),
            lambda st, b: (st, teacher_vars, b),
            config,
        )

    return build


def build_distill_cached(method: str) -> Callable[[Setting, Mesh, str | None], Workload]:
    """The builder of ``make_cached_distill_step`` cases: the same student, loss and update as
    :func:`build_distill`'s, the teacher's outputs read from the batch (random bfloat16 values of the
    cache's shapes, placed on the devices beforehand like the images) instead of computed."""

    def build(s: Setting, mesh: Mesh, student: str | None) -> Workload:
        c = _blackbox_ready(_sized(vgg16_kd.get_config(f"student={student},method={method}"), s), s)
        c.distill.teacher_cache = 4
        lr_fn, tx = _optimizer(c)
        student_model = build_model(c, s.num_classes)
        teacher, teacher_vars = _teacher(s, mesh)
        spec, taps = MATCHING_MAPS.get(method), tuple(c.distill.taps)
        shapes = teacher_cache.output_shapes(c, teacher, teacher_vars, spec, taps)
        rng = np.random.default_rng(1)
        host = {k: rng.normal(size=(s.batch_size, *v)).astype(ml_dtypes.bfloat16) for k, v in shapes.items()}
        cached = jax.device_put(host, batch_sharding(mesh))
        step = distill.make_cached_distill_step(student_model, tx, lr_fn, c, mesh)
        state = jax.device_put(create_train_state(c, student_model, tx), _replicated(mesh))
        config = {**_summary(c), "teacher": s.teacher, "param_dtypes": _param_dtypes(state)}
        config["cached_bytes_per_image"] = int(sum(np.prod(v) * 2 for v in shapes.values()))
        draw = jax.device_put(np.full(s.batch_size, 1, np.int32), batch_sharding(mesh))
        args = lambda st, b: (st, None, {**b, "draw": draw, "teacher": cached})  # noqa: E731
        return Workload(step, state, lambda st, b: step(*args(st, b)), args, config)

    return build


def _blackbox_ready(c, s: Setting):
    """``c`` with ``teacher_access = 'blackbox'`` when its method matches a black-box teacher's map; below
    128 px with the small configs' RISE (128 masks of a 4 x 4 grid, p = 0.5), else RISE's 1000 masks."""
    if is_blackbox(c.distill.method):
        c.distill.teacher_access = "blackbox"
        if s.image_size < 128:
            c.distill.blackbox.options.update(rise_masks=128, rise_cells=4, rise_keep=0.5, rise_chunk=32)
    return c


def build_cache_pass(method: str) -> Callable[[Setting, Mesh, str | None], Workload]:
    """The builder of one batch of the teacher-cache build for ``method``: the draw's crops and what the
    method stores of the teacher, cast to bfloat16 (``teacher_cache``'s jitted pass): for SSWA the logits,
    tap activations and pooled tap gradients; for a black-box method the logits and the RISE map (N + 1
    teacher forward passes per image)."""

    def build(s: Setting, mesh: Mesh, variant: str | None) -> Workload:
        c = _blackbox_ready(_sized(vgg16_kd.get_config(f"method={method}"), s), s)
        teacher, teacher_vars = _teacher(s, mesh)
        spec, taps = MATCHING_MAPS[method], tuple(c.distill.taps)
        fn = teacher_cache.jitted_outputs(c, teacher, spec, taps, mesh, jnp.bfloat16)
        args = lambda v, b: (v, b["images"], b["sizes"], b["extents"], b["index"], jnp.int32(0))  # noqa: E731
        config = {
            "model": s.teacher,
            "precision": s.precision,
            "step": "teacher_cache pass",
            "taps": list(taps),
        }
        if spec.blackbox:
            size = s.image_size
            config["blackbox"] = {
                **c.distill.blackbox.to_dict(),
                "forward_passes": forward_passes(c.distill, size, size),
            }
        return Workload(fn, teacher_vars, lambda v, b: (v, fn(*args(v, b))), args, config)

    return build


def build_prune_finetune(method: str) -> Callable[[Setting, Mesh, str | None], Workload]:
    """The builder of the unstructured-pruning fine-tune step (BCE + beta * matching, masks in the state).

    The step is the one ``prune_unstructured`` trains with (``make_distill_step`` with a BCE base loss);
    the pruned net is the VGG16 teacher's weights under the masks of round 15 (sparsity 1 - 0.8**15, the
    paper's last), and the matching teacher is the unpruned net in eval mode.
    """

    def build(s: Setting, mesh: Mesh, variant: str | None) -> Workload:
        from apjax.compress import prune
        from apjax.compress.unstructured import global_magnitude_masks, round_sparsity
        from configs import prune_unstructured

        c = _sized(prune_unstructured.get_config(f"method={method}"), s)
        c.model = s.teacher
        lr_fn, tx = _optimizer(c)
        teacher, teacher_vars = _teacher(s, mesh)
        pruned = build_model(c, s.num_classes)
        sparsity = round_sparsity(15, c.prune.rate)
        masks = global_magnitude_masks(teacher_vars["params"], sparsity)
        params = mask_params(teacher_vars["params"], masks)
        key = jax.random.key(c.seed)
        state = prune.fresh_state(params, teacher_vars["batch_stats"], tx, key, masks)
        state = jax.device_put(state, _replicated(mesh))
        step = distill.make_distill_step(pruned, teacher, tx, lr_fn, c, mesh, base_loss="bce")
        config = {**_summary(c), "teacher": s.teacher, "sparsity": sparsity}
        config["param_dtypes"] = _param_dtypes(state)
        return Workload(
            step,
            state,
            lambda st, b: step(st, teacher_vars, b),
            lambda st, b: (st, teacher_vars, b),
            config,
        )

    return build


@dataclasses.dataclass(frozen=True)
class Case:
    """One entry of the registry.

    Attributes:
      kind: 'forward' or 'train' (a :class:`Workload` timed on random and pipeline batches), or
        'localization' (timed by :func:`measure_localization`).
      build: (setting, mesh, variant) -> Workload, for 'forward' and 'train'.
      variants: '' (one case), 'students' (one per ``--students``) or 'methods' (one per ``--loc-methods``).
      doc: one line for ``--help``.
    """

    kind: str
    build: Callable[[Setting, Mesh, str | None], Workload] | None
    variants: str
    doc: str


CASES: dict[str, Case] = {
    "teacher_forward": Case("forward", build_teacher_forward, "", "teacher eval forward, the ceiling"),
    "teacher_train": Case("train", build_teacher_train, "", "teacher SGD step, BCE"),
    "kd": Case("train", build_distill("kd"), "students", "distillation step, logit KD"),
    "kd_swa": Case("train", build_distill("swa"), "students", "distillation step, KD + SWA matching"),
    "kd_sswa": Case("train", build_distill("sswa"), "students", "distillation step, KD + SSWA matching"),
    "kd_sswa_cached": Case(
        "train",
        build_distill_cached("sswa"),
        "students",
        "KD + SSWA step from the teacher cache (no teacher)",
    ),
    "teacher_cache_build": Case(
        "forward", build_cache_pass("sswa"), "", "teacher-cache build pass, KD + SSWA outputs"
    ),
    "kd_bb_gradcam_cached": Case(
        "train",
        build_distill_cached("bb_gradcam"),
        "students",
        "black-box teacher: KD + the student's Grad-CAM against the cached RISE map",
    ),
    "kd_bb_input_grad_cached": Case(
        "train",
        build_distill_cached("bb_input_grad"),
        "students",
        "black-box teacher: KD + the student's input gradient against the cached RISE map",
    ),
    "teacher_cache_build_rise": Case(
        "forward", build_cache_pass("bb_gradcam"), "", "teacher-cache build pass, logits and RISE maps"
    ),
    "prune_ft_sswa": Case(
        "train", build_prune_finetune("sswa"), "", "unstructured-pruning fine-tune step, BCE + SSWA matching"
    ),
    "loc": Case("localization", None, "methods", "localization evaluation of the teacher per method"),
    # A new case: a builder (setting, mesh, variant) -> Workload like the ones above, and a line here.
}


def expand_cases(names: list[str], students: list[str], methods: list[str]) -> list[str]:
    """Case ids (``kd_sswa[x8]``, ``loc[gradcam]``) of the registry names, teacher_forward first."""
    ids = ["teacher_forward"]
    for name in names:
        if name == "teacher_forward":
            continue
        case = CASES[name]
        if case.variants == "students":
            ids += [f"{name}[{s}]" for s in students]
        elif case.variants == "methods":
            ids += [f"{name}[{m}]" for m in methods]
        else:
            ids.append(name)
    return ids


def split_id(case_id: str) -> tuple[str, str | None]:
    name, _, rest = case_id.partition("[")
    return name, (rest[:-1] if rest else None)


# ------------------------------------------------------------------------------------------------
# Measuring.
# ------------------------------------------------------------------------------------------------

_HLO_OP = re.compile(
    r"stablehlo\.(convolution|dot_general)\b[^\n]*?:\s*\(tensor<(?:[0-9?]+x)*([a-z]+[0-9]*)>"
)


def hlo_op_dtypes(text: str) -> dict[str, dict[str, int]]:
    """Counts of convolutions and dot products in a lowered program, by their first operand's dtype."""
    out: dict[str, dict[str, int]] = {"convolution": {}, "dot_general": {}}
    for op, dtype in _HLO_OP.findall(text):
        out[op][dtype] = out[op].get(dtype, 0) + 1
    return out


def memory_analysis(compiled) -> dict | None:
    """The compiled program's own memory figures (bytes), or None where the backend gives none."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if m is None:
        return None
    fields = ("temp", "argument", "output", "alias", "generated_code")
    return {f"{f}_bytes": int(getattr(m, f"{f}_size_in_bytes", 0) or 0) for f in fields}


def peak_bytes_in_use() -> int | None:
    """The largest ``peak_bytes_in_use`` of the local devices, or None where the backend reports none."""
    peaks = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats()
        except Exception:
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def _stats(times: list[float]) -> dict:
    return {
        "steps": len(times),
        "step_s_median": statistics.median(times),
        "step_s_min": min(times),
        "step_s_max": max(times),
    }


def random_batches(s: Setting, mesh: Mesh, count: int, seed: int = 0) -> list[dict]:
    """``count`` random batches in TrainBatches' layout, on the mesh (random values, never zeros)."""
    rng = np.random.default_rng(seed)
    b, side, k = s.batch_size, s.cache_size, s.num_classes
    out = []
    for _ in range(count):
        host = {
            "images": rng.integers(0, 256, (b, side, side, 3), dtype=np.uint8),
            "sizes": rng.integers(side * 3 // 4, 2 * side + 1, (b, 2)).astype(np.int32),
            "extents": np.full((b, 2), side, np.int32),  # a squashed cache's layout: each slot filled
            "labels": (rng.random((b, k)) < 0.15).astype(np.uint8),
            "index": rng.permutation(10 * b)[:b].astype(np.int32),
        }
        out.append(jax.device_put(host, batch_sharding(mesh)))
    return out


def compile_ahead(jitted, args: tuple) -> dict:
    """Lowers and compiles ``jitted`` for ``args``; times, memory analysis and the op dtypes."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return {
        "lower_s": t1 - t0,
        "compile_s": t2 - t0,
        "memory_analysis": memory_analysis(compiled),
        "hlo_ops": hlo_op_dtypes(lowered.as_text()),
    }


def measure_workload(
    w: Workload, s: Setting, args, mesh: Mesh, train_cache, ceiling: Workload | None = None
) -> list[dict]:
    """Rows of one forward/train case: random batches, then (if asked) the real pipeline.

    With a ``ceiling`` (the teacher forward), each timed random-data step is followed by a timed forward
    on the same batch: ``paired_forward_s_median`` is the forward's median over the same minutes.
    """
    batches = random_batches(s, mesh, args.rotate)
    base = compile_ahead(w.jitted, w.args(w.carry, batches[0]))
    rows = []
    carry = w.carry
    w.carry = None  # a donated state must only live in ``carry``
    if "random" in args.sources:
        t = time.perf_counter()
        carry, out = w.call(carry, batches[0])
        jax.block_until_ready((carry, out))
        first = time.perf_counter() - t
        for i in range(1, args.warmup):
            carry, out = w.call(carry, batches[i % len(batches)])
            jax.block_until_ready((carry, out))
        if ceiling is not None:
            for i in range(args.warmup):
                jax.block_until_ready(ceiling.call(ceiling.carry, batches[i % len(batches)]))
        times, paired = [], []
        for i in range(args.steps):
            batch = batches[(args.warmup + i) % len(batches)]
            t = time.perf_counter()
            carry, out = w.call(carry, batch)
            jax.block_until_ready((carry, out))
            times.append(time.perf_counter() - t)
            if ceiling is not None:
                t = time.perf_counter()
                jax.block_until_ready(ceiling.call(ceiling.carry, batch))
                paired.append(time.perf_counter() - t)
        rows.append({**base, "source": "random", "first_call_s": first, **_stats(times)})
        if paired:
            rows[-1]["paired_forward_s_median"] = statistics.median(paired)
    del batches
    for source in [x for x in ("pipeline", "resident") if x in args.sources]:
        resident = DeviceCache(train_cache, mesh) if source == "resident" else None
        it = TrainBatches(train_cache, s.batch_size, seed=0, mesh=mesh, resident=resident)
        times, last = [], time.perf_counter()
        for k, (_, batch) in enumerate(it.iterate(0, args.warmup + args.steps, prefetch=2)):
            carry, out = w.call(carry, batch)
            jax.block_until_ready((carry, out))
            now = time.perf_counter()
            if k >= args.warmup:
                times.append(now - last)
            last = now
        rows.append({**base, "source": source, **_stats(times)})
        if rows[0].get("paired_forward_s_median"):  # the nearest forward timing: the random loop's
            rows[-1]["paired_forward_s_median"] = rows[0]["paired_forward_s_median"]
    for r in rows:
        r["config"] = w.config
        r["images_per_s"] = s.batch_size / r["step_s_median"]
    return rows


def first_class_pairs(masks: np.ndarray, num_classes: int) -> np.ndarray:
    """One (image, class) pair per image: the smallest class present in its mask (P, 2) int64."""
    pairs = []
    for i, m in enumerate(masks):
        present = np.unique(m)
        present = present[(present > 0) & (present <= num_classes)]
        if present.size:
            pairs.append((i, int(present[0]) - 1))
    return np.asarray(pairs, np.int64).reshape(-1, 2)


def _maps_for_pairs(fn, cache, batch_pairs: np.ndarray, size: int, batch_size: int) -> np.ndarray:
    """Maps (P, size, size) of ``fn`` for (image index, class) pairs of a HostCache, padded to a fixed
    batch shape, on one device (see benchmarks/localization_benchmark.py for the sharded evaluator)."""
    from apjax.attribution.maps import upsample_map
    from apjax.data.augment import eval_preprocess

    n = len(batch_pairs)
    idx = np.concatenate([batch_pairs[:, 0], np.repeat(batch_pairs[-1:, 0], batch_size - n)])
    cls = np.concatenate([batch_pairs[:, 1], np.repeat(batch_pairs[-1:, 1], batch_size - n)])
    images = jnp.asarray(cache.images[np.sort(idx)][np.argsort(np.argsort(idx))])
    x = eval_preprocess(images, jnp.asarray(cache.extents[idx]), out_size=size)
    maps = upsample_map(fn(x, jnp.asarray(cls, jnp.int32)), size)
    return np.asarray(maps[:n], np.float32)


def measure_localization(s: Setting, method: str, args, mesh: Mesh, seg, masks: np.ndarray) -> list[dict]:
    """Rows of one localisation case: the per-batch work of a single-device map function (maps, then AUC
    and pointing on the host)."""
    from apjax import localization as loc
    from apjax.attribution.methods import attribution_fn
    from apjax.data.augment import eval_preprocess

    model, variables = _teacher(s, mesh)
    fn = attribution_fn(method, model, variables)
    pairs = first_class_pairs(masks, s.num_classes)
    bs, size = s.batch_size, s.image_size
    chunks = [pairs[i : i + bs] for i in range(0, len(pairs) - bs + 1, bs)]
    if not chunks:
        raise ValueError(f"{len(pairs)} localisation pairs, fewer than a batch of {bs}; raise --loc-images.")

    def device_inputs(chunk):
        x = eval_preprocess(jnp.asarray(seg.images[chunk[:, 0]]), seg.extents[chunk[:, 0]], out_size=size)
        return x, jnp.asarray(chunk[:, 1], jnp.int32)

    x0, c0 = device_inputs(chunks[0])
    base: dict[str, Any] = {"memory_analysis": None, "hlo_ops": None}
    if hasattr(fn, "lower"):
        base = compile_ahead(fn, (x0, c0))
    else:
        base["note"] = "attribution_fn exposes no .lower: compile_s is the first call minus a median call"
    t = time.perf_counter()
    _maps_for_pairs(fn, seg, chunks[0], size, bs)
    first = time.perf_counter() - t
    for i in range(1, args.warmup):
        _maps_for_pairs(fn, seg, chunks[i % len(chunks)], size, bs)
    total, map_s, metric_s = [], [], []
    for i in range(args.steps):
        chunk = chunks[i % len(chunks)]
        t0 = time.perf_counter()
        maps = _maps_for_pairs(fn, seg, chunk, size, bs)
        t1 = time.perf_counter()
        loc.pair_scores(maps, masks, chunk, 0.0)  # the report's AUC and both pointing games
        t2 = time.perf_counter()
        total.append(t2 - t0), map_s.append(t1 - t0), metric_s.append(t2 - t1)
    device = []
    for _ in range(args.steps):
        t = time.perf_counter()
        jax.block_until_ready(fn(x0, c0))
        device.append(time.perf_counter() - t)
    row = {**base, "source": "segmentation_val", "first_call_s": first, **_stats(total)}
    if "compile_s" not in row:
        row["compile_s"] = first - row["step_s_median"]
    row.update(
        images_per_s=bs / row["step_s_median"],
        maps_s_median=statistics.median(map_s),
        metrics_s_median=statistics.median(metric_s),
        device_map_s_median=statistics.median(device),
        device_map_images_per_s=bs / statistics.median(device),
        pairs_available=len(pairs),
        config={"model": s.teacher, "precision": s.precision, "method": method, "pairs_per_image": 1},
    )
    return [row]


# ------------------------------------------------------------------------------------------------
# Data.
# ------------------------------------------------------------------------------------------------


def synthetic_sizes(args) -> dict[str, int]:
    largest = max(args.batch_sizes)
    return {"train": 2 * largest, "val": 8, "segmentation_val": max(args.loc_images, largest)}


def _needs_train(args) -> bool:
    """Whether a source reads the synthetic training cache (``pipeline``, ``resident``)."""
    return bool({"pipeline", "resident"} & set(args.sources))


def load_data(args, data_dir: str, need_train: bool, need_seg: bool) -> dict:
    """The synthetic benchmark's train and segmentation caches at ``--cache-size`` (built on first use)."""
    from apjax.data import load_cached_split
    from apjax.data.pipeline import eval_masks
    from apjax.data.synthetic import SyntheticConfig

    gen = SyntheticConfig(num_classes=args.num_classes, image_size=args.cache_size, seed=0)
    sizes = synthetic_sizes(args)
    out: dict = {}
    if need_train:
        out["train"] = load_cached_split("synthetic", "train", data_dir, args.cache_size, gen, sizes)
    if need_seg:
        seg = load_cached_split("synthetic", "segmentation_val", data_dir, args.cache_size, gen, sizes)
        out["seg"] = seg
        out["masks"] = eval_masks(seg, args.image_size)
    return out


# ------------------------------------------------------------------------------------------------
# Running a plan.
# ------------------------------------------------------------------------------------------------


# The teacher forward timed beside the train cases of the current setting (one compile per setting).
_CEILINGS: dict[Setting, Workload] = {}


def run_case(args, precision: str, batch_size: int, case_id: str, mesh: Mesh, data: dict) -> list[dict]:
    s = Setting(precision, batch_size, args.image_size, args.cache_size, args.teacher, args.num_classes)
    name, variant = split_id(case_id)
    case = CASES[name]
    head = {
        "case": case_id,
        "kind": case.kind,
        "precision": precision,
        "batch_size": batch_size,
        "image_size": args.image_size,
        "cache_size": args.cache_size,
    }
    try:
        with jax.set_mesh(mesh):
            if case.kind == "localization":
                rows = measure_localization(s, variant, args, mesh, data["seg"], data["masks"])
            else:
                w = case.build(s, mesh, variant)
                ceiling = None
                if args.paired and case.kind == "train":
                    if s not in _CEILINGS:
                        _CEILINGS.clear()
                        _CEILINGS[s] = build_teacher_forward(s, mesh, None)
                    ceiling = _CEILINGS[s]
                rows = measure_workload(w, s, args, mesh, data.get("train"), ceiling)
                del w
    except Exception as e:  # an out-of-memory case must not end the run
        traceback.print_exc()
        rows = [{"source": "-", "error": f"{type(e).__name__}: {str(e)[:500]}"}]
    peak = peak_bytes_in_use()
    gc.collect()
    return [{**head, **r, "peak_bytes_in_use": peak} for r in rows]


def child_argv(args, key: str, data_dir: str, out: str) -> list[str]:
    return [
        sys.executable, "-m", "benchmarks.step_benchmark",
        "--image-size", str(args.image_size), "--cache-size", str(args.cache_size),
        "--teacher", args.teacher, "--num-classes", str(args.num_classes),
        "--batch-sizes", ",".join(map(str, args.batch_sizes)),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--rotate", str(args.rotate),
        "--loc-images", str(args.loc_images), "--sources", ",".join(args.sources),
        "--data-dir", data_dir, "--only", key, "--child-out", out,
    ] + ([] if args.paired else ["--unpaired"])  # fmt: skip


def add_fractions(rows: list[dict]) -> None:
    """``fraction_of_forward``: images/s over the teacher forward's at the same precision and batch.

    The forward is the one timed in alternation with the case where there is one (paired), else the
    ``teacher_forward`` row's.
    """
    ceiling = {
        (r["precision"], r["batch_size"]): r["images_per_s"]
        for r in rows
        if r["case"] == "teacher_forward" and r["source"] == "random" and "images_per_s" in r
    }
    for r in rows:
        top = ceiling.get((r["precision"], r["batch_size"]))
        if r.get("paired_forward_s_median"):
            r["fraction_of_forward"] = r["paired_forward_s_median"] / r["step_s_median"]
            r["fraction_basis"] = "paired"
        elif top and "images_per_s" in r:
            r["fraction_of_forward"] = r["images_per_s"] / top
            r["fraction_basis"] = "teacher_forward row"
        else:
            r["fraction_of_forward"] = None
        ref = REFERENCE_H100.get((r["case"], r["precision"], r["batch_size"]))
        r["reference_h100_images_per_s"] = ref if ref and r["image_size"] == 227 else None


def _mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def _convs(r: dict) -> str:
    ops = (r.get("hlo_ops") or {}).get("convolution") or {}
    return " ".join(f"{k}x{v}" for k, v in sorted(ops.items())) or "-"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| case | data | prec | batch | compile s | step ms | images/s | x fwd | peak MiB | temp MiB "
        "| convs | H100 ref img/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['case']} | - | {SHORT[r['precision']]} | {r['batch_size']} | error: {r['error'][:60]} "
                "| | | | | | | |"
            )
            continue
        frac = r.get("fraction_of_forward")
        temp = (r.get("memory_analysis") or {}).get("temp_bytes")
        ref = r.get("reference_h100_images_per_s")
        lines.append(
            f"| {r['case']} | {r['source']} | {SHORT[r['precision']]} | {r['batch_size']} "
            f"| {r['compile_s']:.1f} | {1000 * r['step_s_median']:.1f} | {r['images_per_s']:.1f} "
            f"| {'-' if frac is None else f'{frac:.3f}'} | {_mib(r.get('peak_bytes_in_use'))} | {_mib(temp)} "
            f"| {_convs(r)} | {ref or '-'} |"
        )
    return "\n".join(lines)


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _versions() -> dict:
    import flax
    import jaxlib
    import optax

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
    }


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", default="step_benchmark.json", help="JSON file (a .md table beside it)")
    parser.add_argument("--cpu-small", action="store_true", help=f"CPU preset: {CPU_SMALL}")
    parser.add_argument("--image-size", type=int, default=227)
    parser.add_argument("--cache-size", type=int, default=None, help="cached image side (227 -> 256)")
    parser.add_argument("--batch-sizes", default="64,256", help="global batch sizes, comma separated")
    parser.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (config.precision)")
    parser.add_argument("--teacher", default="vgg16", help="teacher model (vgg16, vgg16/2, ...)")
    parser.add_argument("--students", default="x2,x4,x8", help="distillation students (x2, x4, x8)")
    parser.add_argument(
        "--cases",
        default=",".join(CASES),
        help="registry names to run (teacher_forward always runs):\n"
        + "\n".join(f"  {k}: {c.doc}" for k, c in CASES.items()),
    )
    parser.add_argument(
        "--loc-methods", default="gradcam,excitation_bp,lrp,rap", help="attribution methods of the loc cases"
    )
    parser.add_argument("--loc-images", type=int, default=512, help="images of the localisation split")
    parser.add_argument(
        "--sources", default="random,pipeline", help="random, and pipeline and/or resident (on_device)"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--rotate", type=int, default=3, help="random batches used in turn")
    parser.add_argument("--num-classes", type=int, default=20)
    parser.add_argument("--data-dir", default=None, help="synthetic data folder (default: a temporary one)")
    parser.add_argument("--isolate", action="store_true", help="one process per case (per-case peak memory)")
    parser.add_argument(
        "--unpaired",
        dest="paired",
        action="store_false",
        help="do not time the teacher forward in alternation with each training case",
    )
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # PRECISION:BATCH:CASE_ID (child)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cpu_small:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        for k, v in CPU_SMALL.items():
            if "--" + k.replace("_", "-") not in given:
                setattr(args, k, v)
    if args.cache_size is None:
        args.cache_size = 256 if args.image_size == 227 else args.image_size + args.image_size // 8
    args.batch_sizes = sorted({int(b) for b in str(args.batch_sizes).split(",") if b})
    args.precisions = [PRECISIONS[p.strip()] for p in args.precisions.split(",") if p.strip()]
    args.students = [s.strip() for s in str(args.students).split(",") if s.strip()]
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    args.loc_methods = [m.strip() for m in args.loc_methods.split(",") if m.strip()]
    args.sources = [x.strip() for x in args.sources.split(",") if x.strip()]
    unknown = [c for c in args.cases if c not in CASES]
    bad_students = [s for s in args.students if s not in vgg16_kd.STUDENTS]
    bad_sources = [x for x in args.sources if x not in ("random", "pipeline", "resident")]
    if unknown or bad_students or bad_sources or "random" not in args.sources:
        parser.error(
            f"unknown cases {unknown}, students {bad_students} or sources {bad_sources} "
            f"(cases: {list(CASES)}; students: {list(vgg16_kd.STUDENTS)}; sources must include random)"
        )
    if args.steps < 1 or args.warmup < 1 or args.rotate < 1:
        parser.error("--steps, --warmup and --rotate must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    mesh = data_mesh()
    if args.only:  # a child of --isolate: one case, rows to --child-out
        precision, batch, case_id = args.only.split(":", 2)
        name = split_id(case_id)[0]
        data = load_data(
            args, args.data_dir, _needs_train(args) and CASES[name].kind != "localization",
            CASES[name].kind == "localization",
        )  # fmt: skip
        rows = run_case(args, precision, int(batch), case_id, mesh, data)
        write_json_atomic(args.child_out, rows)
        return

    ids = expand_cases(args.cases, args.students, args.loc_methods)
    plan = [(p, b, c) for p in args.precisions for b in args.batch_sizes for c in ids]
    need_seg = any(CASES[split_id(c)[0]].kind == "localization" for c in ids)
    own_dir = args.data_dir is None
    data_dir = tempfile.mkdtemp(prefix="apjax_step_benchmark_") if own_dir else args.data_dir
    started, load_start = time.perf_counter(), _loadavg()
    try:
        data = load_data(args, data_dir, _needs_train(args), need_seg)
        rows: list[dict] = []
        for precision, batch, case_id in plan:
            print(f"== {case_id} {SHORT[precision]} batch {batch}", flush=True)
            if args.isolate:
                with tempfile.TemporaryDirectory() as tmp:
                    out = os.path.join(tmp, "rows.json")
                    key = f"{precision}:{batch}:{case_id}"
                    proc = subprocess.run(child_argv(args, key, data_dir, out), check=False)
                    if proc.returncode == 0 and os.path.exists(out):
                        rows += json.loads(Path(out).read_text())
                    else:
                        rows.append(
                            {
                                "case": case_id, "precision": precision, "batch_size": batch,
                                "image_size": args.image_size, "source": "-",
                                "error": f"the case's process ended with code {proc.returncode}",
                            }
                        )  # fmt: skip
            else:
                rows += run_case(args, precision, batch, case_id, mesh, data)
    finally:
        if own_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
    add_fractions(rows)
    table = markdown_table(rows)
    settings = {k: v for k, v in vars(args).items() if k not in ("only", "child_out")}
    report = {
        "benchmark": "apjax.steps",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device_kind": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
        "host": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_1min_start_end": [load_start, _loadavg()],  # other work on the host skews timings
        },
        "versions": _versions(),
        "settings": settings,
        "wall_s": round(time.perf_counter() - started, 1),
        "notes": [
            "images_per_s = batch_size / step_s_median; fraction_of_forward = images_per_s over the teacher "
            "forward's at the same precision and batch size: for training cases the forward timed in "
            "alternation with the case's own steps (paired_forward_s_median, so that drifting load on the "
            "host cancels), else the teacher_forward row's.",
            "compile_s: ahead-of-time lower + compile of the step (the first real call then reuses it: "
            "first_call_s).",
            "peak_bytes_in_use: the device's high-water mark of the whole process after the case (per case "
            "only with --isolate); None where the backend reports no memory statistics (CPU).",
            "memory_analysis: XLA's figures for the compiled program (temporaries, arguments, outputs, "
            "aliased i.e. donated bytes).",
            "hlo_ops: convolutions and dot products in the lowered program by first-operand dtype.",
            "loc rows: images_per_s = pairs/s of eval.py's per-batch work (maps + AUC + pointing); "
            "maps_s_median and metrics_s_median split it; device_map_* times attribution_fn alone.",
            "reference_h100_images_per_s: the reference PyTorch code on one H100 (shared/DEVICE.md).",
        ],
        "rows": rows,
        "table_markdown": table,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, report)
    write_text_atomic(out.with_suffix(".md"), table + "\n")
    print(f"\napjax step benchmark on {report['device_kind']} ({report['backend']}), written to {out}\n")
    print(table)


if __name__ == "__main__":
    main()
