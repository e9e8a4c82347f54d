"""The host uint8 cache: each split decoded once into fixed-size arrays on disk.

Every image is resized (bilinear, antialiased; aspect not kept) to ``size x size`` and stored with its
original (H, W), so that the on-device RandomResizedCrop draws its boxes in the original geometry
(:mod:`apjax.data.augment`). Masks, when the split has them, are resized NEAREST. The arrays are ``.npy``
files opened as memory maps, so the second run starts at once and a split larger than memory still
works. A cache is written into a temporary folder and renamed into place when complete: an interrupted
build leaves nothing that could be mistaken for a cache.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

_FORMAT = 1


@dataclasses.dataclass
class HostCache:
    """One split in host memory (memory-mapped).

    Attributes:
      images: uint8 (N, S, S, 3), each image resized to S x S.
      sizes: int32 (N, 2), the original (H, W).
      labels: uint8 (N, K), multi-hot.
      masks: uint8 (N, S, S) class indices (0 background, 1..K, 255 void), or None.
      image_ids: the N image ids.
    """

    images: np.ndarray
    sizes: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None
    image_ids: list[str]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.labels.shape[1])


def _resize(array: np.ndarray, size: int, resample: int) -> np.ndarray:
    """Resizes (H, W) or (H, W, C) uint8 to (size, size[, C]) with PIL."""
    if array.shape[0] == size and array.shape[1] == size:
        return array
    return np.asarray(Image.fromarray(array).resize((size, size), resample=resample))


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def _decode(source, index: int, size: int, with_masks: bool) -> tuple:
    try:
        ex = source[index]
    except Exception as e:  # e.g. a truncated array_record file: a RuntimeError from its reader
        where = getattr(getattr(source, "dataset_info", None), "data_dir", None) or "of this split"
        message = (
            f"example {index} of the prepared dataset {where} cannot be read ({_one_line(e)}); delete that "
            "folder and prepare the dataset again (the synthetic benchmark is regenerated on the next run)."
        )
        raise (OSError if isinstance(e, OSError) else ValueError)(message) from e
    image = np.asarray(ex["image"], np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image {index} has shape {image.shape}; expected (H, W, 3) uint8.")
    image_id = ex.get("image_id", str(index))
    image_id = image_id.decode() if isinstance(image_id, bytes) else str(image_id)
    mask = None
    if with_masks:
        mask = np.asarray(ex["mask"], np.uint8).reshape(ex["mask"].shape[:2])
        if mask.shape != image.shape[:2]:
            raise ValueError(
                f"the mask of {image_id} is {mask.shape} but its image is {image.shape[:2]}; "
                "re-prepare the dataset."
            )
        mask = _resize(mask, size, Image.NEAREST)
    return (
        _resize(image, size, Image.BILINEAR),
        image.shape[:2],
        np.asarray(ex["labels"], np.uint8),
        mask,
        image_id,
    )


def _files(with_masks: bool) -> Sequence[str]:
    return ("images.npy", "sizes.npy", "labels.npy", "ids.json", "meta.json") + (
        ("masks.npy",) if with_masks else ()
    )


def build_cache(
    source, directory: str | os.PathLike, size: int, with_masks: bool, desc: str = "caching"
) -> HostCache:
    """Decodes every element of ``source`` into ``directory`` (written atomically) and loads it.

    Args:
      source: random-access source of dicts with ``image`` (H, W, 3), ``labels`` (K,), ``image_id``
        and, when ``with_masks``, ``mask`` (H, W[, 1]).
      directory: the cache folder to create.
      size: side S of the cached images.
      with_masks: also cache the masks.
      desc: progress bar label.
    """
    directory = Path(directory)
    n = len(source)
    if n == 0:
        raise ValueError(f"the split to cache into {directory} is empty; re-prepare the dataset.")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        first = _decode(source, 0, size, with_masks)
        k = first[2].shape[0]
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (n, size, size, 3))
        masks = (
            np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, (n, size, size))
            if with_masks
            else None
        )
        sizes = np.zeros((n, 2), np.int32)
        labels = np.zeros((n, k), np.uint8)
        ids = [""] * n
        workers = max(1, min(8, os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            decode = lambda i: (i, _decode(source, i, size, with_masks))  # noqa: E731
            # Chunks bound the decoded images held in memory ahead of the writer.
            done = (r for c in range(1, n, 512) for r in pool.map(decode, range(c, min(n, c + 512))))
            for i, (image, hw, label, mask, image_id) in tqdm(
                _chain_first(first, done), total=n, desc=desc, leave=False
            ):
                images[i], sizes[i], labels[i], ids[i] = image, hw, label, image_id
                if masks is not None:
                    masks[i] = mask
        images.flush()
        del images
        if masks is not None:
            masks.flush()
            del masks
        np.save(tmp / "sizes.npy", sizes)
        np.save(tmp / "labels.npy", labels)
        (tmp / "ids.json").write_text(json.dumps(ids))
        (tmp / "meta.json").write_text(
            json.dumps({"format": _FORMAT, "size": size, "count": n, "with_masks": with_masks})
        )
        if directory.exists():  # a stale or foreign folder: replace it whole
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_cache(directory)


def _chain_first(first, rest):
    yield 0, first
    yield from rest


def load_cache(directory: str | os.PathLike) -> HostCache:
    """Opens a complete cache folder (memory-mapped, read-only)."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / "meta.json").read_text())
        with_masks = bool(meta["with_masks"])
        cache = HostCache(
            images=np.load(directory / "images.npy", mmap_mode="r"),
            sizes=np.load(directory / "sizes.npy"),
            labels=np.load(directory / "labels.npy"),
            masks=np.load(directory / "masks.npy", mmap_mode="r") if with_masks else None,
            image_ids=json.loads((directory / "ids.json").read_text()),
        )
        arrays = [cache.images, cache.sizes, cache.labels, cache.image_ids]
        if any(len(a) != meta["count"] for a in arrays + ([cache.masks] if with_masks else [])):
            raise ValueError(f"its arrays do not all hold the {meta['count']} images its meta.json counts")
    except (OSError, ValueError, KeyError, EOFError) as e:  # truncated or damaged files
        raise ValueError(
            f"the host cache {directory} is damaged ({_one_line(e)}); delete that folder and the next run "
            "rebuilds it."
        ) from e
    return cache


def cache_is_complete(directory: str | os.PathLike, size: int, count: int, with_masks: bool) -> bool:
    """True when ``directory`` holds a finished cache of these settings."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    expected = {"format": _FORMAT, "size": size, "count": count, "with_masks": with_masks}
    return meta == expected and all((directory / f).exists() for f in _files(with_masks))


def get_cache(
    source, directory: str | os.PathLike, size: int, with_masks: bool, desc: str = "caching"
) -> HostCache:
    """Loads the cache in ``directory`` if it is complete for these settings, else builds it."""
    if cache_is_complete(directory, size, len(source), with_masks):
        return load_cache(directory)
    return build_cache(source, directory, size, with_masks, desc=desc)
