"""How many teacher forward passes a black-box teacher map needs: RISE's agreement with a long run, and
what storing the map at 16 x 16 loses (the choices of ``distill.blackbox``, docs/blackbox.md).

For a trained teacher and a few training crops (draw 0 of the run's seed, as the teacher cache makes them),
each RISE setting (grid s, keep probability p) is run with N masks from one key and compared with a
reference of ``--ref-masks`` masks from another key: the mean over images of the cosine similarity of the
two maps after each is shifted to a zero minimum (the form the matching loss compares). Two references of
independent keys give the ceiling (their own agreement). For each map the fidelity of the stored form:
the map average-pooled to ``--size`` and upsampled back bilinearly, against the full map. The JSON also
records each map's forward passes per second on this machine, with the host's load average (other load
slows it).

    python -m benchmarks.blackbox_maps --teacher workdirs/blackbox/teacher \
        --out benchmarks/results/blackbox_maps.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from apjax.attribution import perturbation
from apjax.compress.blackbox import resize_map
from apjax.compress.teacher_cache import draw_key
from apjax.data.augment import draw_augment
from apjax.models import create_model
from apjax.trainer.checkpoints import restore_state
from apjax.trainer.config import load_data, num_classes_of
from apjax.trainer.files import load_workdir_config, write_json_atomic

SETTINGS = ((8, 0.1), (8, 0.5), (4, 0.5))  # (s, p): RISE's code's 224 px setting, and two more


def _shifted(m: np.ndarray) -> np.ndarray:
    m = m - m.min(axis=(1, 2), keepdims=True)
    return m.reshape(len(m), -1)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of the cosine similarity of two (B, H, W) maps, each shifted to a zero minimum."""
    a, b = _shifted(a), _shifted(b)
    cos = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return float(np.mean(cos))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--teacher", required=True, help="a trained teacher's workdir")
    parser.add_argument("--out", default="benchmarks/results/blackbox_maps.json")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--ref-masks", type=int, default=4096)
    parser.add_argument("--masks", default="64,128,256,512")
    parser.add_argument("--size", type=int, default=16, help="the stored map's side")
    args = parser.parse_args(argv)

    tc = load_workdir_config(args.teacher)
    _, state, _ = restore_state(tc, args.teacher, "best")
    model = create_model(tc.model, num_classes=num_classes_of(tc))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    train = load_data(tc, splits=("train",))["train"]
    idx = np.arange(args.images)
    size = tc.data.image_size
    x = draw_augment(
        draw_key(tc.seed), jnp.asarray(idx, jnp.int32), jnp.zeros(len(idx), jnp.int32),
        jnp.asarray(train.images[idx]), jnp.asarray(train.sizes[idx]), jnp.asarray(train.extents[idx]),
        size, jnp.float32, tuple(tc.data.crop_scale),
    )  # fmt: skip
    k = jnp.argmax(model.apply(variables, x), axis=-1)

    def probabilities(images):
        return jax.nn.sigmoid(model.apply(variables, images))

    def rise(n: int, cells: int, keep: float, seed: int) -> tuple[np.ndarray, float]:
        masks = perturbation.rise_masks(jax.random.key(seed), n, size, size, cells, keep)
        chunk = min(n, 64)
        fn = jax.jit(lambda x: perturbation.rise_map(probabilities, x, k, masks, keep, chunk))
        fn(x).block_until_ready()  # compile
        t0 = time.perf_counter()
        m = np.asarray(fn(x).block_until_ready())
        return m, len(idx) * n / (time.perf_counter() - t0)

    def stored_fidelity(m: np.ndarray) -> float:
        pooled = resize_map(jnp.asarray(m), (args.size, args.size))
        back = np.asarray(jax.image.resize(pooled, m.shape, "linear"))
        return agreement(back, m)

    rows = []
    for cells, keep in SETTINGS:
        ref, ref_rate = rise(args.ref_masks, cells, keep, seed=99)
        ref2, _ = rise(args.ref_masks, cells, keep, seed=98)
        entry = {
            "cells": cells,
            "keep": keep,
            "reference_vs_reference": round(agreement(ref, ref2), 4),
            "reference_stored_fidelity": round(stored_fidelity(ref), 4),
            "reference_forward_passes_per_s": round(ref_rate, 1),
            "by_masks": [],
        }
        for n in (int(v) for v in args.masks.split(",")):
            m, rate = rise(n, cells, keep, seed=1)
            entry["by_masks"].append(
                {"masks": n, "agreement_with_reference": round(agreement(m, ref), 4),
                 "stored_fidelity": round(stored_fidelity(m), 4), "forward_passes_per_s": round(rate, 1)}
            )  # fmt: skip
            print(f"s={cells} p={keep} N={n}: agreement {entry['by_masks'][-1]['agreement_with_reference']}")
        rows.append(entry)
    result = {
        "command": "python -m benchmarks.blackbox_maps " + " ".join(argv or sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg(),
        "jax": jax.__version__,
        "teacher": tc.model,
        "image_size": size,
        "images": args.images,
        "reference_masks": args.ref_masks,
        "stored_size": args.size,
        "settings": rows,
    }
    write_json_atomic(args.out, result)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
