"""Datasets, caches and batches: one path for the synthetic benchmark and PASCAL VOC 2012.

Both datasets are tfds builders writing ``array_record`` (no TensorFlow), read back through
``tfds`` data sources, decoded once into a host uint8 cache beside the prepared data
(:mod:`apjax.data.cache`), batched by step onto a 'data' mesh (:mod:`apjax.data.pipeline`) and
augmented on the device (:mod:`apjax.data.augment`).

Splits, for both datasets: ``train`` and ``val`` (classification) and ``segmentation_val`` (the
localisation split, with class-index masks: 0 background, 1..K classes, 255 void).
"""

from __future__ import annotations

import os
from pathlib import Path

from apjax.data.cache import HostCache, get_cache
from apjax.data.synthetic import CLASS_NAMES, SyntheticConfig
from apjax.data.synthetic_builder import prepare_synthetic
from apjax.data.voc import VOC_CLASSES, load_voc_split, prepare_voc

DATASETS = ("synthetic", "voc")
SPLITS = ("train", "val", "segmentation_val")


def _check(dataset: str, split: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}.")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}.")


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
    cache_size: int,
    synthetic: SyntheticConfig | None = None,
    split_sizes: dict[str, int] | None = None,
) -> HostCache:
    """The split decoded into a host uint8 cache of side ``cache_size`` (built on first use).

    The cache sits under ``<data_dir>/apjax_cache/``, one folder per dataset variant, split and size.
    Masks are cached for every split that has them.
    """
    source = load_split(dataset, split, data_dir, synthetic, split_sizes)
    if dataset == "voc":
        key = "voc2012"
    else:
        from apjax.data.synthetic_builder import builder_config

        key = "synthetic_" + builder_config(synthetic or SyntheticConfig(), split_sizes).name
    with_masks = "mask" in source.dataset_info.features
    directory = Path(data_dir) / "apjax_cache" / key / f"{split}_{cache_size}"
    return get_cache(source, directory, cache_size, with_masks, desc=f"caching {dataset} {split}")


__all__ = [
    "DATASETS",
    "SPLITS",
    "HostCache",
    "SyntheticConfig",
    "class_names",
    "load_cached_split",
    "load_split",
    "prepare_voc",
]
