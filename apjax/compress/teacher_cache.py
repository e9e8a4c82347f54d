"""Distillation without the live teacher: the teacher's outputs on every training crop, computed once.

``config.distill.teacher_cache = E`` (0: the live teacher). Before training, one pass computes for every
training image i and each draw e < D = min(E, num_epochs) what the loss needs from the frozen teacher on
that image's crop and flip of draw e (keyed on ``(seed, i, e)``, :func:`apjax.data.augment.draw_augment`):

- ``logits`` (K,): KD's target and the top-1 class k that seeds the maps;
- for a matching method, at each tap of ``distill.taps``: ``acts/<tap>`` the activations (h, w, C), and
  when its map needs gradients ``grads/<tap>``: d logit_k / d A, spatially summed to (1, 1, C) when the map
  reads them only through that sum (SWA and SSWA: the channel weights u_c), else whole;
- for a black-box method (``distill.teacher_access = 'blackbox'``, :mod:`apjax.compress.blackbox`): ``map``
  (r, r), the teacher's RISE or occlusion map for class k, from its logits alone (N or P forward passes per
  image and draw, batched on the device).

The training step of epoch n reads draw n mod E of its images, regenerates the same crop for the student
and computes the teacher's map from the stored arrays, SSWA's channel mask drawn afresh every step; the
teacher never runs. Arrays are ``.npy`` memory maps (bfloat16, float16 or float32, ``teacher_cache_dtype``)
under one directory whose ``meta.json`` names the teacher (a hash of its weights), the data (a hash of the
split's labels and sizes) and the settings; a directory built from anything else is refused. The build
writes into ``<dir>.incomplete`` chunk by chunk (an interrupted build resumes) and renames it into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from apjax.attribution.maps import channel_weights
from apjax.compress import blackbox
from apjax.compress.matching import MATCHING_MAPS, MatchingMap, is_blackbox, maps_at_taps
from apjax.data.augment import draw_augment
from apjax.data.cache import HostCache
from apjax.data.pipeline import TrainBatches, batch_sharding
from apjax.errors import ConfigError
from apjax.models import apply_with_taps, tap_gradients, top1_seed
from apjax.trainer.files import sync_processes, write_json_atomic

CACHE_DTYPES = ("bfloat16", "float16", "float32")
FORMAT = 1


def draw_key(seed: int) -> jax.Array:
    """The base key of the per-image augmentation draws of a run with ``config.seed``."""
    return jax.random.fold_in(jax.random.key(seed), 0x7EAC)


def num_draws(config: ml_collections.ConfigDict) -> int:
    """D = min(E, num_epochs): epoch n reads draw n mod E, so draws past the last epoch are never read."""
    return min(int(config.distill.teacher_cache), int(config.num_epochs))


# ------------------------------------------------------------------------------------------------
# The teacher's outputs and the maps made from them (shared by the live and the cached path).
# ------------------------------------------------------------------------------------------------


def _float(x: jax.Array) -> jax.Array:
    """At least float32 (a bfloat16 or float16 cache is read in float32; float64 stays float64)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def teacher_outputs(
    teacher, variables, x: jax.Array, spec: MatchingMap | None, taps, d: Any = None
) -> dict[str, jax.Array]:
    """What the loss needs from the teacher on images ``x`` (B, H, W, 3), eval mode: ``logits`` (B, K) and,
    with a matching ``spec``, ``acts/<tap>`` (B, h, w, C) and ``grads/<tap>`` (B, 1, 1, C) summed over
    space when ``spec.pooled_gradients``, else (B, h, w, C); with a black-box ``spec``, ``map`` (B, r, r)
    from the teacher's logits alone (:func:`apjax.compress.blackbox.teacher_map`, settings from ``d``, the
    ``config.distill`` block)."""
    if spec is None:
        return {"logits": teacher.apply(variables, x)}
    if spec.blackbox:
        return blackbox.teacher_map(lambda images: teacher.apply(variables, images), x, d)
    if spec.needs_gradients:
        logits, acts, grads, _ = tap_gradients(teacher, variables, x, top1_seed, taps)
    else:
        (logits, acts, _), grads = apply_with_taps(teacher, variables, x, taps), None
    out = {"logits": logits, **{f"acts/{t}": acts[t] for t in taps}}
    if grads is not None:
        pool = spec.pooled_gradients  # u_c = the spatial sum, as channel_weights computes it
        out.update(
            {f"grads/{t}": channel_weights(grads[t])[:, None, None] if pool else grads[t] for t in taps}
        )
    return out


def teacher_side(
    outputs: Mapping[str, jax.Array], spec: MatchingMap | None, taps, d: ml_collections.ConfigDict, key
) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
    """``(logits (B, K), maps tap -> (B, h, w), masks tap -> (1 or B, C))`` from :func:`teacher_outputs`
    (live, or read from a cache in any float dtype): the teacher's half of the loss, constants. SSWA's
    masks come from ``key``."""
    logits = jax.lax.stop_gradient(_float(outputs["logits"]))
    if spec is None:
        return logits, {}, {}
    if spec.blackbox:  # the stored map, matched by the student's maps of any name
        return logits, {"map": jax.lax.stop_gradient(_float(outputs["map"]))}, {}
    acts = {t: _float(outputs[f"acts/{t}"]) for t in taps}
    grads = {t: _float(outputs[f"grads/{t}"]) for t in taps} if spec.needs_gradients else None
    masks = spec.teacher_masks(key, acts, d) if spec.teacher_masks else {}
    maps = maps_at_taps(spec, acts, grads, masks)
    return logits, jax.tree.map(jax.lax.stop_gradient, maps), masks


# ------------------------------------------------------------------------------------------------
# The cache on disk.
# ------------------------------------------------------------------------------------------------


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(jax.device_get(a)))
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def cache_meta(config, teacher_vars, train: HostCache, shapes: Mapping[str, tuple]) -> dict[str, Any]:
    """What a cache is built from: the teacher (a hash of its weights), the data, the draws and settings."""
    d = config.distill
    extra = {}
    if is_blackbox(d.method):
        extra["blackbox"] = {
            "map": d.blackbox.map,
            "options": dataclasses.asdict(blackbox.blackbox_options(d)),
        }
    return {
        "format": FORMAT,
        "teacher": _digest(*jax.tree.leaves(teacher_vars)),
        "data": _digest(train.labels, train.sizes, train.extents) + f"-{config.data.dataset}-{len(train)}",
        "seed": int(config.seed),
        "draws": num_draws(config),
        "image_size": int(config.data.image_size),
        "crop_scale": [float(s) for s in config.data.crop_scale],
        "precision": config.precision,
        "dtype": d.get("teacher_cache_dtype", "bfloat16"),
        "fields": {k: list(v) for k, v in shapes.items()},
        **extra,
    }


def default_cache_dir(config, meta: Mapping[str, Any]) -> Path:
    """``<teacher_workdir>/teacher_cache/<settings hash>``: runs with the same settings share one cache.
    The teacher and data hashes are left out of the name, so a retrained teacher meets its old cache and
    is refused rather than silently given a second one."""
    if config.distill.get("teacher_cache_dir"):
        return Path(os.path.expanduser(config.distill.teacher_cache_dir))
    settings = {k: v for k, v in meta.items() if k not in ("teacher", "data")}
    name = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return (
        Path(os.path.expanduser(config.distill.teacher_workdir))
        / "teacher_cache"
        / f"D{meta['draws']}_{name}"
    )


def _check_meta(directory: Path, meta: Mapping[str, Any]) -> bool:
    """True when ``directory`` holds a cache of ``meta``; ``ConfigError`` when it holds another one."""
    path = directory / "meta.json"
    if not path.exists():
        return False
    found = json.loads(path.read_text())
    if found == dict(meta):
        return True
    what = [k for k in meta if found.get(k) != meta[k]] or ["format"]
    raise ConfigError(
        f"the teacher cache in {directory} was built from another {' and '.join(what)} than this run's; "
        f"delete it (rm -r {directory}) to rebuild it, or set config.distill.teacher_cache_dir elsewhere."
    )


def _storage(dtype: str):
    """(numpy dtype stored in the .npy files, dtype read back): bfloat16 is stored as its uint16 bits."""
    return (np.uint16, ml_dtypes.bfloat16) if dtype == "bfloat16" else (np.dtype(dtype), np.dtype(dtype))


class TeacherCache:
    """A built cache: ``fields[name]`` memory-mapped (N, D, *shape) arrays; :meth:`gather` reads a batch."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / "meta.json").read_text())
        _, self.dtype = _storage(self.meta["dtype"])
        self.draws = int(self.meta["draws"])
        self.fields = {
            name: np.load(self.directory / f"{name.replace('/', '__')}.npy", mmap_mode="r")
            for name in self.meta["fields"]
        }

    def gather(self, index: np.ndarray, draw: int) -> dict[str, np.ndarray]:
        """The stored outputs of images ``index`` (B,) at ``draw``: name -> (B, *shape) in the cache dtype."""
        return {name: np.asarray(a[index, draw]).view(self.dtype) for name, a in self.fields.items()}

    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.fields.values()))


def output_shapes(config, teacher, teacher_vars, spec, taps) -> dict[str, tuple]:
    """The per-image shape of each stored output (:func:`teacher_outputs` on one image)."""
    size = config.data.image_size
    x = jax.ShapeDtypeStruct((1, size, size, 3), teacher.dtype)
    d = config.distill
    out = jax.eval_shape(lambda v, x: teacher_outputs(teacher, v, x, spec, taps, d), teacher_vars, x)
    return {k: tuple(v.shape[1:]) for k, v in out.items()}


def build_teacher_cache(
    config, teacher, teacher_vars, train: HostCache, mesh: Mesh, chunk: int | None = None
):
    """The run's :class:`TeacherCache`, built first if needed (resuming an interrupted build); see the module
    docstring. ``ConfigError`` when its directory holds a cache of another teacher, dataset or setting.

    ``chunk`` images are computed at a time, by default ``config.batch_size``: each device then holds the
    batch share the training step gives it, so the stored outputs are the live step's to the last bit (on
    XLA:CPU a convolution's rounding depends on the per-device batch)."""
    chunk = chunk or config.batch_size
    d = config.distill
    spec, taps = MATCHING_MAPS.get(d.method), tuple(d.taps)
    shapes = output_shapes(config, teacher, teacher_vars, spec, taps)
    meta = cache_meta(config, teacher_vars, train, shapes)
    directory = default_cache_dir(config, meta)
    if not _check_meta(directory, meta):
        if jax.process_index() == 0:
            passes = _forward_passes(config)
            print(
                f"Building the teacher cache in {directory} ({meta['draws']} draws of {len(train)} images, "
                f"{passes} teacher forward passes per image and draw)."
            )
        _build(config, teacher, teacher_vars, train, mesh, spec, taps, meta, directory, chunk)
    sync_processes("apjax: teacher cache ready")
    return TeacherCache(directory)


def _forward_passes(config) -> int:
    """The teacher's forward passes per image and draw of a build: one, or a black-box map's N or P."""
    if is_blackbox(config.distill.method):
        size = config.data.image_size
        return blackbox.forward_passes(config.distill, size, size)
    return 1


def _build(config, teacher, teacher_vars, train, mesh, spec, taps, meta, directory: Path, chunk: int) -> None:
    stored, out_dtype = _storage(meta["dtype"])
    tmp = directory.with_name(directory.name + ".incomplete")
    main = jax.process_index() == 0
    progress = tmp / "progress.json"
    if main and (not (tmp / "meta.json").exists() or json.loads((tmp / "meta.json").read_text()) != meta):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_json_atomic(tmp / "meta.json", meta)
        for name, shape in meta["fields"].items():
            path = tmp / f"{name.replace('/', '__')}.npy"
            np.lib.format.open_memmap(path, "w+", stored, (len(train), meta["draws"], *shape)).flush()
        write_json_atomic(progress, {"done": 0})
    sync_processes("apjax: teacher cache files")
    fn = jitted_outputs(config, teacher, spec, taps, mesh, out_dtype)
    starts = [(e, s) for e in range(meta["draws"]) for s in range(0, len(train), chunk)]
    started = json.loads(progress.read_text())
    done, seconds, t0 = started["done"], float(started.get("seconds", 0.0)), time.perf_counter()
    files = (
        {n: np.load(tmp / f"{n.replace('/', '__')}.npy", mmap_mode="r+") for n in meta["fields"]}
        if main
        else {}
    )
    for k in tqdm(
        range(done, len(starts)), initial=done, total=len(starts), desc="teacher cache", disable=not main
    ):
        e, s = starts[k]
        idx = np.arange(s, min(s + chunk, len(train)))
        padded = np.concatenate([idx, np.full(chunk - len(idx), idx[-1])])
        out = fn(teacher_vars, *_global(train, padded, mesh), jnp.int32(e))
        out = multihost_utils.process_allgather(out, tiled=True)
        if main:
            for name, a in out.items():
                files[name][idx, e] = np.asarray(a)[: len(idx)].view(stored)
                files[name].flush()
            write_json_atomic(progress, {"done": k + 1, "seconds": seconds + time.perf_counter() - t0})
    if main:
        # What the build cost (all sessions of a resumed build), beside the cache; not part of its identity.
        passes = _forward_passes(config)
        seconds += time.perf_counter() - t0
        write_json_atomic(
            tmp / "build.json",
            {"seconds": round(seconds, 2), "images": len(train), "draws": meta["draws"],
             "teacher_forward_passes_per_image_and_draw": passes,
             "images_per_second": round(len(train) * meta["draws"] / max(seconds, 1e-9), 2)},
        )  # fmt: skip
        progress.unlink()
        tmp.rename(directory)


def _global(train: HostCache, idx: np.ndarray, mesh: Mesh) -> list[jax.Array]:
    """The chunk's images, sizes, extents and indices as arrays split over the mesh (every process holds
    the whole split, so each reads its own part)."""
    sharding = batch_sharding(mesh)
    arrays = [train.images[idx], train.sizes[idx], train.extents[idx], idx.astype(np.int32)]
    return [jax.make_array_from_callback(a.shape, sharding, lambda i, a=a: a[i]) for a in arrays]


def jitted_outputs(config, teacher, spec, taps, mesh: Mesh, out_dtype):
    key, size, scale = draw_key(config.seed), config.data.image_size, tuple(config.data.crop_scale)

    def fn(variables, images, sizes, extents, index, draw):
        x = draw_augment(key, index, draw, images, sizes, extents, size, teacher.dtype, scale)
        out = teacher_outputs(teacher, variables, x, spec, taps, config.distill)
        return jax.tree.map(lambda a: a.astype(out_dtype), out)

    split, replicated = batch_sharding(mesh), NamedSharding(mesh, PartitionSpec())
    return jax.jit(fn, in_shardings=(replicated, split, split, split, split, None), out_shardings=split)


class CachedBatches(TrainBatches):
    """:class:`TrainBatches` whose batches also carry ``draw``, int32 (B,) the step's draw
    ``(step // steps_per_epoch) mod D``, and ``teacher``: the cached outputs of their images at that draw."""

    def __init__(self, batches: TrainBatches, cache: TeacherCache):
        super().__init__(batches.cache, batches.batch_size, batches.seed, batches.mesh, batches.resident)
        self.teacher_cache = cache

    def host_batch(self, step: int) -> dict[str, Any]:
        batch = super().host_batch(step)
        draw = (int(step) // self.steps_per_epoch) % self.teacher_cache.draws
        draws = np.full(len(batch["index"]), draw, np.int32)
        return {**batch, "draw": draws, "teacher": self.teacher_cache.gather(batch["index"], draw)}
