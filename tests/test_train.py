"""The trainer: schedule, optimizer, loss, config checks, devices, kill-and-resume, eval round trip."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from apjax.compress.losses import bce_loss
from apjax.data.pipeline import TrainBatches, data_mesh
from apjax.evaluation import evaluate_workdir
from apjax.tasks import train_and_evaluate, validate_config
from apjax.tasks.teacher import make_train_step
from apjax.trainer.checkpoints import restore_state
from apjax.trainer.config import build_model, load_data
from apjax.trainer.evaluation import classification_summary
from apjax.trainer.files import check_resume_config, load_workdir_config
from apjax.trainer.optim import create_learning_rate_fn, create_optimizer
from apjax.trainer.state import create_train_state
from configs import teacher_vgg16
from configs.common import parse_arg


def tiny_config(data_dir, **overrides):
    c = teacher_vgg16.get_config("data=synthetic,small")
    c.data.data_dir = str(data_dir)
    c.data.image_size, c.data.cache_size = 32, 36
    c.data.synthetic.image_size = 36
    c.data.split_sizes.update(dict(train=48, val=16, segmentation_val=8))
    c.model = "vgg16/8"
    c.batch_size = 16
    c.num_epochs, c.lr_decay_epochs = 3, (2,)
    c.log_every_steps = 2
    for k, v in overrides.items():
        c[k] = v
    return c


def test_learning_rate_drops_at_the_first_step_of_each_decay_epoch():
    c = teacher_vgg16.get_config()
    c.optimizer.learning_rate, c.lr_decay_epochs, c.lr_decay_factor = 0.1, (2, 4), 0.1
    lr = create_learning_rate_fn(c, steps_per_epoch=5)
    # Epochs 0-1 (steps 0..9) at 0.1, epochs 2-3 (steps 10..19) at 0.01, from epoch 4 (step 20) 0.001.
    expected = {0: 0.1, 9: 0.1, 10: 0.01, 19: 0.01, 20: 0.001, 57: 0.001}
    for step, value in expected.items():
        np.testing.assert_allclose(float(lr(step)), value, rtol=1e-6)


def _two_sgd_steps(p0: np.ndarray, grads, **optimizer) -> np.ndarray:
    """The parameters after two steps of the config's optimizer (lr, momentum, decay from ``optimizer``)."""
    c = teacher_vgg16.get_config()
    c.optimizer.update(**optimizer)
    tx = create_optimizer(c, create_learning_rate_fn(c, 100))
    params = jnp.asarray(p0, jnp.float32)
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(params)


def test_sgd_is_torch_sgd_with_weight_decay_and_momentum():
    p0, g1, g2 = np.array([1.0, -2.0]), np.array([0.3, 0.1]), np.array([-0.2, 0.4])
    # torch.optim.SGD: d = g + wd * p; buf = m * buf + d (buf = d at the first step); p -= lr * buf.
    d1 = g1 + 0.1 * p0
    p1 = p0 - 0.5 * d1
    buf2 = 0.9 * d1 + (g2 + 0.1 * p1)
    p2 = p1 - 0.5 * buf2
    got = _two_sgd_steps(p0, (g1, g2), learning_rate=0.5, momentum=0.9, weight_decay=0.1)
    np.testing.assert_allclose(got, p2, rtol=1e-6)


def test_clip_norm_scales_the_gradient_to_the_norm_before_decay_and_momentum():
    p0, g1, g2 = np.array([1.0, -2.0]), np.array([3.0, 4.0]), np.array([0.3, 0.4])
    # torch: clip_grad_norm_(max 1) then SGD: ||g1|| = 5 -> g1 / 5; ||g2|| = 0.5 < 1 -> unchanged.
    d1 = np.array([0.6, 0.8]) + 0.1 * p0
    p1 = p0 - 0.5 * d1
    p2 = p1 - 0.5 * (0.9 * d1 + g2 + 0.1 * p1)
    got = _two_sgd_steps(p0, (g1, g2), learning_rate=0.5, momentum=0.9, weight_decay=0.1, clip_norm=1.0)
    np.testing.assert_allclose(got, p2, rtol=1e-6)


def test_classification_summary_reports_the_mean_logit_of_present_and_absent_pairs():
    logits = np.array([[2.0, -1.0, -3.0], [0.5, 1.5, -2.0]])
    labels = np.array([[1, 0, 0], [0, 1, 0]])
    m = classification_summary(logits, labels)
    assert m["logit_present"] == pytest.approx((2.0 + 1.5) / 2)
    assert m["logit_absent"] == pytest.approx((-1.0 - 3.0 + 0.5 - 2.0) / 4)


def test_bce_loss_is_the_mean_binary_cross_entropy():
    rng = np.random.default_rng(0)
    z, y = rng.normal(0, 3, (4, 5)), (rng.random((4, 5)) > 0.5).astype(np.float64)
    s = 1 / (1 + np.exp(-z))
    expected = -np.mean(y * np.log(s) + (1 - y) * np.log(1 - s))
    got = bce_loss(jnp.asarray(z, jnp.float32), jnp.asarray(y, jnp.float32))
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("task", "distil", "unknown task 'distil'; choose one of"),
        ("task", "prune_structured", "task 'prune_structured' needs a config.distill block; start from"),
        ("model", "vgg19", "unknown model 'vgg19'; choose one of"),
        ("precision", "float16", "unknown precision 'float16'"),
        ("batch_size", 0, "config.batch_size must be a positive integer, got 0"),
        ("lr_decay_epochs", (30, 10), "config.lr_decay_epochs must be increasing"),
        ("dropout_rate", 1.0, "config.dropout_rate must be in [0, 1)"),
        ("model_init", "xavier", "unknown config.model_init 'xavier'; choose one of"),
    ],
)
def test_bad_config_values_give_one_sentence(tmp_path, field, value, message):
    c = tiny_config(tmp_path)
    c[field] = value
    with pytest.raises(ValueError) as e:
        validate_config(c)
    assert message in str(e.value) and str(e.value).count(". ") == 0 and str(e.value).endswith(".")


def test_bad_data_and_config_arguments(tmp_path):
    c = tiny_config(tmp_path)
    c.data.dataset = "imagenet"
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'; choose one of"):
        validate_config(c)
    c = tiny_config(tmp_path)
    c.data.image_size = 16
    with pytest.raises(ValueError, match="image_size=16 is too small for a net with 5 max-pools"):
        validate_config(c)
    c = tiny_config(tmp_path)
    c.data.synthetic.num_classes = 40
    with pytest.raises(ValueError, match="num_classes=40"):
        validate_config(c)
    c = tiny_config(tmp_path)
    with c.data.ignore_type():  # e.g. a hand-edited config.json
        c.data.on_device = "yes"
    with pytest.raises(ValueError, match="config.data.on_device must be True or False, got 'yes'"):
        validate_config(c)
    with pytest.raises(ValueError, match="unknown config argument 'smal'"):
        parse_arg("data=synthetic,smal", data="voc", small=False)
    with pytest.raises(ValueError, match="unknown data 'vocc'"):
        teacher_vgg16.get_config("data=vocc")


def test_voc_teacher_needs_imagenet_weights_or_an_explicit_scratch_run(tmp_path):
    c = teacher_vgg16.get_config()  # the paper's setting: VOC
    with pytest.raises(ValueError) as e:
        validate_config(c)
    message = str(e.value)
    assert "--config.init_from=/path/to/vgg16_bn.pth" in message and "--config.from_scratch=True" in message
    assert message.count(". ") == 0 and message.endswith(".")
    c.from_scratch = True
    validate_config(c)
    c.init_from = "vgg16_bn.pth"
    with pytest.raises(ValueError, match="from_scratch is True but config.init_from is set"):
        validate_config(c)
    c.from_scratch = False
    validate_config(c)


def test_resuming_a_finished_init_from_run_never_reads_the_weight_file(teacher_dir):
    """The session's teacher was trained from an init_from file that no longer exists: resuming its
    workdir (nothing left to train) restores the checkpoint and finishes without reading it."""
    config = load_workdir_config(teacher_dir)
    assert config.init_from and not Path(config.init_from).exists()
    before = (teacher_dir / "metrics.jsonl").read_text()
    final = train_and_evaluate(config, teacher_dir)
    assert (teacher_dir / "metrics.jsonl").read_text() == before  # no step was trained again
    saved = json.loads((teacher_dir / "final_metrics.json").read_text())
    assert saved["val"]["mAP"] == pytest.approx(final["mAP"])


def test_batch_size_not_divisible_by_devices(tmp_path):
    c = tiny_config(tmp_path, batch_size=12)
    with pytest.raises(ValueError, match="does not split evenly over 8 devices"):
        train_and_evaluate(c, tmp_path / "run")


def test_one_step_on_eight_devices_equals_one_device(tmp_path):
    assert jax.device_count() == 8
    c = tiny_config(tmp_path)
    cache = load_data(c, splits=("train",))["train"]
    model = build_model(c, cache.num_classes)
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = data_mesh(devices)
        lr_fn = create_learning_rate_fn(c, 3)
        tx = create_optimizer(c, lr_fn)
        state = jax.device_put(create_train_state(c, model, tx), NamedSharding(mesh, PartitionSpec()))
        step = make_train_step(model, tx, lr_fn, 32, mesh, crop_scale=(0.35, 1.0))
        batches = TrainBatches(cache, 16, seed=c.seed, mesh=mesh)
        for s in range(2):
            state, metrics = step(state, batches.batch(s))
        results.append((jax.device_get(state), float(metrics["loss"])))
    (one, loss1), (eight, loss8) = results
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    for a, b in zip(jax.tree.leaves(one.batch_stats), jax.tree.leaves(eight.batch_stats), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    assert int(eight.step) == 2


@pytest.mark.xdist_group("tiny_teacher")  # with tests/test_compile_once.py: one tiny_teacher_run
def test_eval_reproduces_the_logged_map(tiny_teacher_run):
    # (Killing and resuming runs is tested at random points in tests/test_reliability.py.)
    root, _, _ = tiny_teacher_run
    workdir = root / "teacher"
    _, _, meta = restore_state(tiny_config(root / "data"), workdir, "latest")
    assert meta["step"] == 9

    # eval.py's library call on the best checkpoint reproduces the mAP logged for it in training.
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    best = max((r for r in logged if "val/mAP" in r), key=lambda r: r["val/mAP"])
    result = evaluate_workdir(workdir, "best", "val")
    assert result["step"] == best["step"]
    np.testing.assert_allclose(result["mAP"], best["val/mAP"], atol=1e-4)
    assert (workdir / "eval_best_val.json").exists() and (workdir / "config.json").exists()


def test_resume_refuses_another_config(tmp_path):
    c = tiny_config(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(c.to_json_best_effort())
    c.model = "vgg16/4"
    with pytest.raises(ValueError, match="holds a run with another config \\(differs in model\\)"):
        check_resume_config(tmp_path / "run", c)
