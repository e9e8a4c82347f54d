"""The host uint8 cache: each split decoded once into fixed-size arrays on disk.

Every image sits in a square uint8 slot of side S, at ``[0:h, 0:w]`` with zeros elsewhere, together with
its original size (H, W) and the extent (h, w) of the slot it fills. Two layouts, chosen by
``cache_size``:

* ``cache_size = ORIGINAL`` (0, the default and the reference's pipeline, SPEC section 3): each image
  is stored at its ORIGINAL resolution, ``(h, w) = (H, W)``; S is the largest side in the split (VOC
  2012: 500). The on-device RandomResizedCrop then cuts its box from the original pixels and resizes it
  once, eval images are the original resized once, masks are resized once (NEAREST) from the original
  mask (:mod:`apjax.data.augment`).
* ``cache_size = N > 0``: every image is squashed (bilinear, antialiased, aspect not kept) to N x N,
  ``(h, w) = (N, N)``, masks NEAREST. A DEVIATION from the reference, kept for small hosts and for the
  earlier runs made with it: a crop of the squashed copy is resampled twice, so training crops that
  torchvision would downsample from the original are often upsampled from the copy (blurrier), and
  eval images and masks are resized twice (boundaries shift).

The arrays are ``.npy`` files opened as memory maps, so the second run starts at once and a split larger
than memory still works. A cache records what it was built from (a fingerprint of the prepared dataset's
files, see :func:`source_fingerprint`) and its settings; a cache whose source or settings differ is
rebuilt. A cache is written into a temporary folder and renamed into place when complete: an interrupted
build leaves nothing that could be mistaken for a cache.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from apjax.errors import ConfigError, UnreadableError

_FORMAT = 2
# cache_size value of the faithful layout: every image at its original resolution.
ORIGINAL = 0
# Decoded examples held ahead of the writer (bounds host memory: 128 VOC images are about 100 MB).
_CHUNK = 128


@dataclasses.dataclass
class HostCache:
    """One split in host memory (memory-mapped).

    Attributes:
      images: uint8 (N, S, S, 3) slots; image i fills ``[0:h, 0:w]`` with ``(h, w) = extents[i]``, the
        rest is zero.
      sizes: int32 (N, 2), the original (H, W).
      extents: int32 (N, 2), the (h, w) of the slot the stored image fills: ``sizes`` when stored at
        original resolution, ``(S, S)`` when squashed.
      labels: uint8 (N, K), multi-hot.
      masks: uint8 (N, S, S) class indices (0 background, 1..K, 255 void) laid out like ``images``, or None.
      image_ids: the N image ids.
      cache_size: :data:`ORIGINAL` (0) or the side N every image was squashed to.
    """

    images: np.ndarray
    sizes: np.ndarray
    extents: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None
    image_ids: list[str]
    cache_size: int = ORIGINAL

    def __len__(self) -> int:
        return len(self.images)

    @property
    def size(self) -> int:
        """The slot side S."""
        return int(self.images.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.labels.shape[1])


def check_cache_size(cache_size, name: str = "cache_size") -> int:
    """``cache_size`` as an int (0: original resolution, N > 0: squash to N x N); else a ConfigError."""
    if isinstance(cache_size, bool) or not isinstance(cache_size, int | np.integer) or cache_size < 0:
        raise ConfigError(
            f"{name} must be 0 (images at their original resolution, the reference's pipeline) or a "
            f"positive side N (squash every image to NxN, a deviation), got {cache_size!r}."
        )
    return int(cache_size)


def _squash(array: np.ndarray, size: int, resample: int) -> np.ndarray:
    """Resizes (H, W) or (H, W, C) uint8 to (size, size[, C]) with PIL."""
    if array.shape[0] == size and array.shape[1] == size:
        return array
    return np.asarray(Image.fromarray(array).resize((size, size), resample=resample))


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def _decode(source, index: int, cache_size: int, with_masks: bool) -> tuple:
    """Example ``index`` as (image, (H, W), labels, mask, image_id), squashed when ``cache_size`` > 0."""
    try:
        ex = source[index]
    except Exception as e:  # e.g. a truncated array_record file: a RuntimeError from its reader
        where = getattr(getattr(source, "dataset_info", None), "data_dir", None) or "of this split"
        message = (
            f"example {index} of the prepared dataset {where} cannot be read ({_one_line(e)}); delete that "
            "folder and prepare the dataset again (the synthetic benchmark is regenerated on the next run)."
        )
        raise (UnreadableError if isinstance(e, OSError) else ConfigError)(message) from e
    image = np.asarray(ex["image"], np.uint8)
    if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ConfigError(f"image {index} has shape {image.shape}; expected (H, W, 3) uint8.")
    image_id = ex.get("image_id", str(index))
    image_id = image_id.decode() if isinstance(image_id, bytes) else str(image_id)
    mask = None
    if with_masks:
        mask = np.asarray(ex["mask"], np.uint8).reshape(ex["mask"].shape[:2])
        if mask.shape != image.shape[:2]:
            raise ConfigError(
                f"the mask of {image_id} is {mask.shape} but its image is {image.shape[:2]}; "
                "re-prepare the dataset."
            )
    hw = image.shape[:2]
    if cache_size:
        image = _squash(image, cache_size, Image.BILINEAR)
        mask = None if mask is None else _squash(mask, cache_size, Image.NEAREST)
    return image, hw, np.asarray(ex["labels"], np.uint8), mask, image_id


def _files(with_masks: bool) -> Sequence[str]:
    names = ("images.npy", "sizes.npy", "extents.npy", "labels.npy", "ids.json", "meta.json")
    return names + (("masks.npy",) if with_masks else ())


def source_fingerprint(source) -> str | None:
    """A digest of the prepared dataset behind a tfds data source, or None for another source.

    It covers every file of the prepared version folder (``source.dataset_info.data_dir``): relative
    name, size and modification time. Preparing the dataset again writes new files, so a cache built
    from an earlier preparation no longer matches and is rebuilt.
    """
    data_dir = getattr(getattr(source, "dataset_info", None), "data_dir", None)
    if data_dir is None:
        return None
    root = Path(os.fspath(data_dir))
    if not root.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class _Slots:
    """The images (and masks) memory maps of a build, whose slot side can grow while they are filled."""

    def __init__(self, folder: Path, n: int, side: int, with_masks: bool):
        self.folder, self.n, self.side = folder, n, side
        self.images = self._open("images.npy", (3,))
        self.masks = self._open("masks.npy", ()) if with_masks else None

    def _open(self, name: str, channels: tuple) -> np.ndarray:
        # A fresh .npy memory map is all zeros: the padding of every slot.
        return np.lib.format.open_memmap(
            self.folder / name, "w+", np.uint8, (self.n, self.side, self.side, *channels)
        )

    def grow(self, side: int, filled: int) -> None:
        """Re-lays the first ``filled`` slots into slots of side ``side`` (a larger image came up)."""
        old_side, self.side = self.side, side
        for attr, name, channels in (("images", "images.npy", (3,)), ("masks", "masks.npy", ())):
            old = getattr(self, attr)
            if old is None:
                continue
            old.flush()
            os.replace(self.folder / name, self.folder / f"old_{name}")
            new = self._open(name, channels)
            for start in range(0, filled, 256):
                stop = min(filled, start + 256)
                new[start:stop, :old_side, :old_side] = old[start:stop]
            setattr(self, attr, new)
            del old
            (self.folder / f"old_{name}").unlink()

    def close(self) -> None:
        for attr in ("images", "masks"):
            array = getattr(self, attr)
            if array is not None:
                array.flush()
            setattr(self, attr, None)


def _fill_slots(source, first: tuple, slots: _Slots, cache_size: int, with_masks: bool, desc: str):
    """Decodes ``source`` (its element 0 already decoded as ``first``) into ``slots`` on a thread pool.

    Returns ``({"sizes": int32 (N, 2) original (H, W), "extents": int32 (N, 2) stored (h, w), "labels": uint8
    (N, K)}, ids)`` with ``ids`` the N image ids.
    """
    n = len(source)
    sizes = np.zeros((n, 2), np.int32)
    extents = np.zeros((n, 2), np.int32)
    labels = np.zeros((n, first[2].shape[0]), np.uint8)
    ids = [""] * n
    workers = max(1, min(8, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        decode = lambda i: (i, _decode(source, i, cache_size, with_masks))  # noqa: E731
        # Chunks bound the decoded images held in memory ahead of the writer.
        done = (r for c in range(1, n, _CHUNK) for r in pool.map(decode, range(c, min(n, c + _CHUNK))))
        for i, (image, hw, label, mask, image_id) in tqdm(
            _chain_first(first, done), total=n, desc=desc, leave=False
        ):
            h, w = image.shape[:2]
            if max(h, w) > slots.side:
                slots.grow(max(h, w), filled=i)
            slots.images[i, :h, :w] = image
            if slots.masks is not None:
                slots.masks[i, :h, :w] = mask
            sizes[i], extents[i], labels[i], ids[i] = hw, (h, w), label, image_id
    return {"sizes": sizes, "extents": extents, "labels": labels}, ids


def build_cache(
    source,
    directory: str | os.PathLike,
    cache_size: int,
    with_masks: bool,
    desc: str = "caching",
    fingerprint: str | None = None,
) -> HostCache:
    """Decodes every element of ``source`` into ``directory`` (written atomically) and loads it.

    Args:
      source: random-access source of dicts with ``image`` (H, W, 3), ``labels`` (K,), ``image_id``
        and, when ``with_masks``, ``mask`` (H, W[, 1]).
      directory: the cache folder to create.
      cache_size: :data:`ORIGINAL` (0) to store each image at its original resolution in a slot of the
        split's largest side, or N > 0 to squash every image to N x N (a deviation).
      with_masks: also cache the masks.
      desc: progress bar label.
      fingerprint: what the cache is built from (:func:`source_fingerprint`), recorded in its meta.json.
    """
    cache_size = check_cache_size(cache_size)
    directory = Path(directory)
    n = len(source)
    if n == 0:
        raise ConfigError(f"the split to cache into {directory} is empty; re-prepare the dataset.")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        first = _decode(source, 0, cache_size, with_masks)
        # Original resolution: start from the first image's larger side and grow when a larger one comes
        # (VOC: almost every image has a 500-pixel side, so the first slot side is usually final).
        slots = _Slots(tmp, n, cache_size or max(first[1]), with_masks)
        arrays, ids = _fill_slots(source, first, slots, cache_size, with_masks, desc)
        side = slots.side
        slots.close()
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
        (tmp / "ids.json").write_text(json.dumps(ids))
        meta = {**_meta(cache_size, n, with_masks, fingerprint), "slot": side}
        (tmp / "meta.json").write_text(json.dumps(meta))
        if directory.exists():  # a stale or foreign folder: replace it whole
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_cache(directory)


def _meta(cache_size: int, count: int, with_masks: bool, fingerprint: str | None) -> dict:
    return {
        "format": _FORMAT,
        "cache_size": cache_size,
        "count": count,
        "with_masks": with_masks,
        "source": fingerprint,
    }


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
            extents=np.load(directory / "extents.npy"),
            labels=np.load(directory / "labels.npy"),
            masks=np.load(directory / "masks.npy", mmap_mode="r") if with_masks else None,
            image_ids=json.loads((directory / "ids.json").read_text()),
            cache_size=int(meta["cache_size"]),
        )
        arrays = [cache.images, cache.sizes, cache.extents, cache.labels, cache.image_ids]
        if any(len(a) != meta["count"] for a in arrays + ([cache.masks] if with_masks else [])):
            raise ValueError(f"its arrays do not all hold the {meta['count']} images its meta.json counts")
    except (OSError, ValueError, KeyError, EOFError) as e:  # truncated or damaged files
        raise ConfigError(
            f"the host cache {directory} is damaged ({_one_line(e)}); delete that folder and the next run "
            "rebuilds it."
        ) from e
    return cache


def cache_is_complete(
    directory: str | os.PathLike,
    cache_size: int,
    count: int,
    with_masks: bool,
    fingerprint: str | None = None,
) -> bool:
    """True when ``directory`` holds a finished cache of these settings, built from ``fingerprint``."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict):
        return False
    meta.pop("slot", None)
    return meta == _meta(cache_size, count, with_masks, fingerprint) and all(
        (directory / f).exists() for f in _files(with_masks)
    )


def get_cache(
    source,
    directory: str | os.PathLike,
    cache_size: int,
    with_masks: bool,
    desc: str = "caching",
    fingerprint: str | None = None,
) -> HostCache:
    """Loads the cache in ``directory`` if it is complete for these settings and this source, else builds it.

    ``fingerprint`` defaults to :func:`source_fingerprint` of ``source``.
    """
    cache_size = check_cache_size(cache_size)
    if fingerprint is None:
        fingerprint = source_fingerprint(source)
    if cache_is_complete(directory, cache_size, len(source), with_masks, fingerprint):
        return load_cache(directory)
    return build_cache(source, directory, cache_size, with_masks, desc=desc, fingerprint=fingerprint)
