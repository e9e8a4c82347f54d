"""Distillation from a cached teacher: the cached step equals the live one on the same draw, bit for bit in
float32; a cache of another teacher or dataset is refused; an interrupted build resumes; the tasks run."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from apjax.compress import teacher_cache as tc
from apjax.compress.distill import student_loss, teacher_maps
from apjax.data.augment import draw_augment
from apjax.data.cache import HostCache
from apjax.data.pipeline import batch_sharding, data_mesh
from apjax.errors import ConfigError
from tests.test_prune import random_variables

TEACHER = (6, 6, "M", 8, "M", 10, "M")
STUDENT = (3, 3, "M", 4, "M", 5, "M")
SIZE, K, N = 16, 5, 24


def _train_split(seed: int = 0) -> HostCache:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(14, 21, (N, 2)).astype(np.int32)
    images = np.zeros((N, 20, 20, 3), np.uint8)
    for i, (h, w) in enumerate(sizes):
        images[i, :h, :w] = rng.integers(0, 256, (h, w, 3))
    labels = (rng.random((N, K)) < 0.4).astype(np.uint8)
    return HostCache(images, sizes, sizes.copy(), labels, None, [str(i) for i in range(N)])


def _config(tmp_path, method="sswa", draws=2, dtype="float32"):
    c = ml_collections.ConfigDict()
    c.seed, c.num_epochs, c.precision, c.batch_size = 3, 5, "float32", 8
    c.data = ml_collections.ConfigDict(dict(dataset="synthetic", image_size=SIZE, crop_scale=(0.35, 1.0)))
    c.distill = ml_collections.ConfigDict(
        dict(method=method, taps=("conv2_1",), beta=3.0, matching_form="squared_mean",
             sswa_mode="fixed_count",
             sswa_drop=0.3, temperature=4.0, alpha=0.9, kd_log_eps=1e-7, teacher_workdir=str(tmp_path),
             teacher_cache=draws, teacher_cache_dtype=dtype, teacher_cache_dir=str(tmp_path / "cache"))
    )  # fmt: skip
    return c


@pytest.mark.default_xla
@pytest.mark.parametrize("method", ["sswa"])  # activations, pooled gradients and masks (EWA reads a subset)
def test_cached_loss_and_gradient_equal_the_live_ones_bit_for_bit(tmp_path, method):
    c = _config(tmp_path, method)
    teacher, tv = random_variables(TEACHER, SIZE, K, seed=0)
    student, sv = random_variables(STUDENT, SIZE, K, seed=1)
    train = _train_split()
    mesh = data_mesh()  # 8 CPU devices: the cache is built with the step's batch share per device
    cache = tc.build_teacher_cache(c, teacher, tv, train, mesh)
    assert cache.draws == 2 and (tmp_path / "cache" / "meta.json").exists()
    split, replicated = batch_sharding(mesh), NamedSharding(mesh, PartitionSpec())

    idx, draw = np.array([3, 7, 8, 11, 12, 15, 20, 23]), 1
    x = draw_augment(tc.draw_key(c.seed), jnp.asarray(idx, jnp.int32), draw, train.images[idx],
                     train.sizes[idx], train.extents[idx], SIZE, jnp.float32, c.data.crop_scale)  # fmt: skip
    x, labels = jax.device_put((x, jnp.asarray(train.labels[idx], jnp.float32)), split)
    tv, sv = jax.device_put((tv, sv), replicated)
    keys = (jax.random.key(5), jax.random.key(6))  # dropout, SSWA mask

    def live(params, x, labels, tv, keys):
        side = teacher_maps(teacher, tv, x, c.distill, keys[1])
        return student_loss(params, student, sv["batch_stats"], side, x, labels, c.distill, keys[0], "kd")

    def cached(params, x, labels, stored, keys):
        side = tc.teacher_side(stored, tc.MATCHING_MAPS.get(method), ("conv2_1",), c.distill, keys[1])
        return student_loss(params, student, sv["batch_stats"], side, x, labels, c.distill, keys[0], "kd")

    grad = lambda f, extra: jax.jit(jax.value_and_grad(f, has_aux=True))(sv["params"], x, labels, extra, keys)  # noqa: E731
    (l_live, aux_live), g_live = grad(live, tv)
    (l_cached, aux_cached), g_cached = grad(cached, jax.device_put(cache.gather(idx, draw), split))
    stored = cache.gather(idx, draw)
    assert float(l_live) == float(l_cached)
    for a, b in zip(jax.tree.leaves(g_live), jax.tree.leaves(g_cached), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(aux_live["teacher_logits"], aux_cached["teacher_logits"])
    if method == "sswa":  # the cache holds u_c, summed over space: (B, 1, 1, C)
        assert cache.fields["grads/conv2_1"].shape == (N, 2, 1, 1, 8)
        np.testing.assert_array_equal(
            aux_live["teacher_masks"]["conv2_1"], aux_cached["teacher_masks"]["conv2_1"]
        )
    # The stored draw is the teacher's output on the regenerated crop.
    np.testing.assert_allclose(stored["logits"], np.asarray(teacher.apply(tv, x)), rtol=1e-5, atol=1e-6)


def test_a_cache_of_another_teacher_or_dataset_is_refused_and_bfloat16_is_half_the_bytes(tmp_path):
    c = _config(tmp_path, "sswa", dtype="bfloat16")
    teacher, tv = random_variables(TEACHER, SIZE, K, seed=0)
    train, mesh = _train_split(), data_mesh()
    cache = tc.build_teacher_cache(c, teacher, tv, train, mesh, chunk=16)
    assert cache.gather(np.array([0, 1]), 0)["logits"].dtype == jnp.bfloat16
    c32 = _config(tmp_path / "f32", "sswa", dtype="float32")
    assert 2 * cache.nbytes() == tc.build_teacher_cache(c32, teacher, tv, train, mesh, chunk=16).nbytes()
    _, other = random_variables(TEACHER, SIZE, K, seed=9)
    with pytest.raises(ConfigError, match=r"was built from another teacher than this run's; delete it"):
        tc.build_teacher_cache(c, teacher, other, train, mesh)
    with pytest.raises(ConfigError, match=r"was built from another data than this run's"):
        tc.build_teacher_cache(c, teacher, tv, _train_split(seed=1), mesh)


def test_an_interrupted_build_resumes_where_it_stopped(tmp_path, monkeypatch):
    c = _config(tmp_path, "ewa", draws=3)
    teacher, tv = random_variables(TEACHER, SIZE, K, seed=0)
    train, mesh = _train_split(), data_mesh()
    real = tc.jitted_outputs
    calls = []

    def failing(*args):
        fn = real(*args)

        def wrapped(*a):
            calls.append(1)
            if len(calls) == 4:
                raise KeyboardInterrupt
            return fn(*a)

        return wrapped

    monkeypatch.setattr(tc, "jitted_outputs", failing)
    with pytest.raises(KeyboardInterrupt):
        tc.build_teacher_cache(c, teacher, tv, train, mesh, chunk=8)
    incomplete = tmp_path / "cache.incomplete"
    progress = json.loads((incomplete / "progress.json").read_text())
    assert progress["done"] == 3 and progress["seconds"] > 0
    monkeypatch.setattr(tc, "jitted_outputs", real)
    resumed = tc.build_teacher_cache(c, teacher, tv, train, mesh, chunk=8)
    assert not incomplete.exists()
    # build.json counts the time of both sessions of the build.
    build = json.loads((resumed.directory / "build.json").read_text())
    assert build["seconds"] >= round(progress["seconds"], 2) and build["images"] == len(train)
    assert build["draws"] == 3 and build["teacher_forward_passes_per_image_and_draw"] == 1
    fresh = tc.build_teacher_cache(
        _config(tmp_path / "fresh", "ewa", draws=3), teacher, tv, train, mesh, chunk=8
    )
    for name in resumed.fields:
        np.testing.assert_array_equal(resumed.fields[name], fresh.fields[name])


def test_distillation_trains_from_the_cache(teacher_dir, tmp_path):
    """A KD + SSWA student over two epochs (draws 0 and 1) trains from the cache through the task; its
    directory holds what meta.json says. The prunings and quantization take the same step and batches
    from ``apjax.compress.distill.training_step``. The images come from the devices' copy of the split
    (``data.on_device``), the cached outputs from the host."""
    from apjax.tasks import train_and_evaluate
    from tests.test_distill import kd_config

    c = kd_config(teacher_dir, "sswa", teacher_cache=4, teacher_cache_dir=str(tmp_path / "kd_cache"))
    c.num_epochs, c.lr_decay_epochs = 2, ()
    c.data.on_device = True
    train_and_evaluate(c, tmp_path / "kd")
    meta = json.loads((tmp_path / "kd_cache" / "meta.json").read_text())
    assert meta["draws"] == 2 and set(meta["fields"]) == {
        "logits",
        *(f"{k}/{t}" for k in ("acts", "grads") for t in c.distill.taps),
    }
    rows = [json.loads(r) for r in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r) and rows[-1]["val/map_cos"] > 0
