"""Datasets, caches and batches: one path for the synthetic benchmark and PASCAL VOC 2012.

Both datasets are tfds builders writing ``array_record`` (no TensorFlow), read back through
``tfds`` data sources, decoded once into a host uint8 cache beside the prepared data
(:mod:`apjax.data.cache`), batched by step onto a 'data' mesh (:mod:`apjax.data.pipeline`) and
augmented on the device (:mod:`apjax.data.augment`).

``config.data.cache_size`` chooses the cache's layout: ``0`` (the default) keeps every image at its
original resolution, so training crops and eval images are resized once from the original as in the
reference (SPEC section 3); ``N > 0`` squashes every image to ``N x N`` first, a DEVIATION (blurrier
training crops, eval images and masks resized twice) kept for small hosts and earlier runs.

Splits, for both datasets: ``train`` and ``val`` (classification) and ``segmentation_val`` (the
localisation split, with class-index masks: 0 background, 1..K classes, 255 void).
"""

from __future__ import annotations

import os
from pathlib import Path

from apjax.data.cache import ORIGINAL, HostCache, check_cache_size, get_cache, source_fingerprint
from apjax.data.synthetic import SyntheticConfig
from apjax.data.synthetic_builder import prepare_synthetic
from apjax.data.synthetic_shapes import CLASS_NAMES
from apjax.data.voc import VOC_SPLIT_SIZES, load_voc_split, prepare_voc
from apjax.data.voc_source import VOC_CLASSES
from apjax.errors import ConfigError

DATASETS = ("synthetic", "voc")
SPLITS = ("train", "val", "segmentation_val")


def _check(dataset: str, split: str) -> None:
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}.")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {list(SPLITS)}.")


def check_data_config(data) -> None:
    """Validates a ``config.data`` block (called by :func:`apjax.tasks.validate_config`); one-sentence errors.

    Checks the dataset name, ``cache_size`` (0: original resolution; N > 0: squash to N x N),
    ``on_device`` (a bool: the training split held in device memory,
    :class:`~apjax.data.pipeline.DeviceCache`) and
    ``split_sizes``: for the synthetic benchmark each split needs at least one image; for VOC it is
    refused (VOC's splits are the official image lists), except when it repeats their official sizes
    (older configs carried them).
    """
    _check(data.dataset, "train")
    check_cache_size(data.cache_size, "config.data.cache_size")
    if not isinstance(data.get("on_device", False), bool):
        raise ConfigError(f"config.data.on_device must be True or False, got {data.on_device!r}.")
    sizes = data.get("split_sizes")
    sizes = {} if sizes is None else dict(sizes)
    if data.dataset == "voc":
        if any(VOC_SPLIT_SIZES.get(split) != n for split, n in sizes.items()):
            official = ", ".join(f"{s} {n:,}" for s, n in VOC_SPLIT_SIZES.items())
            raise ConfigError(
                f"config.data.split_sizes={sizes} cannot apply to VOC, whose splits are the official image "
                f"lists ({official} images): remove split_sizes (for a smaller run use data=synthetic, or "
                "prepare VOC from a copy whose ImageSets lists are shorter)."
            )
        return
    unknown = sorted(set(sizes) - set(SPLITS))
    if unknown:
        raise ConfigError(f"unknown config.data.split_sizes {unknown}; the splits are {list(SPLITS)}.")
    bad = {s: n for s, n in sizes.items() if isinstance(n, bool) or not isinstance(n, int) or n < 1}
    if bad:
        raise ConfigError(f"config.data.split_sizes must give each split at least one image, got {bad}.")


def class_names(dataset: str, synthetic: SyntheticConfig | None = None) -> tuple[str, ...]:
    """The class names, in label order (class k of a mask is ``names[k - 1]``)."""
    _check(dataset, "train")
    if dataset == "voc":
        return VOC_CLASSES
    return CLASS_NAMES[: (synthetic or SyntheticConfig()).num_classes]


def load_split(
    dataset: str,
    split: str,
    data_dir: str | os.PathLike,
    synthetic: SyntheticConfig | None = None,
    split_sizes: dict[str, int] | None = None,
):
    """A random-access source of one split's examples, preparing the synthetic benchmark if needed.

    Examples are dicts with ``image`` uint8 (H, W, 3), ``labels`` uint8 (K,), ``image_id`` and, where
    the split has them, ``mask`` uint8 (H, W, 1). VOC must be prepared first (:func:`prepare_voc`); the
    synthetic benchmark is generated on first use.
    """
    _check(dataset, split)
    if dataset == "voc":
        return load_voc_split(data_dir, split)
    builder = prepare_synthetic(data_dir, synthetic or SyntheticConfig(), split_sizes)
    return builder.as_data_source(split=split)


def load_cached_split(
    dataset: str,
    split: str,
    data_dir: str | os.PathLike,
    cache_size: int = ORIGINAL,
    synthetic: SyntheticConfig | None = None,
    split_sizes: dict[str, int] | None = None,
) -> HostCache:
    """The split decoded into a host uint8 cache (built on first use, rebuilt when the data changed).

    ``cache_size`` is :data:`~apjax.data.cache.ORIGINAL` (0: every image at its original resolution, the
    reference's pipeline) or N > 0 (every image squashed to N x N, a deviation). The cache sits under
    ``<data_dir>/apjax_cache/``, one folder per dataset variant, split and layout; it records a
    fingerprint of the prepared dataset it was built from and is rebuilt when the dataset was prepared
    again. Masks are cached for every split that has them.
    """
    cache_size = check_cache_size(cache_size)
    source = load_split(dataset, split, data_dir, synthetic, split_sizes)
    if dataset == "voc":
        key = "voc2012"
    else:
        from apjax.data.synthetic_builder import builder_config

        key = "synthetic_" + builder_config(synthetic or SyntheticConfig(), split_sizes).name
    with_masks = "mask" in source.dataset_info.features
    directory = Path(data_dir) / "apjax_cache" / key / f"{split}_{cache_size}"  # <split>_0: original
    return get_cache(
        source,
        directory,
        cache_size,
        with_masks,
        desc=f"caching {dataset} {split}",
        fingerprint=source_fingerprint(source),
    )


__all__ = [
    "DATASETS",
    "ORIGINAL",
    "SPLITS",
    "HostCache",
    "SyntheticConfig",
    "check_data_config",
    "class_names",
    "load_cached_split",
    "load_split",
    "prepare_voc",
]
