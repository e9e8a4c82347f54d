"""apjax's faithfulness curves (apjax/evaluators/faithfulness.py) beside Quantus 0.6's, on the same maps,
images and model: the agreement per metric and map kind, every convention difference, and pairs/s of each.

Not part of CI: it needs torch and Quantus, kept out of apjax's venv. Once:

  python3 -m venv /tmp/qvenv && . /tmp/qvenv/bin/activate && pip install -r requirements.txt \\
      && pip install torch quantus==0.6.0

then, from the repository root:

  . /tmp/qvenv/bin/activate && python -m benchmarks.quantus_faithfulness \\
      --out benchmarks/results/quantus_faithfulness.json

The model: a tiny random apjax VGG ``(8, M, 16, M, 16, M)``, 4 classes, BatchNorm in eval mode with the
running statistics of the benchmark's images (not 0 / 1), and its torch twin built here (Conv2d,
BatchNorm2d in eval, ReLU, MaxPool2d, an NCHW -> NHWC flatten, Linear, Sigmoid), checked against apjax's
logits first. Quantus reads the twin's outputs with ``softmax=False``, i.e. apjax's class score
``sigmoid(logit_k)``. Images: random normal (the normalised input), class = each image's top-1. Maps:
Grad-CAM upsampled bilinearly to the input (flat zero regions after its ReLU: ties) and the gradient map
(tie-free). Baseline: ``zero`` (0.0 in the normalised input) on both sides; the uniform-noise baselines
draw from different RNGs (apjax: ``fold_in(key(0), example id)``, Quantus: ``np.random``), so noise-based
numbers are not compared.

Compared, per pair: the deletion curve (apjax ``curves``, S steps of ``floor(t n / S)`` pixels) against
``quantus.PixelFlipping`` point by point, and its trapezoid AUC; the MoRF region curve and AOPC (apjax
``region_curve`` + ``aopc``) against ``quantus.RegionPerturbation`` point by point and as AOPC. Quantus
0.6 has no insertion metric. Both sides sort with ties: apjax stably (row-major among equal values),
Quantus with ``np.argsort`` (unstable; on this CPU numpy's AVX-512 sort). Pairs whose map has a tie that
matters (at a step boundary / among the first L + 1 regions) are reported apart, and apjax is rerun on
maps that encode Quantus's own order (for deletion: where its steps delete whole pixels), which must then
reproduce Quantus on the tied pairs too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

# One thread per library (the machine is shared): XLA, torch and numpy's BLAS.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from apjax.attribution.maps import upsample_map  # noqa: E402
from apjax.attribution.methods import map_fn  # noqa: E402
from apjax.evaluators import faithfulness as fa  # noqa: E402
from apjax.models import create_model, init_variables  # noqa: E402
from apjax.models.vgg import tap_names  # noqa: E402
from apjax.trainer.files import write_json_atomic  # noqa: E402

WIDTHS = (8, "M", 16, "M", 16, "M")
NUM_CLASSES = 4
CHANNELS = 3
CONVENTIONS = {
    "class_score": "apjax scores sigmoid(logit_k) (multi-label); Quantus reads the model's outputs and, with "
    "its default softmax=True, appends a softmax over the classes. Here the twin ends in a Sigmoid and "
    "Quantus is called with softmax=False, so both read sigmoid(logit_k).",
    "baseline": "Quantus's default perturb_baseline='black' is the image's minimum over all its values, not "
    "0; apjax's 'zero' is 0.0 in the normalised input. Quantus is given perturb_baseline=0.0. The noise "
    "baselines (apjax 'uniform' in [min, max] per channel keyed by fold_in(key(0), example id); Quantus "
    "'uniform' in [uniform_low, uniform_high] = [0, 1] from np.random) are not compared.",
    "attribution_preprocessing": "Quantus defaults normalise=True (divides by max |a|) and abs=False; apjax "
    "uses the map as it is. Quantus is given normalise=False, abs=False (a positive scale would not change "
    "the order anyway).",
    "features_are_channels": "Quantus broadcasts the (1, H, W) map over the C input channels and orders the "
    "C * H * W values: PixelFlipping's features_in_step counts channel values, so apjax's n / S pixels "
    "per step is features_in_step = C * n / S; RegionPerturbation sums C copies of each pixel (C times "
    "apjax's region score, summed in another order).",
    "deletion_points": "PixelFlipping returns f(x_t) for t = 1..S (no unperturbed point); apjax's curve "
    "has t = 0..S. Aligned as apjax[:, 1:] against Quantus; p_0 is the twin's f(x).",
    "deletion_auc": "apjax's AUC is the trapezoid over t = 0..S on [0, 1]: (p_0/2 + p_1 + .. + p_S/2) / S. "
    "Quantus's (return_auc_per_sample=True, or quantus.helpers.utils.calculate_auc) is np.trapz with dx=1 "
    "over its S points t = 1..S: not divided by S and without p_0, so apjax = (quantus + (p_0 + p_1) / 2) "
    "/ S. np.trapz is gone from numpy 2.4, so with numpy >= 2.4 Quantus 0.6's return_auc_per_sample=True "
    "and get_auc_score raise AttributeError; it is computed here with np.trapezoid (the same rule).",
    "deletion_steps": "apjax step t deletes the first floor(t n / S) pixels; Quantus deletes "
    "features_in_step channel values per step, ceil(C n / features_in_step) steps, but asserts that "
    "features_in_step divides the SPATIAL size n = H * W (not C * n, what it steps over). The two match "
    "only where S divides n and C divides S (features_in_step = C n / S then divides n): e.g. 48 steps at "
    "48 x 48, not 32 steps at 32 x 32 (96 does not divide 1024).",
    "region_curve": "RegionPerturbation returns f(x) - f(x_k) for k = 1..L (the k = 0 term, 0, omitted); "
    "apjax returns f(x_k) for k = 0..L. apjax's AOPC = sum_k (f(x) - f(x_k)) / (L + 1) = sum(Quantus's "
    "curve) / (L + 1); the plain mean of Quantus's curve is (L + 1) / L times it, and Quantus's "
    "get_auc_score (np.trapz of that curve) is another number again.",
    "region_grid": "Both cut non-overlapping patch_size squares in row-major order (Quantus 0.6 has no "
    "overlap test). Where r does not divide the side, apjax's grid starts at the top-left corner (the last "
    "row / column narrower) while Quantus pads the side to a multiple of r, split about the centre "
    "(floor / ceil), map zero-padded and image edge-padded: a shifted grid, other regions (measured below "
    "with region_size_not_dividing).",
    "regions_evaluated": "Both perturb the first L = regions (apjax) = regions_evaluation (Quantus) "
    "regions, or all of them if there are fewer.",
    "tie_order": "apjax orders pixels and regions with a stable argsort (ties in row-major order); Quantus "
    "uses np.argsort's default kind (not stable; numpy >= 1.25 dispatches it to an AVX-512 sort on CPUs "
    "that have it, so the tie order depends on the CPU). With ties, Quantus may also interleave the C "
    "channel values of tied pixels, so one of its steps can delete some channels of a pixel and not the "
    "others, which apjax never does.",
    "insertion": "Quantus 0.6.0 has no insertion metric (its faithfulness metrics: FaithfulnessCorrelation, "
    "FaithfulnessEstimate, Infidelity, IROF, Monotonicity, MonotonicityCorrelation, PixelFlipping, "
    "RegionPerturbation, ROAD, Selectivity, SensitivityN, Sufficiency); apjax's insertion AUC is not "
    "compared.",
}


# ------------------------------------------------------------------------------------------------
# The model, its torch twin and the inputs.
# ------------------------------------------------------------------------------------------------
def _model(x: np.ndarray, seed: int):
    """The tiny VGG and its variables; BatchNorm's running statistics are those of ``x`` (40 train-mode
    passes at momentum 0.9), the BN scales and biases random, so eval mode is a non-trivial affine map;
    the head's weights are scaled by 3 and its bias centres each class's logit over ``x``."""
    model = create_model(WIDTHS, num_classes=NUM_CLASSES, dropout_rate=0.0)
    variables = init_variables(model, jax.random.key(seed), x.shape[1])
    rng = np.random.default_rng(seed + 1)
    params = jax.tree.map(np.asarray, variables["params"])
    for name in params:
        if name.endswith("_bn"):
            params[name]["scale"] = rng.uniform(0.5, 1.5, params[name]["scale"].shape).astype(np.float32)
            params[name]["bias"] = rng.normal(0.0, 0.2, params[name]["bias"].shape).astype(np.float32)
    stats = variables["batch_stats"]
    step = jax.jit(
        lambda p, s: model.apply({"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"])[1]
    )
    for _ in range(40):
        stats = step(params, stats)["batch_stats"]
    stats = jax.tree.map(np.asarray, stats)
    # Head: weights x 3 and each class's logit centred over the images, so the top-1 classes vary and the
    # curves move by tenths, not thousandths.
    params["head"]["kernel"] = params["head"]["kernel"] * 3.0  # logits spread over a few units
    params["head"]["bias"] = np.zeros_like(params["head"]["bias"])
    logits = np.asarray(model.apply({"params": params, "batch_stats": stats}, x))
    params["head"]["bias"] = -logits.mean(axis=0).astype(np.float32)
    return model, {"params": params, "batch_stats": stats}


def _torch_twin(variables, size: int):
    """The apjax VGG as torch modules (NCHW), ending in a Sigmoid: its outputs are apjax's class scores."""
    import torch
    from torch import nn

    p, s = variables["params"], variables["batch_stats"]
    t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731
    layers, channels, side = [], CHANNELS, size
    for w, name in zip(WIDTHS, tap_names(WIDTHS), strict=True):
        if w == "M":
            layers.append(nn.MaxPool2d(2, 2))
            side //= 2
            continue
        conv = nn.Conv2d(channels, w, 3, padding=1)
        conv.weight.data = t(p[name]["kernel"].transpose(3, 2, 0, 1))  # HWIO -> OIHW
        conv.bias.data = t(p[name]["bias"])
        bn = nn.BatchNorm2d(w, eps=1e-5)
        bn.weight.data, bn.bias.data = t(p[f"{name}_bn"]["scale"]), t(p[f"{name}_bn"]["bias"])
        bn.running_mean.data, bn.running_var.data = t(s[f"{name}_bn"]["mean"]), t(s[f"{name}_bn"]["var"])
        layers += [conv, bn, nn.ReLU()]
        channels = w

    class FlattenHWC(nn.Module):
        """apjax flattens (H, W, C); torch's activations are (C, H, W)."""

        def forward(self, x):
            return x.permute(0, 2, 3, 1).flatten(1)

    head = nn.Linear(side * side * channels, NUM_CLASSES)
    head.weight.data, head.bias.data = t(p["head"]["kernel"].T), t(p["head"]["bias"])
    return nn.Sequential(*layers, FlattenHWC(), head, nn.Sigmoid()).eval()


def _twin_logits(twin, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return twin[:-1](torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def _maps(model, variables, x: np.ndarray, classes: np.ndarray) -> dict[str, np.ndarray]:
    size, ids = x.shape[1], jnp.arange(len(x))
    out = {}
    for method in ("gradcam", "gradient"):
        fn = jax.jit(map_fn(method, model))
        m = fn(variables, jnp.asarray(x), jnp.asarray(classes), ids).astype(jnp.float32)
        out[method] = np.asarray(upsample_map(m, size), np.float32)
    return out


# ------------------------------------------------------------------------------------------------
# Both sides.
# ------------------------------------------------------------------------------------------------
def _apjax_fns(model, steps: int, size: int, regions: int):
    """Jitted ``deletion(variables, x, maps, classes)`` -> (curve (B, S + 1), AUC) and ``region(...)`` ->
    (curve (B, L + 1), AOPC), with the zero baseline, through the evaluator's own functions."""

    def prob_fn(variables):
        return lambda images: jax.nn.sigmoid(model.apply(variables, images).astype(jnp.float32))

    @jax.jit
    def deletion(variables, x, maps, classes):
        zero = fa.baseline_of(x, "zero", 1.0)
        c = fa.curves(prob_fn(variables), x, maps, classes, steps, zero, zero)["deletion"]
        return c, fa.curve_auc(c)

    @jax.jit
    def region(variables, x, maps, classes):
        c = fa.region_curve(prob_fn(variables), x, maps, classes, size, regions, jnp.zeros_like(x))
        return c, fa.aopc(c)

    return deletion, region


def _quantus_metrics(n: int, steps: int, size: int, regions: int):
    import quantus

    common = dict(perturb_baseline=0.0, normalise=False, abs=False, disable_warnings=True)
    return {
        "deletion": quantus.PixelFlipping(features_in_step=CHANNELS * n // steps, **common),
        "region": quantus.RegionPerturbation(
            patch_size=size, regions_evaluation=regions, order="morf", **common
        ),
    }


def _call_quantus(metric, twin, x: np.ndarray, classes: np.ndarray, maps: np.ndarray) -> np.ndarray:
    out = metric(
        model=twin,
        x_batch=x.transpose(0, 3, 1, 2).copy(),
        y_batch=classes,
        a_batch=maps[:, None],
        channel_first=True,
        softmax=False,
        device="cpu",
    )
    return np.asarray(out, np.float64)


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    out = jax.block_until_ready(out)
    return out, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# Ties, and Quantus's own order as maps that apjax reads without ties.
# ------------------------------------------------------------------------------------------------
def _quantus_feature_order(maps: np.ndarray) -> np.ndarray:
    """PixelFlipping's order of the C * n channel values (its ``np.argsort(-a)`` on the broadcast map)."""
    b = len(maps)
    a = np.broadcast_to(maps[:, None], (b, CHANNELS, *maps.shape[1:])).reshape(b, -1)
    return np.argsort(-a, axis=1)


def _deletion_order_maps(maps: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Maps whose stable order deletes, at every step, the pixels Quantus deletes there, and whether that
    is possible (False where a Quantus step deletes some channels of a pixel but not all)."""
    b, n = len(maps), maps[0].size
    per_step = CHANNELS * n // steps
    step_of = np.empty((b, CHANNELS * n), np.int64)
    steps_in_order = np.arange(CHANNELS * n)[None] // per_step
    np.put_along_axis(step_of, _quantus_feature_order(maps), steps_in_order, axis=1)
    step_of = step_of.reshape(b, CHANNELS, n)
    whole = np.all(step_of == step_of[:, :1], axis=(1, 2))
    return (steps - step_of[:, 0]).reshape(maps.shape).astype(np.float32), whole


def _quantus_region_sums(maps: np.ndarray, size: int) -> np.ndarray:
    """RegionPerturbation's region scores (r divides the side): C copies of each pixel summed, float32."""
    b, h, w = maps.shape
    a = np.broadcast_to(maps[:, None], (b, CHANNELS, h, w))
    blocks = a.reshape(b, CHANNELS, h // size, size, w // size, size).transpose(0, 2, 4, 1, 3, 5)
    return blocks.reshape(b, (h // size) * (w // size), -1).sum(axis=-1)


def _region_order_maps(maps: np.ndarray, size: int) -> np.ndarray:
    """Maps whose regions' scores are distinct and ordered as Quantus orders the regions."""
    b, h, w = maps.shape
    order = np.argsort(-_quantus_region_sums(maps, size), axis=-1)
    count = order.shape[1]
    place = np.empty_like(order)
    np.put_along_axis(place, order, np.arange(count)[None], axis=1)
    score = (count - place).reshape(b, h // size, w // size).astype(np.float32)
    return np.repeat(np.repeat(score, size, axis=1), size, axis=2)


def _deletion_ties(maps: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Whether a value is shared across a step boundary (pixels ranked floor(t n / S) - 1 and its next),
    and the first curve column (t - 1, of Quantus's t = 1..S) whose pixel set that can change (S - 1 if
    none: the last point deletes every pixel either way)."""
    flat = -np.sort(-maps.reshape(len(maps), -1), axis=1)
    n = flat.shape[1]
    cuts = np.asarray([t * n // steps for t in range(1, steps)])
    at_cut = flat[:, cuts - 1] == flat[:, cuts]  # (B, S - 1): boundary t = 1..S-1
    first = np.where(at_cut.any(axis=1), at_cut.argmax(axis=1), steps - 1)
    return at_cut.any(axis=1), first


def _region_ties(
    maps: np.ndarray, size: int, regions: int, rel: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """Whether two of the regions whose order decides the curve (the first min(L, R - 1) places and the
    next) have scores equal within ``rel`` of the largest |score| (exact ties and float near-ties), and
    the first curve column (k - 1, of Quantus's k = 1..L) that a swap of tied regions can change."""
    sums = np.sort(_quantus_region_sums(maps, size).astype(np.float64), axis=1)[:, ::-1]
    last = min(regions, sums.shape[1] - 1)
    gaps = np.abs(np.diff(sums[:, : last + 1], axis=1))
    scale = np.maximum(np.abs(sums).max(axis=1, keepdims=True), 1e-30)
    near = gaps <= rel * scale  # (B, last): places i and i + 1
    first = np.where(near.any(axis=1), near.argmax(axis=1), regions)  # point k = i + 1 is column i
    return near.any(axis=1), first


def _stats(diff: np.ndarray, select: np.ndarray | None = None) -> dict[str, float | int]:
    """Max / mean |difference| over the selected pairs (a pair's worst point for curves)."""
    per_pair = diff.reshape(len(diff), -1).max(axis=1)
    flat = diff.reshape(len(diff), -1)
    if select is not None:
        per_pair, flat = per_pair[select], flat[select]
    if not len(per_pair):
        return {"pairs": 0}
    return {
        "pairs": int(len(per_pair)),
        "max_abs_diff": float(per_pair.max()),
        "mean_abs_diff": float(flat.mean()),
        "pairs_differing_by_more_than_1e-5": int(np.sum(per_pair > 1e-5)),
    }


def _split(diff: np.ndarray, tied: np.ndarray) -> dict:
    return {"all": _stats(diff), "tie_free": _stats(diff, ~tied), "tied": _stats(diff, tied)}


def _before_first_tie(
    diff: np.ndarray, first: np.ndarray, tied: np.ndarray, last_too: bool
) -> dict[str, float | int]:
    """On the tied pairs, the curve's points (columns of ``diff``) before ``first`` (the first column the
    tie order can change), and with ``last_too`` the last point (everything perturbed), where the two
    orders perturb the same pixels."""
    cols = np.arange(diff.shape[1])[None]
    keep = (cols < first[:, None]) | ((cols == diff.shape[1] - 1) & last_too)
    d = np.where(keep, diff, 0.0)[tied]
    if not len(d):
        return {"pairs": 0}
    return {
        "pairs": int(len(d)),
        "points": int(keep[tied].sum()),
        "max_abs_diff": float(d.max()),
        "max_abs_diff_from_the_first_tie_on": float(np.where(keep, 0.0, diff)[tied].max()),
    }


# ------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=128, help="pairs per map kind (one class per image)")
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--steps", type=int, default=48, help="S: a multiple of 3 dividing size^2")
    parser.add_argument("--region_size", type=int, default=6, help="r (must divide size)")
    parser.add_argument("--regions", type=int, default=48, help="L, the regions perturbed")
    parser.add_argument("--region_size_not_dividing", type=int, default=5, help="0: skip that check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/quantus_faithfulness.json")
    args = parser.parse_args()
    n = args.size**2
    if n % args.steps or args.steps % CHANNELS or args.size % args.region_size:
        parser.error("steps: a multiple of 3 dividing size^2; region_size: a divisor of size (CONVENTIONS)")
    import quantus
    import torch

    torch.set_num_threads(1)
    load_before = os.getloadavg()
    rng = np.random.default_rng(args.seed)
    x = rng.normal(0.0, 1.0, (args.images, args.size, args.size, CHANNELS)).astype(np.float32)
    model, variables = _model(x, args.seed)
    twin = _torch_twin(variables, args.size)
    logits = np.asarray(jax.jit(model.apply)(variables, x))
    twin_logits = _twin_logits(twin, x)
    classes = logits.argmax(axis=1).astype(np.int64)
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    twin_probs = 1.0 / (1.0 + np.exp(-twin_logits.astype(np.float64)))
    p0_twin = np.take_along_axis(twin_probs, classes[:, None], 1)[:, 0]
    maps = _maps(model, variables, x, classes)

    deletion_fn, region_fn = _apjax_fns(model, args.steps, args.region_size, args.regions)
    metrics = _quantus_metrics(n, args.steps, args.region_size, args.regions)
    xj, cj = jnp.asarray(x), jnp.asarray(classes, jnp.int32)
    result = {
        "command": "python -m benchmarks.quantus_faithfulness " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {_cpu_name()}; one thread for XLA, torch "
        "and BLAS; shared with other jobs",
        "load_average_1_5_15": {"before": [round(v, 2) for v in load_before]},
        "versions": {
            "jax": jax.__version__,
            "torch": torch.__version__,
            "quantus": quantus.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "settings": vars(args)
        | {
            "pixels": n,
            "pixels_per_step": n // args.steps,
            "features_in_step": CHANNELS * n // args.steps,
            "regions_total": (args.size // args.region_size) ** 2,
            "baseline": "zero (0.0 in the normalised input)",
            "model": f"apjax VGG {WIDTHS}, {NUM_CLASSES} classes, BatchNorm in eval mode",
        },
        "twin_check": {
            "max_abs_logit_diff": float(np.abs(logits - twin_logits).max()),
            "logit_range": [float(logits.min()), float(logits.max())],
            "top1_class_counts": np.bincount(classes, minlength=NUM_CLASSES).tolist(),
            "mean_top1_probability": float(np.take_along_axis(probs, classes[:, None], 1).mean()),
        },
        "conventions": CONVENTIONS,
        "timing": "pairs/s on the same pairs, one thread each: apjax through its jitted functions after "
        "compiling (deletion: faithfulness.curves with both baselines zero; its unused insertion half is "
        "pruned by the compiler), Quantus as it runs (torch twin on the CPU, its default batch_size 64). "
        "Every point is one forward pass of the batch on both sides.",
        "not_compared": {
            "insertion": "Quantus 0.6.0 has no insertion metric.",
            "uniform_noise_baselines": "apjax and Quantus draw the noise from different RNGs and ranges.",
        },
        "methods": {},
    }
    for method, a in maps.items():
        aj = jnp.asarray(a)
        entry: dict = {}
        # apjax: compile, then time the compiled functions on the same pairs.
        jax.block_until_ready(deletion_fn(variables, xj, aj, cj))
        jax.block_until_ready(region_fn(variables, xj, aj, cj))
        (del_curve, del_auc), del_s = _timed(deletion_fn, variables, xj, aj, cj)
        (reg_curve, reg_aopc), reg_s = _timed(region_fn, variables, xj, aj, cj)
        del_curve, del_auc = np.asarray(del_curve, np.float64), np.asarray(del_auc, np.float64)
        reg_curve, reg_aopc = np.asarray(reg_curve, np.float64), np.asarray(reg_aopc, np.float64)
        # Quantus, as it runs.
        t0 = time.perf_counter()
        q_del = _call_quantus(metrics["deletion"], twin, x, classes, a)
        q_del_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        q_reg = _call_quantus(metrics["region"], twin, x, classes, a)
        q_reg_s = time.perf_counter() - t0
        pairs = len(a)
        entry["pairs"] = pairs
        entry["pairs_per_s"] = {
            "deletion": {"apjax": round(pairs / del_s, 1), "quantus": round(pairs / q_del_s, 1)},
            "morf_region": {"apjax": round(pairs / reg_s, 1), "quantus": round(pairs / q_reg_s, 1)},
        }
        entry["seconds"] = {
            "apjax_deletion": round(del_s, 3),
            "quantus_deletion": round(q_del_s, 3),
            "apjax_region": round(reg_s, 3),
            "quantus_region": round(q_reg_s, 3),
        }

        # Deletion vs PixelFlipping.
        tied, first = _deletion_ties(a, args.steps)
        q_full = np.concatenate([p0_twin[:, None], q_del], axis=1)  # Quantus's points with the twin's p_0
        q_auc = (q_full.sum(axis=1) - 0.5 * (q_full[:, 0] + q_full[:, -1])) / args.steps
        q_native_auc = np.trapezoid(q_del, dx=1, axis=1)  # Quantus's calculate_auc (np.trapz) by hand
        order_maps, whole = _deletion_order_maps(a, args.steps)
        qo_curve, _ = deletion_fn(variables, xj, jnp.asarray(order_maps), cj)
        qo_diff = np.abs(np.asarray(qo_curve, np.float64)[:, 1:] - q_del)
        entry["deletion"] = {
            "quantus_metric": f"PixelFlipping(features_in_step={CHANNELS * n // args.steps}, "
            "perturb_baseline=0.0, normalise=False, abs=False), softmax=False",
            "curve_points": q_del.shape[1],
            "pairs_with_a_tie_at_a_step_boundary": int(tied.sum()),
            "p0_apjax_vs_twin": _stats(np.abs(del_curve[:, 0] - p0_twin)),
            "curve_t1_to_S": _split(np.abs(del_curve[:, 1:] - q_del), tied),
            "curve_tied_pairs_before_the_first_tied_boundary": _before_first_tie(
                np.abs(del_curve[:, 1:] - q_del), first, tied, last_too=True
            ),
            "auc": _split(np.abs(del_auc - q_auc), tied),
            "auc_from_quantus_native_trapz": _stats(
                np.abs(del_auc - (q_native_auc + 0.5 * (p0_twin + q_del[:, 0])) / args.steps)
            ),
            "apjax_on_quantus_order": {
                "pairs_with_whole_pixel_steps": int(whole.sum()),
                "curve_t1_to_S": _stats(qo_diff, whole),
            },
            "apjax_mean_auc": float(del_auc.mean()),
            "quantus_mean_auc": float(q_auc.mean()),
            "mean_drop_p0_minus_pS": float(np.mean(del_curve[:, 0] - del_curve[:, -1])),
        }

        # MoRF region curve and AOPC vs RegionPerturbation.
        tied, first = _region_ties(a, args.region_size, args.regions)
        last = reg_curve.shape[1] - 1
        ours_drop = reg_curve[:, :1] - reg_curve[:, 1:]  # f(x) - f(x_k), k = 1..L
        q_aopc = q_reg.sum(axis=1) / (last + 1)
        qo_curve, _ = region_fn(variables, xj, jnp.asarray(_region_order_maps(a, args.region_size)), cj)
        qo_curve = np.asarray(qo_curve, np.float64)
        entry["morf_region"] = {
            "quantus_metric": f"RegionPerturbation(patch_size={args.region_size}, "
            f"regions_evaluation={args.regions}, order='morf', perturb_baseline=0.0, normalise=False, "
            "abs=False), softmax=False",
            "curve_points": q_reg.shape[1],
            "pairs_with_tied_region_scores": int(tied.sum()),
            "curve_k1_to_L": _split(np.abs(ours_drop - q_reg), tied),
            "curve_tied_pairs_before_the_first_tie": _before_first_tie(
                np.abs(ours_drop - q_reg), first, tied, last_too=last == (args.size // args.region_size) ** 2
            ),
            "aopc": _split(np.abs(reg_aopc - q_aopc), tied),
            "apjax_on_quantus_order": {
                "curve_k1_to_L": _stats(np.abs(qo_curve[:, :1] - qo_curve[:, 1:] - q_reg))
            },
            "apjax_mean_aopc": float(reg_aopc.mean()),
            "quantus_mean_aopc": float(q_aopc.mean()),
            "quantus_mean_of_curve": float(q_reg.mean()),
        }
        result["methods"][method] = entry

    if args.region_size_not_dividing:
        result["region_size_not_dividing"] = _not_dividing(args, model, variables, twin, x, classes, maps)
    result["load_average_1_5_15"]["after"] = [round(v, 2) for v in os.getloadavg()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    print(json.dumps(result, indent=1))


def _not_dividing(args, model, variables, twin, x, classes, maps) -> dict:
    """The same MoRF comparison on the (tie-free) gradient map with an r that does not divide the side:
    apjax's top-left grid against Quantus's centred padding."""
    import quantus

    r = args.region_size_not_dividing
    a = maps["gradient"]
    _, region_fn = _apjax_fns(model, args.steps, r, args.regions)
    curve, aopc = region_fn(variables, jnp.asarray(x), jnp.asarray(a), jnp.asarray(classes, jnp.int32))
    curve, aopc = np.asarray(curve, np.float64), np.asarray(aopc, np.float64)
    common = dict(perturb_baseline=0.0, normalise=False, abs=False, disable_warnings=True)
    metric = quantus.RegionPerturbation(patch_size=r, regions_evaluation=args.regions, order="morf", **common)
    q = _call_quantus(metric, twin, x, classes, a)
    pad = quantus.helpers.utils.get_padding_size(args.size, r)
    if q.shape[1] != curve.shape[1] - 1:
        return {"region_size": r, "curve_points": {"apjax": curve.shape[1] - 1, "quantus": q.shape[1]}}
    return {
        "region_size": r,
        "map": "gradient",
        "quantus_padding_per_side_before_after": list(pad),
        "curve_k1_to_L": _stats(np.abs(curve[:, :1] - curve[:, 1:] - q)),
        "aopc": _stats(np.abs(aopc - q.sum(axis=1) / curve.shape[1])),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
