"""The distill task: one jitted step per method, the frozen teacher, clear errors for bad teachers."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from apjax import train_lib
from apjax.compress import distill
from apjax.data.pipeline import TrainBatches, data_mesh
from configs import vgg16_kd
from tests.test_train import tiny_config

STUDENT = "2,2,M,4,4,M,4,4,4,M,8,8,8,M,8,8,8,M"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A teacher workdir (config.json + best checkpoint) of a freshly initialised VGG16/8."""
    root = tmp_path_factory.mktemp("teacher")
    c = tiny_config(root / "data")
    model = train_lib.build_model(c, train_lib.num_classes_of(c))
    tx = train_lib.create_optimizer(c, train_lib.create_learning_rate_fn(c, 1))
    state = train_lib.create_train_state(c, model, tx)
    workdir = root / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(c.to_json_best_effort())
    checkpoints = train_lib.Checkpoints(workdir)
    checkpoints.save_best(state, {"step": 0, "epoch": 0, "mAP": 0.0})
    checkpoints.close()
    return workdir


def kd_config(teacher_dir, method, **distill_overrides):
    c = vgg16_kd.get_config(f"data=synthetic,small,method={method}")
    t = tiny_config(teacher_dir.parent / "data")
    c.data = t.data
    c.model, c.batch_size = STUDENT, 16
    c.num_epochs, c.lr_decay_epochs = 1, (1,)
    c.distill.teacher_workdir = str(teacher_dir)
    c.distill.taps = ("conv4_3", "pool4")
    c.distill.update(distill_overrides)
    return c


@pytest.mark.parametrize("method", ["kd", "ewa", "swa", "sswa"])
def test_one_distill_step_per_method(teacher_dir, method):
    c = kd_config(teacher_dir, method, sswa_mode="bernoulli" if method == "sswa" else "fixed_count")
    train_lib.validate_config(c)
    mesh = data_mesh()
    cache = train_lib.load_data(c, splits=("train",))["train"]
    lr_fn = train_lib.create_learning_rate_fn(c, 3)
    task = distill.distill_task(c, cache.num_classes, mesh, lr_fn)
    state = jax.device_put(task.init_state(), NamedSharding(mesh, PartitionSpec()))
    teacher_before = jax.device_get(distill.load_teacher(c, mesh)[1])
    before = jax.device_get(state.params)
    batches = TrainBatches(cache, 16, seed=0, mesh=mesh)
    for s in range(2):
        state, m = task.train_step(state, batches.batch(s))
    m = jax.device_get(m)
    assert set(m) == {"loss", "lr", "kd", "bce", "match"}
    assert all(np.isfinite(v) for v in m.values())
    if method == "kd":
        assert float(m["match"]) == 0.0
    else:
        assert float(m["match"]) > 0.0
        np.testing.assert_allclose(
            m["loss"], 0.9 * m["kd"] + 0.1 * m["bce"] + c.distill.beta * m["match"], rtol=1e-5
        )
    after = jax.device_get(state.params)
    assert any(
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    )
    # The teacher is never updated and never saved again.
    teacher_after = jax.device_get(distill.load_teacher(c, mesh)[1])
    for a, b in zip(jax.tree.leaves(teacher_before), jax.tree.leaves(teacher_after), strict=True):
        np.testing.assert_array_equal(a, b)
    assert sorted(p.name for p in (teacher_dir / "checkpoints" / "best").iterdir() if p.name.isdigit()) == [
        "0"
    ]


def test_fixed_count_sswa_masks_drop_exact_count_for_the_whole_batch():
    acts = {"pool5": np.zeros((5, 2, 2, 64), np.float32), "conv5_3": np.zeros((5, 4, 4, 10), np.float32)}
    masks = distill.sswa_masks(jax.random.key(0), acts, "fixed_count", 0.3)
    assert masks["pool5"].shape == (1, 64) and int((np.asarray(masks["pool5"]) == 0).sum()) == 19
    assert masks["conv5_3"].shape == (1, 10) and int((np.asarray(masks["conv5_3"]) == 0).sum()) == 3
    bern = distill.sswa_masks(jax.random.key(0), acts, "bernoulli", 0.3)
    assert bern["pool5"].shape == (5, 64)


def test_missing_teacher_and_wrong_architecture(teacher_dir, tmp_path):
    c = kd_config(teacher_dir, "sswa")
    c.distill.teacher_workdir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no trained teacher in .*nowhere"):
        distill.load_teacher(c, data_mesh())
    # A config.json that claims another architecture than the checkpoint holds.
    fake = tmp_path / "fake"
    fake.mkdir()
    for item in (teacher_dir / "checkpoints").iterdir():
        (fake / "checkpoints").mkdir(exist_ok=True)
        (fake / "checkpoints" / item.name).symlink_to(item)
    config = json.loads((teacher_dir / "config.json").read_text())
    config["model"] = "vgg16/4"
    (fake / "config.json").write_text(json.dumps(config))
    c.distill.teacher_workdir = str(fake)
    with pytest.raises(ValueError, match="does not match its config's model"):
        distill.load_teacher(c, data_mesh())


def test_bad_distill_values(teacher_dir):
    for field, value, message in [
        ("method", "at", "unknown method 'at'; choose one of"),
        ("matching_form", "l1", "unknown matching_form 'l1'"),
        ("sswa_drop", 1.0, "sswa_drop must be in [0, 1)"),
        ("taps", ("conv9_9",), "taps must be a non-empty subset of"),
    ]:
        c = kd_config(teacher_dir, "sswa")
        c.distill[field] = value
        with pytest.raises(
            ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
        ):
            train_lib.validate_config(c)
