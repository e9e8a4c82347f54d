"""Batches from the host cache onto a 'data' mesh, with a background prefetch thread.

Training batches are addressed by step: step s of a run with seed ``seed`` always holds the same
images (epoch ``s // steps_per_epoch`` is one permutation drawn from ``(seed, epoch)``; the last
incomplete batch of an epoch is dropped), so a resumed run needs only the step to continue exactly
where it stopped. In a multi-process run each process gathers only its own contiguous slice of the
global batch, and the slices are assembled into one global ``jax.Array`` split over the 'data' axis.
The batches stay uint8 on the way to the device, each image in its cache slot with its original size
(``sizes``) and the extent of the slot it fills (``extents``); the augmentation runs there
(:func:`apjax.data.augment.train_augment`, typically inside the jitted train step).

With ``config.data.on_device`` the training split's arrays are copied once into the memory of every device
(:class:`DeviceCache`) and a batch is a gather there: only its indices cross from the host. A
host-fed batch and a device-resident batch of the same step are equal, element for element.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from apjax.data.augment import resize_masks_nearest
from apjax.data.cache import HostCache
from apjax.errors import ConfigError


def data_mesh(devices: list | None = None) -> Mesh:
    """A one-axis mesh named 'data' over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data', the rest replicated."""
    return NamedSharding(mesh, PartitionSpec("data"))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    """Raises ``ConfigError`` unless the global batch splits evenly over devices and processes."""
    n_dev, n_proc = mesh.devices.size, jax.process_count()
    if global_batch_size < 1 or global_batch_size % n_dev or global_batch_size % n_proc:
        raise ConfigError(
            f"batch_size={global_batch_size} does not split evenly over {n_dev} devices in "
            f"{n_proc} process(es); use a multiple of {n_dev}."
        )


def _to_global(local: dict[str, np.ndarray], mesh: Mesh, global_batch_size: int) -> dict:
    sharding = batch_sharding(mesh)
    shape = lambda v: (global_batch_size, *v.shape[1:])  # noqa: E731
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, v, shape(v)), local)


def bytes_text(n: float) -> str:
    """``n`` bytes in the largest binary unit that leaves at least 1: '4.27 GiB', '12.0 MiB', '501 B'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GiB" else f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def check_device_memory(nbytes: int, mesh: Mesh, fraction: float = 0.5) -> None:
    """Raises ``ConfigError`` unless ``nbytes`` held on every device of ``mesh`` leaves most of its memory.

    A device that reports its memory (GPU, TPU: ``bytes_limit``) may give at most ``fraction`` of it. CPU
    devices share the host's memory: there ``nbytes`` counts once against ``fraction`` of the host's
    physical memory, as XLA:CPU's arrays of the memory-mapped cache share its pages instead of copying
    them (measured with jax 0.10: 8 CPU devices, one buffer address, no growth of the resident set).
    """
    devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    stats = devices[0].memory_stats() if devices else None
    if stats and stats.get("bytes_limit"):
        have, where = int(stats["bytes_limit"]), f"{devices[0].device_kind} device"
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        where = "host's memory (shared by its CPU devices)"
    if nbytes > fraction * have:
        raise ConfigError(
            f"config.data.on_device=True needs {bytes_text(nbytes)} of the {bytes_text(have)} of the "
            f"{where} for the training split, more than {fraction:.0%} of it (the rest is for training); "
            "set config.data.on_device=False (batches from host memory) or shrink the cache with "
            "config.data.cache_size=N."
        )


class DeviceCache:
    """A training split's cache arrays held in the memory of every device of a mesh (replicated).

    ``gather(index)`` returns the batch of the int32 (B,) indices ``index`` (split over 'data'): ``images``
    uint8 (B, S, S, 3), ``sizes`` int32 (B, 2), ``extents`` int32 (B, 2), ``labels`` uint8 (B, K), split
    like ``index``. Each device gathers its own rows from its own copy, so the gather moves no data between
    devices and none from the host. Memory: the split's bytes (:attr:`nbytes`) on every accelerator, checked
    against the device's capacity first (:func:`check_device_memory`); XLA:CPU's devices share the host
    cache's memory-mapped pages.
    """

    FIELDS = ("images", "sizes", "extents", "labels")

    def __init__(self, cache: HostCache, mesh: Mesh):
        self.cache, self.mesh = cache, mesh
        self.nbytes = sum(int(getattr(cache, f).nbytes) for f in self.FIELDS)
        check_device_memory(self.nbytes, mesh)
        replicated = NamedSharding(mesh, PartitionSpec())
        # From a callback: every process reads its own (memory-mapped) copy of the split for its devices.
        self.arrays = {
            f: jax.make_array_from_callback(a.shape, replicated, lambda i, a=a: np.asarray(a[i]))
            for f in self.FIELDS
            for a in [getattr(cache, f)]
        }
        self._gather = jax.jit(
            lambda arrays, index: {k: v[index] for k, v in arrays.items()},
            out_shardings=batch_sharding(mesh),
        )

    def gather(self, index: jax.Array) -> dict[str, jax.Array]:
        """The cached arrays at ``index`` (int32 (B,), split over 'data'), split the same way."""
        return self._gather(self.arrays, index)


class TrainBatches:
    """Shuffled training batches of a :class:`HostCache`, addressed by step.

    Each batch is a dict of global arrays: ``images`` uint8 (B, S, S, 3) cache slots, ``sizes`` int32
    (B, 2) original (H, W), ``extents`` int32 (B, 2) the (h, w) each image fills in its slot, ``labels``
    uint8 (B, K), ``index`` int32 (B,) the images' indices in the split, split over the mesh's 'data'
    axis. With a ``resident`` :class:`DeviceCache` of the same split, the images, sizes, extents and labels
    are gathered on the devices and only ``index`` comes from the host; the batches are the same.
    """

    def __init__(
        self,
        cache: HostCache,
        global_batch_size: int,
        seed: int,
        mesh: Mesh,
        resident: DeviceCache | None = None,
    ):
        check_batch_size(global_batch_size, mesh)
        if len(cache) < global_batch_size:
            raise ConfigError(
                f"the training split has {len(cache)} images, fewer than batch_size="
                f"{global_batch_size}; lower the batch size or use a larger split."
            )
        if resident is not None and resident.cache is not cache:
            raise ValueError("the resident DeviceCache holds another split than the batches' cache.")
        self.cache, self.batch_size, self.seed, self.mesh = cache, global_batch_size, seed, mesh
        self.resident = resident
        self.steps_per_epoch = len(cache) // global_batch_size
        self.local_batch_size = global_batch_size // jax.process_count()
        self._perm_epoch, self._perm = -1, None

    def indices(self, step: int) -> np.ndarray:
        """The global batch's image indices at ``step``: int64 (B,)."""
        epoch, i = divmod(int(step), self.steps_per_epoch)
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(len(self.cache)), epoch
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of the batch at ``step``, as numpy arrays (only ``index`` when resident)."""
        # Sorted (kinder to a memory map) BEFORE the split: the global batch then has the same order, so
        # each image meets the same augmentation draw, whatever the number of processes.
        idx = np.sort(self.indices(step))
        p, n = jax.process_index(), self.local_batch_size
        idx = idx[p * n : (p + 1) * n]
        if self.resident is not None:
            return {"index": idx.astype(np.int32)}
        c = self.cache
        return {
            "images": c.images[idx],
            "sizes": c.sizes[idx],
            "extents": c.extents[idx],
            "labels": c.labels[idx],
            "index": idx.astype(np.int32),
        }

    def batch(self, step: int) -> dict[str, jax.Array]:
        """The global batch at ``step`` on the mesh."""
        batch = _to_global(self.host_batch(step), self.mesh, self.batch_size)
        if self.resident is None:
            return batch
        return {**self.resident.gather(batch["index"]), **batch}

    def iterate(self, start_step: int, num_steps: int, prefetch: int = 2) -> Iterator[tuple[int, dict]]:
        """Yields ``(step, batch)`` for steps ``start_step .. num_steps - 1``, gathered ahead of use.

        A background thread gathers and transfers up to ``prefetch`` batches ahead, so the device
        never waits on the host while the host keeps up.
        """
        yield from _prefetch(((s, self.batch(s)) for s in range(start_step, num_steps)), prefetch)


def eval_batches(
    cache: HostCache, global_batch_size: int, mesh: Mesh, prefetch: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """The whole split in order, in global batches; the last is padded and flagged by ``valid``.

    Each batch holds ``images`` uint8 (B, S, S, 3) cache slots, ``extents`` int32 (B, 2) the (h, w) each
    image fills in its slot, ``labels`` uint8 (B, K), ``valid`` bool (B,), ``index`` int32 (B,) into the
    split, and ``masks`` uint8 (B, S, S) (laid out like ``images``) when the split has masks.
    """
    check_batch_size(global_batch_size, mesh)
    n = len(cache)
    local = global_batch_size // jax.process_count()
    p = jax.process_index()

    def gen():
        for start in range(0, n, global_batch_size):
            idx = np.arange(start + p * local, start + (p + 1) * local)
            valid = idx < n
            idx = np.where(valid, idx, n - 1)
            batch = {
                "images": cache.images[idx],
                "extents": cache.extents[idx],
                "labels": cache.labels[idx],
                "valid": valid,
                "index": idx.astype(np.int32),
            }
            if cache.masks is not None:
                batch["masks"] = cache.masks[idx]
            yield _to_global(batch, mesh, global_batch_size)

    yield from _prefetch(gen(), prefetch)


def eval_masks(cache: HostCache, out_size: int, chunk: int = 256) -> np.ndarray:
    """The split's masks, each resized once (NEAREST) from its stored mask: uint8 (N, out_size, out_size).

    At original resolution this is the original mask resized once, as the reference does (SPEC section 3);
    the slot padding is never read (:func:`apjax.data.augment.resize_masks_nearest`).
    """
    if cache.masks is None:
        raise ConfigError("this split has no masks; localisation needs the segmentation_val split.")
    resize = _resize_masks_jit()
    return np.concatenate(
        [
            np.asarray(resize(cache.masks[i : i + chunk], cache.extents[i : i + chunk], out_size=out_size))
            for i in range(0, len(cache), chunk)
        ]
    )


@functools.cache
def _resize_masks_jit():
    return jax.jit(resize_masks_nearest, static_argnames=("out_size",))


def _prefetch(items: Iterator, depth: int) -> Iterator:
    """Runs ``items`` in a daemon thread, ``depth`` ahead; errors surface in the consumer."""
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        """Queues ``item`` unless the consumer stopped first (then False)."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as e:  # handed to the consumer
            put(e)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # Join the worker before the consumer goes on (or its error leaves the process): a thread still
        # inside a transfer to the devices at interpreter shutdown can abort the process.
        stop.set()
        thread.join()
