"""The distill task: one jitted step per method, the frozen teacher, clear errors for bad teachers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from apjax.compress import distill
from apjax.data.pipeline import TrainBatches, data_mesh
from apjax.models import apply_with_taps, create_model, init_variables
from apjax.tasks import distill as distill_task
from apjax.tasks import validate_config
from apjax.trainer.config import load_data
from apjax.trainer.optim import create_learning_rate_fn
from configs import vgg16_kd
from tests.test_train import tiny_config

STUDENT = "2,2,M,4,4,M,4,4,4,M,8,8,8,M,8,8,8,M"


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


@pytest.mark.parametrize("method", ["kd", "ewa", "sswa"])  # SWA is SSWA without the mask
def test_one_distill_step_per_method(teacher_dir, method):
    c = kd_config(teacher_dir, method, sswa_mode="bernoulli" if method == "sswa" else "fixed_count")
    validate_config(c)
    mesh = data_mesh()
    cache = load_data(c, splits=("train",))["train"]
    lr_fn = create_learning_rate_fn(c, 3)
    task = distill_task.build(c, cache.num_classes, mesh, lr_fn)
    state = jax.device_put(task.init_state(), NamedSharding(mesh, PartitionSpec()))
    teacher_before = jax.device_get(distill.load_teacher(c, mesh)[1])
    saved = sorted(p.name for p in (teacher_dir / "checkpoints" / "best").iterdir() if p.name.isdigit())
    before = jax.device_get(state.params)
    batches = TrainBatches(cache, 16, seed=0, mesh=mesh)
    for s in range(2):
        state, m = task.train_step(state, batches.batch(s))
    m = jax.device_get(m)
    assert set(m) == {"loss", "lr", "kd", "bce", "match", "grad_norm"}
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
    assert (
        sorted(p.name for p in (teacher_dir / "checkpoints" / "best").iterdir() if p.name.isdigit()) == saved
    )


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
            validate_config(c)


def test_eval_py_on_a_teacher_trained_from_init_from(teacher_dir):
    """eval.py restores the teacher (trained from an init_from file that no longer exists) and reproduces
    the val mAP its training wrote for the best checkpoint."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, str(root / "eval.py"), f"--workdir={teacher_dir}"],
        capture_output=True, text=True, env=env, cwd=root, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    saved = json.loads((teacher_dir / "eval_best_val.json").read_text())
    rows = json.loads((teacher_dir / "final_metrics.json").read_text())["rows"]
    best = next(v for k, v in rows.items() if k.startswith("val, best"))
    assert saved["mAP"] == pytest.approx(best["mAP"], abs=1e-6)


# ------------------------------------------------------------------------------------------------
# The loss the step differentiates, against an independent float64 computation.
# ------------------------------------------------------------------------------------------------

TEACHER_WIDTHS = (6, "M", 10, 10, "M", 8, "M")
STUDENT_WIDTHS = (3, "M", 5, 10, "M", 4, "M")
TAP = "conv2_2"  # 10 channels in both nets: 4 x 4 maps at 16 px


def _float64_nets(rng):
    """A teacher with dropout and BN running statistics far from any batch's (so eval and train modes
    differ), and a student without dropout, both float64."""
    teacher = create_model(TEACHER_WIDTHS, num_classes=5, dtype=jnp.float64, dropout_rate=0.5)
    student = create_model(STUDENT_WIDTHS, num_classes=5, dtype=jnp.float64, dropout_rate=0.0)
    tv = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), init_variables(teacher, jax.random.key(1), 16))
    for stats in tv["batch_stats"].values():
        stats["mean"] = jnp.asarray(rng.normal(0.0, 0.2, stats["mean"].shape))
        stats["var"] = jnp.asarray(rng.uniform(0.2, 3.0, stats["var"].shape))
    sv = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), init_variables(student, jax.random.key(2), 16))
    return teacher, tv, student, sv


def _tap_and_grad(model, variables, x, classes, train):
    """Activation at TAP and d sum_b logit_{b, classes_b} / d activation, by jax.grad through a zero
    offset (not through tap_gradients), plus the logits."""
    shape = apply_with_taps(model, variables, x, (TAP,))[1][TAP].shape

    def score(offset):
        logits, acts, _ = apply_with_taps(
            model, variables, x, (TAP,), train=train, perturbations={TAP: offset}
        )
        return jnp.sum(logits[jnp.arange(len(classes)), classes]), (logits, acts[TAP])

    grad, (logits, acts) = jax.grad(score, has_aux=True)(jnp.zeros(shape, jnp.float64))
    return np.asarray(acts), np.asarray(grad), np.asarray(logits)


def _swa(acts, grads, mask=None):
    u = grads.sum(axis=(1, 2))  # (B, C): the spatial SUM of the gradient
    if mask is not None:
        u = u * mask
    return np.maximum(np.einsum("bhwc,bc->bhw", acts, u), 0.0)


def _normalised(m):
    flat = m.reshape(len(m), -1)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)


def test_distill_loss_wiring_against_independent_float64():
    """KD + beta * SSWA matching: the teacher's top-1 class seeds BOTH maps (checked on images where the
    student's own top-1 differs), the teacher runs in eval mode, the student's map is never masked, the
    fixed-count mask drops exactly int(C * drop) teacher channels, and the parameter gradient (second order)
    agrees with central differences."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        teacher, tv, student, sv = _float64_nets(rng)
        x = jnp.asarray(rng.normal(size=(6, 16, 16, 3)))
        labels = jnp.asarray((rng.random((6, 5)) < 0.4).astype(np.float64))
        d = ml_collections.ConfigDict(
            dict(method="sswa", taps=(TAP,), beta=3.0, matching_form="squared_mean", sswa_mode="fixed_count",
                 sswa_drop=0.3, temperature=4.0, alpha=0.9, kd_log_eps=0.0)
        )  # fmt: skip
        keys = (jax.random.key(7), jax.random.key(8))
        # One compiled loss for the value, its gradient and the finite differences (op by op, the second
        # order through the nets dispatches thousands of small programs).
        loss_fn = jax.jit(
            lambda p: distill.distill_loss(p, student, sv["batch_stats"], teacher, tv, x, labels, d, *keys)
        )
        loss, aux = loss_fn(sv["params"])

        # Teacher: eval mode, its own top-1 class.
        t_logits = np.asarray(teacher.apply(tv, x))
        np.testing.assert_allclose(np.asarray(aux["teacher_logits"]), t_logits, rtol=1e-12)
        train_logits, _ = teacher.apply(tv, x, train=True, rngs={"dropout": keys[0]}, mutable=["batch_stats"])
        assert np.max(np.abs(np.asarray(train_logits) - t_logits)) > 1e-2  # the modes are distinguishable
        k = t_logits.argmax(axis=1)
        s_logits_eval = np.asarray(student.apply(sv, x))
        assert (s_logits_eval.argmax(axis=1) != k).any()  # the case where the two classes differ

        # The fixed-count mask: exactly int(10 * 0.3) = 3 teacher channels dropped, one mask per batch.
        mask = np.asarray(aux["teacher_masks"][TAP])
        assert mask.shape == (1, 10) and int((mask == 0).sum()) == 3 and set(np.unique(mask)) == {0.0, 1.0}

        t_acts, t_grads, _ = _tap_and_grad(teacher, tv, x, k, train=False)
        s_acts, s_grads, s_logits = _tap_and_grad(student, sv, x, k, train=True)
        m_t = _swa(t_acts, t_grads, mask)
        m_s = _swa(s_acts, s_grads)  # unmasked
        match = np.mean((_normalised(m_t) - _normalised(m_s)) ** 2)
        # KD (SPEC section 4) and BCE, from their definitions.
        sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
        pt, ps = sig(t_logits / 4.0), sig(s_logits / 4.0)
        kl = pt * np.log(pt / ps) + (1 - pt) * np.log((1 - pt) / (1 - ps))
        y = np.asarray(labels)
        bce = -np.mean(y * np.log(sig(s_logits)) + (1 - y) * np.log(1 - sig(s_logits)))
        expected = 0.9 * 16.0 * kl.mean() + 0.1 * bce + 3.0 * match
        np.testing.assert_allclose(float(loss), expected, rtol=1e-10)
        np.testing.assert_allclose(float(aux["parts"]["match"]), match, rtol=1e-10)

        # Controls that the comparison can tell the wiring apart: the student's own class, a masked
        # student map, or a train-mode teacher would each give another matching term.
        s_own = _tap_and_grad(student, sv, x, np.asarray(s_logits).argmax(1), train=True)
        wrong = {
            "student's class": _swa(s_own[0], s_own[1]),
            "masked student": _swa(s_acts, s_grads, mask),
        }
        for name, m in wrong.items():
            alt = np.mean((_normalised(m_t) - _normalised(m)) ** 2)
            assert abs(alt - match) > 1e-3 * match, name

        # The gradient through the maps (second order) against central differences along a direction.
        grads = jax.jit(jax.grad(lambda p: loss_fn(p)[0]))(sv["params"])
        direction = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), sv["params"])
        eps = 1e-6

        def at(sign):
            p = jax.tree.map(lambda a, v: a + sign * eps * v, sv["params"], direction)
            return float(loss_fn(p)[0])

        fd = (at(1) - at(-1)) / (2 * eps)
        analytic = sum(
            float(jnp.vdot(g, v))
            for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
        )
        np.testing.assert_allclose(analytic, fd, rtol=1e-6)


def test_fixed_count_mask_inside_the_loss_is_drawn_per_batch_key():
    """Each mask key draws another set of exactly int(C * drop) teacher channels."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        teacher, tv, student, sv = _float64_nets(rng)
        x = jnp.asarray(rng.normal(size=(2, 16, 16, 3)))
        d = ml_collections.ConfigDict(
            dict(method="sswa", taps=(TAP,), beta=1.0, matching_form="l2", sswa_mode="fixed_count",
                 sswa_drop=0.5, temperature=4.0, alpha=0.9, kd_log_eps=1e-7)
        )  # fmt: skip
        seen = set()
        for i in range(4):
            _, aux = distill.distill_loss(
                sv["params"], student, sv["batch_stats"], teacher, tv, x, jnp.zeros((2, 5)), d,
                jax.random.key(0), jax.random.key(100 + i),
            )  # fmt: skip
            mask = np.asarray(aux["teacher_masks"][TAP])[0]
            assert int((mask == 0).sum()) == 5  # int(10 * 0.5)
            seen.add(tuple(mask))
        assert len(seen) > 1


def test_a_new_matching_map_is_one_registry_entry(teacher_dir, monkeypatch):
    """Grad-CAM's own weights (the spatial MEAN of the gradient) as a matching map: one entry in
    MATCHING_MAPS, and validation, the loss and the report take it, with no other edit. The loss's matching
    term equals the map computed independently (float64)."""
    from apjax.attribution import gradcam_map
    from apjax.compress.matching import MATCHING_MAPS, MatchingMap
    from apjax.report import method_name

    entry = MatchingMap(
        "Grad-CAM", needs_gradients=True, map_fn=lambda a, g, m: gradcam_map(a, g, reduce="mean")
    )
    monkeypatch.setitem(MATCHING_MAPS, "gradcam", entry)
    c = kd_config(teacher_dir, "gradcam")
    validate_config(c)
    assert method_name("gradcam") == "Grad-CAM" and "gradcam" in distill.methods()
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        teacher, tv, student, sv = _float64_nets(rng)
        x = jnp.asarray(rng.normal(size=(4, 16, 16, 3)))
        d = ml_collections.ConfigDict(
            dict(method="gradcam", taps=(TAP,), beta=1.0, matching_form="squared_mean", temperature=4.0,
                 alpha=0.9, kd_log_eps=0.0)
        )  # fmt: skip
        _, aux = distill.distill_loss(
            sv["params"], student, sv["batch_stats"], teacher, tv, x, jnp.zeros((4, 5)), d,
            jax.random.key(0), jax.random.key(1),
        )  # fmt: skip
        k = np.asarray(teacher.apply(tv, x)).argmax(1)
        t_acts, t_grads, _ = _tap_and_grad(teacher, tv, x, k, train=False)
        s_acts, s_grads, _ = _tap_and_grad(student, sv, x, k, train=True)
        cam = lambda a, g: np.maximum(np.einsum("bhwc,bc->bhw", a, g.mean(axis=(1, 2))), 0.0)  # noqa: E731
        expected = np.mean((_normalised(cam(t_acts, t_grads)) - _normalised(cam(s_acts, s_grads))) ** 2)
        np.testing.assert_allclose(float(aux["parts"]["match"]), expected, rtol=1e-10)
        assert aux["teacher_masks"] == {}
