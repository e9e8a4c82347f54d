"""Data benchmark: images/s of synthetic generation, tfds preparation, caching, batching, augmentation.

    python -m apjax.data.benchmark --out data_benchmark.json [--image_size 227 --count 512]
    # at VOC resolution (500x375 and 375x500 images), the faithful cache and the squashed one:
    python -m apjax.data.benchmark --voc --cache_size 0 --out voc_original.json
    python -m apjax.data.benchmark --voc --cache_size 256 --out voc_squash256.json

``--cache_size`` is the cache layout of ``config.data.cache_size``: 0 stores every image at its original
resolution (the default, the reference's pipeline), N > 0 squashes it to N x N (a deviation). Without
``--voc`` the synthetic images are generated at ``--source_size`` (default: the model input side plus
an eighth); with ``--voc`` they are generated at 500 x 500 and cut to VOC 2012's two usual shapes,
500 x 375 (landscape) and 375 x 500 (portrait), alternately. Writes one JSON file (figures, device,
versions, date) and prints a table. Each stage runs on a fresh temporary data directory, so nothing is
reused from earlier runs; device timings are taken after a warm-up call and block until the result is
ready.

Host-fed against device-resident batches (``config.data.on_device``), e.g. on this CPU with 8 devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m apjax.data.benchmark --voc \
        --count 512 --batch_size 64 --out benchmarks/results/data_on_device_cpu8.json

both iterated as training iterates them (a prefetch thread two batches ahead), three rounds each in
alternation, the median reported; ``resident_upload_seconds`` is the one-time copy of the split to the
devices.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import numpy as np


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else float("inf")


def _time_device(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


class _VocShaped:
    """A data source whose square images (and masks) are cut to VOC shapes: 375x500 and 500x375 in turn."""

    def __init__(self, source):
        self.source, self.dataset_info = source, source.dataset_info

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        ex = dict(self.source[index])
        h, w = (375, 500) if index % 2 == 0 else (500, 375)
        for key in ("image", "mask"):
            if key in ex:
                ex[key] = ex[key][:h, :w]
        return ex


def _batch_rates(batches, steps: int) -> float:
    """Images/s of ``steps`` batches of ``batches`` iterated as training does (prefetch 2), each one
    waited for on the device."""
    start = time.perf_counter()
    for _, b in batches.iterate(0, steps):
        jax.block_until_ready(b)
    return _rate(steps * batches.batch_size, time.perf_counter() - start)


def _device_stages(cache, image_size: int, batch_size: int, count: int, rounds: int = 3) -> dict:
    """Batches of ``cache`` to the device mesh, host-fed and device-resident (``config.data.on_device``)
    in alternation, then train augmentation and eval preprocessing to ``image_size`` (images/s, and the
    batch size used)."""
    from apjax.data.augment import eval_preprocess, train_augment
    from apjax.data.pipeline import DeviceCache, TrainBatches, data_mesh

    results: dict = {}
    mesh = data_mesh()
    bs = min(batch_size, count) // mesh.devices.size * mesh.devices.size
    start = time.perf_counter()
    resident = DeviceCache(cache, mesh)
    jax.block_until_ready(resident.arrays)
    results["resident_upload_seconds"] = round(time.perf_counter() - start, 3)
    results["resident_bytes_per_device"] = resident.nbytes
    host_fed = TrainBatches(cache, bs, seed=0, mesh=mesh)
    on_device = TrainBatches(cache, bs, seed=0, mesh=mesh, resident=resident)
    steps = max(4, min(64, 4 * host_fed.steps_per_epoch))
    jax.block_until_ready(on_device.batch(0))  # compiles the gather
    rates: dict[str, list[float]] = {"host_fed": [], "resident": []}
    for _ in range(rounds):  # alternating, so that drifting load on the host falls on both
        rates["host_fed"].append(_batch_rates(host_fed, steps))
        rates["resident"].append(_batch_rates(on_device, steps))
    results["batches_to_device_images_per_s"] = float(np.median(rates["host_fed"]))
    results["resident_batches_images_per_s"] = float(np.median(rates["resident"]))
    results["resident_over_host_fed"] = round(
        results["resident_batches_images_per_s"] / results["batches_to_device_images_per_s"], 2
    )
    results["batch_rounds"] = rates
    del resident, on_device

    b = host_fed.batch(0)
    augment = jax.jit(train_augment, static_argnames=("out_size", "dtype"))
    key = jax.random.key(0)
    t = _time_device(
        lambda k: augment(k, b["images"], b["sizes"], b["extents"], out_size=image_size), key, repeats=5
    )
    results["train_augment_images_per_s"] = _rate(bs, t)
    evaluate = jax.jit(eval_preprocess, static_argnames=("out_size", "dtype"))
    t = _time_device(lambda im: evaluate(im, b["extents"], out_size=image_size), b["images"], repeats=5)
    results["eval_preprocess_images_per_s"] = _rate(bs, t)
    results["batch_size"] = bs
    return results


def run(
    image_size: int, count: int, batch_size: int, cache_size: int, voc: bool, source_size: int | None
) -> dict:
    """Runs every stage and returns the figures (images/s unless named otherwise)."""
    from apjax.data import load_split
    from apjax.data.cache import get_cache, load_cache
    from apjax.data.synthetic import SyntheticConfig, generate_example

    side = 500 if voc else source_size or image_size + image_size // 8
    gen = SyntheticConfig(image_size=side, seed=0)
    sizes = {"train": count, "val": 8, "segmentation_val": 8}
    results: dict = {}

    n_gen = min(count, 256)
    start = time.perf_counter()
    for i in range(n_gen):
        generate_example(gen, "train", i)
    results["generate_images_per_s_1thread"] = _rate(n_gen, time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        from apjax.data.synthetic_builder import prepare_synthetic

        start = time.perf_counter()
        prepare_synthetic(tmp, gen, sizes)
        results["prepare_tfds_images_per_s"] = _rate(count + 16, time.perf_counter() - start)

        source = load_split("synthetic", "train", tmp, gen, sizes)
        source = _VocShaped(source) if voc else source
        directory = Path(tmp) / "cache"
        start = time.perf_counter()
        cache = get_cache(source, directory, cache_size, with_masks=False, desc="caching")
        results["cache_build_images_per_s"] = _rate(count, time.perf_counter() - start)

        start = time.perf_counter()
        cache = load_cache(directory)
        results["cache_reopen_seconds"] = round(time.perf_counter() - start, 4)
        results["cache_slot_side"] = cache.size
        results["cache_bytes_per_image"] = int(cache.images[0].nbytes)

        results.update(_device_stages(cache, image_size, batch_size, count))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", default="data_benchmark.json", help="JSON file to write")
    parser.add_argument("--image_size", type=int, default=227, help="model input side")
    parser.add_argument(
        "--cache_size", type=int, default=0, help="0: original resolution (default); N > 0: squash to NxN"
    )
    parser.add_argument("--count", type=int, default=512, help="synthetic training images to build")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--voc", action="store_true", help="images at VOC resolution (500x375, 375x500)")
    parser.add_argument(
        "--source_size", type=int, default=None, help="side of the generated images without --voc"
    )
    args = parser.parse_args(argv)
    from apjax.data.cache import check_cache_size

    check_cache_size(args.cache_size, "--cache_size")
    figures = run(args.image_size, args.count, args.batch_size, args.cache_size, args.voc, args.source_size)
    report = {
        "benchmark": "apjax.data",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": vars(args),
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__},
        "figures": figures,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    width = max(len(k) for k in figures)
    print(f"apjax data benchmark on {report['device']} ({report['backend']}), written to {out}")
    for k, v in figures.items():
        print(f"  {k:<{width}}  {v}")


if __name__ == "__main__":
    main()
