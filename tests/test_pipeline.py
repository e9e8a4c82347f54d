"""The data path end to end: synthetic tfds builder -> host cache -> batches on a mesh -> augment."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from apjax.data import cache as cache_lib
from apjax.data import class_names, load_cached_split, load_split
from apjax.data.augment import MEAN, STD, train_augment
from apjax.data.pipeline import (
    DeviceCache,
    TrainBatches,
    batch_sharding,
    check_device_memory,
    data_mesh,
    eval_batches,
    eval_masks,
)
from apjax.data.synthetic import SyntheticConfig, generate_example
from apjax.errors import ConfigError

# The module's fixture is built once, on one xdist worker.
pytestmark = pytest.mark.xdist_group("pipeline")

GEN = SyntheticConfig(num_classes=6, image_size=40, seed=3)
SIZES = {"train": 40, "val": 12, "segmentation_val": 10}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def test_tfds_round_trip_equals_generator(data_dir):
    source = load_split("synthetic", "segmentation_val", data_dir, GEN, SIZES)
    assert len(source) == SIZES["segmentation_val"]
    by_id = {}
    for i in range(len(source)):
        ex = source[i]
        image_id = ex["image_id"].decode() if isinstance(ex["image_id"], bytes) else ex["image_id"]
        by_id[image_id] = ex
    for index in range(SIZES["segmentation_val"]):
        want = generate_example(GEN, "segmentation_val", index)
        got = by_id[want["image_id"]]
        np.testing.assert_array_equal(got["image"], want["image"])  # PNG is lossless
        np.testing.assert_array_equal(got["mask"][..., 0], want["mask"])
        np.testing.assert_array_equal(got["labels"], want["labels"])
    assert class_names("synthetic", GEN) == class_names("synthetic", GEN)[:6]


def test_default_cache_holds_the_original_images_and_masks(data_dir):
    cache = load_cached_split("synthetic", "segmentation_val", data_dir, 0, GEN, SIZES)
    assert cache.cache_size == 0 and cache.size == 40
    assert cache.images.shape == (10, 40, 40, 3) and cache.images.dtype == np.uint8
    assert cache.sizes.tolist() == cache.extents.tolist() == [[40, 40]] * 10
    for i, image_id in enumerate(cache.image_ids):
        want = generate_example(GEN, "segmentation_val", int(image_id.split("_")[-1]))
        np.testing.assert_array_equal(cache.images[i], want["image"])
        np.testing.assert_array_equal(cache.masks[i], want["mask"])
        np.testing.assert_array_equal(cache.labels[i], want["labels"])
    assert load_cached_split("synthetic", "segmentation_val", data_dir, 0, GEN, SIZES).size == 40


def test_squashed_cache_holds_resized_images_sizes_and_nearest_masks(data_dir):
    """The explicit deviation: cache_size = N squashes every image to N x N."""
    cache = load_cached_split("synthetic", "segmentation_val", data_dir, 24, GEN, SIZES)
    assert cache.images.shape == (10, 24, 24, 3) and cache.images.dtype == np.uint8
    assert cache.masks.shape == (10, 24, 24) and cache.sizes.tolist() == [[40, 40]] * 10
    assert cache.extents.tolist() == [[24, 24]] * 10 and cache.cache_size == 24
    for i, image_id in enumerate(cache.image_ids):
        index = int(image_id.split("_")[-1])
        want = generate_example(GEN, "segmentation_val", index)
        resized = np.asarray(Image.fromarray(want["image"]).resize((24, 24), Image.BILINEAR))
        np.testing.assert_array_equal(cache.images[i], resized)
        # NEAREST with pixel centres: output pixel j reads source pixel floor((j + 0.5) * 40 / 24).
        src = np.floor((np.arange(24) + 0.5) * 40 / 24).astype(int)
        np.testing.assert_array_equal(cache.masks[i], want["mask"][np.ix_(src, src)])
        np.testing.assert_array_equal(cache.labels[i], want["labels"])
    assert load_cached_split("synthetic", "train", data_dir, 24, GEN, SIZES).masks is not None
    with pytest.raises(ValueError, match="cache_size must be 0 .* or a positive side N"):
        load_cached_split("synthetic", "train", data_dir, -1, GEN, SIZES)


def test_cache_is_reused_and_never_half_written(data_dir, tmp_path, monkeypatch):
    load_cached_split("synthetic", "val", data_dir, 16, GEN, SIZES)
    calls = []
    monkeypatch.setattr(cache_lib, "build_cache", lambda *a, **k: calls.append(1))
    load_cached_split("synthetic", "val", data_dir, 16, GEN, SIZES)
    assert calls == []
    monkeypatch.undo()

    class Broken:
        def __init__(self, source, bad):
            self.source, self.bad = source, bad

        def __len__(self):
            return len(self.source)

        def __getitem__(self, i):
            if i == self.bad:
                raise OSError(f"unreadable example {i}")
            return self.source[i]

    source = load_split("synthetic", "val", data_dir, GEN, SIZES)
    target = tmp_path / "cache" / "val_16"
    with pytest.raises(OSError, match="unreadable example 7"):
        cache_lib.build_cache(Broken(source, 7), target, 16, with_masks=True)
    assert not target.exists() and list((tmp_path / "cache").iterdir()) == []
    # A folder with a wrong or missing meta.json is not taken for a cache.
    target.mkdir(parents=True)
    (target / "meta.json").write_text(json.dumps({"format": 1, "size": 8}))
    assert not cache_lib.cache_is_complete(target, 16, len(source), True)
    built = cache_lib.get_cache(source, target, 16, with_masks=True)
    assert len(built) == len(source)


def test_train_batches_are_epoch_permutations_addressed_by_step(data_dir):
    cache = load_cached_split("synthetic", "train", data_dir, 0, GEN, SIZES)
    mesh = data_mesh()
    batches = TrainBatches(cache, 8, seed=5, mesh=mesh)
    assert batches.steps_per_epoch == 5
    epoch0 = np.concatenate([batches.indices(s) for s in range(5)])
    epoch1 = np.concatenate([batches.indices(s) for s in range(5, 10)])
    assert sorted(epoch0) == list(range(40)) and sorted(epoch1) == list(range(40))
    assert not np.array_equal(epoch0, epoch1)
    again = TrainBatches(cache, 8, seed=5, mesh=mesh)
    np.testing.assert_array_equal(again.indices(7), batches.indices(7))  # resume needs only the step
    assert not np.array_equal(TrainBatches(cache, 8, seed=6, mesh=mesh).indices(0), batches.indices(0))
    steps = [s for s, _ in batches.iterate(3, 7)]
    assert steps == [3, 4, 5, 6]
    b = batches.batch(6)
    assert b["images"].shape == (8, 40, 40, 3) and b["images"].dtype == np.uint8
    assert b["sizes"].dtype == b["extents"].dtype == np.int32 and b["labels"].shape == (8, 6)
    np.testing.assert_array_equal(np.asarray(b["extents"]), cache.extents[np.sort(batches.indices(6))])
    assert b["images"].sharding == batch_sharding(mesh)
    assert len(b["images"].addressable_shards) == jax.device_count()
    np.testing.assert_array_equal(np.asarray(b["images"]), cache.images[np.sort(batches.indices(6))])


def test_device_resident_batches_equal_the_host_fed_ones(data_dir):
    """config.data.on_device: the split is copied to every device once; a batch is a gather there, and
    equals the host-fed batch of the same step, and the cache's rows at the step's indices."""
    cache = load_cached_split("synthetic", "train", data_dir, 0, GEN, SIZES)
    mesh = data_mesh()
    resident = DeviceCache(cache, mesh)
    fields = (cache.images, cache.sizes, cache.extents, cache.labels)
    assert resident.nbytes == sum(a.nbytes for a in fields) == 40 * (40 * 40 * 3 + 2 * 4 + 2 * 4 + 6)
    host_fed = TrainBatches(cache, 8, seed=5, mesh=mesh)
    on_device = TrainBatches(cache, 8, seed=5, mesh=mesh, resident=resident)
    assert set(on_device.host_batch(3)) == {"index"}  # only the indices leave the host
    for step in (0, 4, 5, 11):  # across an epoch boundary (5 steps per epoch)
        a, b = host_fed.batch(step), on_device.batch(step)
        assert set(a) == set(b)
        idx = np.sort(host_fed.indices(step))
        for key in a:
            assert b[key].dtype == a[key].dtype and b[key].sharding == batch_sharding(mesh)
            np.testing.assert_array_equal(np.asarray(b[key]), np.asarray(a[key]))
        for key in DeviceCache.FIELDS:
            np.testing.assert_array_equal(np.asarray(b[key]), getattr(cache, key)[idx])
    # Each device gathers from its own copy: the compiled gather holds no collective.
    hlo = resident._gather.lower(resident.arrays, on_device.batch(0)["index"]).compile().as_text()
    assert not any(op in hlo for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce"))
    other = load_cached_split("synthetic", "val", data_dir, 0, GEN, SIZES)
    with pytest.raises(ValueError, match="another split"):
        TrainBatches(other, 8, seed=0, mesh=mesh, resident=resident)


class _Device:
    process_index, device_kind = 0, "FakeGPU"

    def __init__(self, limit):
        self.limit = limit

    def memory_stats(self):
        return {"bytes_limit": self.limit} if self.limit else None


class _Mesh:
    def __init__(self, *devices):
        self.devices = np.asarray(devices, dtype=object)


def test_device_memory_check_refuses_a_cache_larger_than_half_a_device():
    check_device_memory(500, _Mesh(_Device(1000), _Device(1000)))  # half of each device: accepted
    with pytest.raises(ConfigError, match=r"needs 501 B of the 1000 B of the FakeGPU device") as e:
        check_device_memory(501, _Mesh(_Device(1000)))
    assert "config.data.on_device=False" in str(e.value) and str(e.value).count(". ") == 0
    # CPU devices (no bytes_limit) share the host's memory, and the cache's pages.
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    check_device_memory(host // 2, _Mesh(*[_Device(None)] * 8))
    with pytest.raises(ConfigError, match=r"of the host's memory \(shared by its CPU devices\)"):
        check_device_memory(host // 2 + 1, _Mesh(*[_Device(None)] * 8))


def test_batch_size_errors(data_dir):
    cache = load_cached_split("synthetic", "train", data_dir, 0, GEN, SIZES)
    n = jax.device_count()
    with pytest.raises(ValueError, match=f"does not split evenly over {n} devices"):
        TrainBatches(cache, n + 1, seed=0, mesh=data_mesh())
    with pytest.raises(ValueError, match="fewer than batch_size"):
        TrainBatches(cache, 48, seed=0, mesh=data_mesh())


def test_eval_batches_cover_the_split_once(data_dir):
    cache = load_cached_split("synthetic", "segmentation_val", data_dir, 0, GEN, SIZES)
    seen = []
    for b in eval_batches(cache, 8, data_mesh()):
        assert b["images"].shape == (8, 40, 40, 3) and b["masks"].shape == (8, 40, 40)
        np.testing.assert_array_equal(np.asarray(b["extents"]), cache.extents[np.asarray(b["index"])])
        seen += np.asarray(b["index"])[np.asarray(b["valid"])].tolist()
    assert seen == list(range(10))


def test_batches_augment_on_device(data_dir):
    cache = load_cached_split("synthetic", "train", data_dir, 0, GEN, SIZES)
    b = TrainBatches(cache, 8, seed=0, mesh=data_mesh()).batch(0)
    augment = jax.jit(train_augment, static_argnames=("out_size", "dtype"))
    x = augment(jax.random.key(0), b["images"], b["sizes"], b["extents"], out_size=20)
    assert x.shape == (8, 20, 20, 3) and x.dtype == np.float32
    lo = (0 - np.asarray(MEAN)) / np.asarray(STD)
    hi = (1 - np.asarray(MEAN)) / np.asarray(STD)
    xs = np.asarray(x)
    assert np.all(xs >= lo - 1e-5) and np.all(xs <= hi + 1e-5)


def test_eval_masks_are_the_original_masks_resized_once_nearest(data_dir):
    cache = load_cached_split("synthetic", "segmentation_val", data_dir, 0, GEN, SIZES)
    masks = eval_masks(cache, 16)
    assert masks.shape == (10, 16, 16) and masks.dtype == np.uint8
    for i, image_id in enumerate(cache.image_ids):
        want = generate_example(GEN, "segmentation_val", int(image_id.split("_")[-1]))["mask"]
        # 40 -> 16: (i + 0.5) * 40 / 16 is never an integer, so PIL's NEAREST is exact here.
        expected = Image.fromarray(want).resize((16, 16), Image.NEAREST)
        np.testing.assert_array_equal(masks[i], np.asarray(expected))


def test_data_config_checks():
    import ml_collections

    from apjax.data import check_data_config
    from configs.common import data_config

    c = data_config("synthetic", True, None)
    assert c.cache_size == 0 and c.synthetic.image_size == 72 and c.image_size == 64
    check_data_config(c)
    c.cache_size = 80  # the squashed layout: a deviation, but valid
    check_data_config(c)
    for bad in (-1, 2.5, True, "original"):
        with pytest.raises(ValueError, match="config.data.cache_size must be 0"):
            check_data_config(ml_collections.ConfigDict({**c.to_dict(), "cache_size": bad}))
    c = data_config("synthetic", True, None)
    c.split_sizes.val = 0
    with pytest.raises(ValueError, match="at least one image"):
        check_data_config(c)
    c.split_sizes.val, c.split_sizes.test = 10, 10
    with pytest.raises(ValueError, match="unknown config.data.split_sizes"):
        check_data_config(c)
