"""apjax's localisation metrics against the mask (apjax/evaluators/mask_metrics.py) beside Quantus 0.6's, on
the same maps and masks: the agreement per metric, where and why they differ, and pairs/s of each.

Not part of CI: it needs Quantus (``pip install quantus==0.6.0``; its localisation metrics take
precomputed maps, so no torch model is needed). Maps: Grad-CAM (flat zero regions after its ReLU, so ties
at the k-th value occur) and the gradient map (no ties) of a tiny random VGG on random images, with
random rectangular class masks; scored at the input size.

  python -m benchmarks.quantus_agreement --out benchmarks/results/quantus_agreement.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from apjax.attribution.maps import upsample_map  # noqa: E402
from apjax.attribution.methods import map_fn  # noqa: E402
from apjax.data.pipeline import batch_sharding, data_mesh  # noqa: E402
from apjax.evaluators import mask_metrics as mm  # noqa: E402
from apjax.models import create_model, init_variables  # noqa: E402
from apjax.trainer.files import write_json_atomic  # noqa: E402


def _inputs(n: int, size: int, seed: int):
    rng = np.random.default_rng(seed)
    model = create_model((8, "M", 16, "M", 16, "M"), num_classes=4, dropout_rate=0.0)
    variables = init_variables(model, jax.random.key(seed), size)
    x = jnp.asarray(rng.normal(0, 1, (n, size, size, 3)), jnp.float32)
    classes = jnp.asarray(rng.integers(0, 4, n), jnp.int32)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        h, w = rng.integers(size // 8, size // 2, 2)
        r, c = rng.integers(0, size - h), rng.integers(0, size - w)
        masks[i, r : r + h, c : c + w] = True
    maps = {}
    for method in ("gradcam", "gradient"):
        fn = jax.jit(map_fn(method, model))
        maps[method] = np.asarray(
            upsample_map(fn(variables, x, classes, jnp.arange(n)).astype(jnp.float32), size)
        )
    return np.asarray(x), np.asarray(classes), masks, maps


def _quantus(a: np.ndarray, masks: np.ndarray, x: np.ndarray, y: np.ndarray, k: int) -> dict[str, np.ndarray]:
    import quantus

    metrics = {
        "RMA": quantus.RelevanceMassAccuracy(disable_warnings=True),
        "RRA": quantus.RelevanceRankAccuracy(disable_warnings=True),
        "AttrLoc": quantus.AttributionLocalisation(disable_warnings=True),
        "TopK": quantus.TopKIntersection(k=k, disable_warnings=True),
    }
    xc, ac, sc = x.transpose(0, 3, 1, 2), a[:, None], masks[:, None].astype(np.float32)
    return {
        name: np.asarray(
            m(model=None, x_batch=xc, y_batch=y, a_batch=ac, s_batch=sc, channel_first=True), float
        )
        for name, m in metrics.items()
    }


def _tied_at_kth(a: np.ndarray, masks: np.ndarray, k_of) -> np.ndarray:
    """Whether the k-th highest value of each map is shared with a pixel ranked after it."""
    flat = a.reshape(len(a), -1)
    out = []
    for row, m in zip(flat, masks.reshape(len(a), -1), strict=True):
        k = k_of(m)
        kth = np.sort(row)[::-1][k - 1]
        out.append(np.sum(row == kth) > np.sum(np.sort(row)[::-1][:k] == kth))
    return np.asarray(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/quantus_agreement.json")
    args = parser.parse_args()
    import quantus

    x, y, masks, maps = _inputs(args.pairs, args.size, args.seed)
    k = max(1, round(mm.TOP_K_SHARE * args.size**2))
    ours_fn = jax.jit(mm.mask_metrics)
    split = batch_sharding(data_mesh())  # the pairs over every device (8 CPU devices here)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {jax.device_count()} CPU devices",
        "versions": {
            "jax": jax.__version__,
            "quantus": quantus.__version__,
            "python": platform.python_version(),
        },
        "settings": vars(args) | {"top_k": k},
        "methods": {},
    }
    for method, a in maps.items():
        on_device = jax.device_put((jnp.asarray(a), jnp.asarray(masks)), split)
        jax.block_until_ready(ours_fn(*on_device))  # compile
        t0 = time.perf_counter()
        ours = {key: np.asarray(v, float) for key, v in ours_fn(*on_device).items()}
        ours_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        theirs = _quantus(a, masks, x, y, k)
        theirs_s = time.perf_counter() - t0
        ties = {
            "RRA": _tied_at_kth(a, masks, lambda m: int(m.sum())),
            "TopK": _tied_at_kth(a, masks, lambda m: k),
        }
        entry = {"pairs_per_s": {"apjax": round(len(a) / ours_s, 1), "quantus": round(len(a) / theirs_s, 1)}}
        for key, q in theirs.items():
            diff = np.abs(ours[key] - q)
            tied = ties.get(key, np.zeros(len(a), bool))
            entry[key] = {
                "max_abs_diff": float(np.nanmax(diff)),
                "max_abs_diff_without_ties": float(np.nanmax(np.where(tied, 0.0, diff))),
                "pairs_tied_at_kth": int(tied.sum()),
                "pairs_differing_by_more_than_1e-5": int(np.sum(diff > 1e-5)),
                "apjax_mean": float(np.nanmean(ours[key])),
                "quantus_mean": float(np.nanmean(q)),
            }
        result["methods"][method] = entry
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
