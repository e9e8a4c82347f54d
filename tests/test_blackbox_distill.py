"""Distillation from a black-box teacher (apjax.compress.blackbox): the cosine matching form, the student's
Grad-CAM and input-gradient maps inside the loss and their second-order gradient (float64, against numpy
and central differences), the teacher's RISE and occlusion maps, validation, a cached step end to end and
the sweep variant. Every expected number is computed here independently of the code under test."""

import json
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from apjax import experiment
from apjax.attribution import perturbation
from apjax.compress import blackbox, distill
from apjax.compress import teacher_cache as tc
from apjax.compress.losses import matching_loss
from apjax.data.augment import draw_augment
from apjax.data.pipeline import TrainBatches, data_mesh
from apjax.errors import ConfigError
from apjax.tasks import distill as distill_task
from apjax.tasks import validate_config
from apjax.trainer.config import load_data
from apjax.trainer.optim import create_learning_rate_fn
from configs import paper
from tests.test_black_box import _np_linear_upsample
from tests.test_distill import TAP, _float64_nets, _normalised, _tap_and_grad, kd_config

# ------------------------------------------------------------------------------------------------
# numpy references.
# ------------------------------------------------------------------------------------------------


def _np_cosine_form(s, t):
    """1 - cosine of the flattened maps per sample, mean over the batch (a zero map has cosine 0)."""
    return float(np.mean(1.0 - np.sum(_normalised(s) * _normalised(t), axis=1)))


def _np_squared_mean_form(s, t):
    return float(np.mean((_normalised(t) - _normalised(s)) ** 2))


def _np_block_mean(m, r):
    """(B, h, w) maps average-pooled to (B, r, r) in blocks of (h / r, w / r)."""
    b, h, w = m.shape
    return m.reshape(b, r, h // r, r, w // r).mean(axis=(2, 4))


def _np_shift(m):
    return m - m.min(axis=(1, 2), keepdims=True)


# ------------------------------------------------------------------------------------------------
# 1. The cosine matching form.
# ------------------------------------------------------------------------------------------------


def test_cosine_form_against_numpy_and_the_squared_mean_identity():
    """``matching_loss(form='cosine')`` against numpy's mean over the batch of 1 - cos (float64), its
    student gradient against the analytic one, no gradient into the teacher map, a zero student map giving 1,
    and the identity cosine == squared_mean * P / 2 for non-zero maps of P positions."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        s, t = rng.normal(size=(5, 6, 7)), rng.normal(size=(5, 6, 7))
        got = matching_loss(jnp.asarray(s), jnp.asarray(t), "cosine")
        np.testing.assert_allclose(float(got), _np_cosine_form(s, t), rtol=1e-12)
        sq = matching_loss(jnp.asarray(s), jnp.asarray(t), "squared_mean")
        np.testing.assert_allclose(float(got), float(sq) * 42 / 2, rtol=1e-12)

        # d/ds (1 - <s / |s|, t^>) = -(t^ - s^ <s^, t^>) / |s|, over B for the mean.
        gs, gt = jax.grad(lambda a, b: matching_loss(a, b, "cosine"), argnums=(0, 1))(
            jnp.asarray(s), jnp.asarray(t)
        )
        sf = s.reshape(5, -1)
        norm = np.linalg.norm(sf, axis=1, keepdims=True)
        sh, th = sf / norm, _normalised(t)
        want = -(th - sh * np.sum(sh * th, axis=1, keepdims=True)) / norm / 5
        np.testing.assert_allclose(np.asarray(gs).reshape(5, -1), want, rtol=1e-9, atol=1e-14)
        np.testing.assert_array_equal(np.asarray(gt), 0.0)

        # A zero student map has cosine 0 with anything (n(0) = 0): that sample contributes 1.
        s0 = s.copy()
        s0[2] = 0.0
        got0 = matching_loss(jnp.asarray(s0), jnp.asarray(t), "cosine")
        np.testing.assert_allclose(float(got0), _np_cosine_form(s0, t), rtol=1e-12)
        per_sample = 1.0 - np.sum(_normalised(s0) * _normalised(t), axis=1)
        assert per_sample[2] == 1.0


# ------------------------------------------------------------------------------------------------
# 2. The student's maps inside the loss, float64, and the second-order gradient.
# ------------------------------------------------------------------------------------------------

SIZES = {"bb_gradcam": 12, "bb_input_grad": 4}  # Grad-CAM: 8 x 8 at the tap upsampled; |grad|: 16 -> 4


def _np_input_gradient(student, variables, x, classes):
    """mean over RGB of |d sum_b logit_{b, k_b} / d x|, the student in train mode (batch statistics),
    by jax.grad of the selected logits with respect to the images."""

    def score(images):
        logits, _ = student.apply(variables, images, train=True, mutable=["batch_stats"])
        return jnp.sum(logits[jnp.arange(len(classes)), classes])

    return np.mean(np.abs(np.asarray(jax.grad(score)(x))), axis=-1)


def _np_student_map(method, student, sv, x, classes):
    """The student's map for ``classes`` resized to the stored map's side (numpy from here on)."""
    r = SIZES[method]
    if method == "bb_gradcam":
        acts, grads, _ = _tap_and_grad(student, sv, x, classes, train=True)
        cam = np.maximum(np.einsum("bhwc,bc->bhw", acts, grads.sum(axis=(1, 2))), 0.0)
        return _np_linear_upsample(cam, r)
    return _np_block_mean(_np_input_gradient(student, sv, x, classes), r)


@pytest.mark.parametrize("form", ["squared_mean", "cosine"])
@pytest.mark.parametrize("method", ["bb_gradcam", "bb_input_grad"])
def test_blackbox_student_maps_in_the_loss_and_their_gradient_float64(method, form):
    """``student_loss`` with a stored black-box teacher map: the matching term equals numpy's (the student's
    Grad-CAM at the tap, upsampled bilinearly, or its input-gradient magnitude, block-mean pooled, for the
    TEACHER's top-1 class; both maps shifted to a zero minimum), the total is KD + BCE + beta * match, and
    the parameter gradient (second order through the student's map) agrees with float64 central
    differences along a random direction."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(11)
        _, _, student, sv = _float64_nets(rng)
        b, r = 6, SIZES[method]
        x = jnp.asarray(rng.normal(size=(b, 16, 16, 3)))
        labels = jnp.asarray((rng.random((b, 5)) < 0.4).astype(np.float64))
        t_logits = rng.normal(0.0, 2.0, (b, 5))
        stored = rng.uniform(0.2, 1.0, (b, r, r))  # positive: a RISE map sits on a floor
        d = ml_collections.ConfigDict(
            dict(method=method, taps=(TAP,), beta=2.5, matching_form=form, temperature=4.0, alpha=0.9,
                 kd_log_eps=0.0, teacher_access="blackbox")
        )  # fmt: skip
        teacher_out = (jnp.asarray(t_logits), {"map": jnp.asarray(stored)}, {})
        key = jax.random.key(3)

        def loss_fn(p):
            return distill.student_loss(p, student, sv["batch_stats"], teacher_out, x, labels, d, key)

        # One compiled program for the value, the gradient and the finite differences.
        value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
        (loss, aux), grads = value_and_grad(sv["params"])

        k = t_logits.argmax(axis=1)
        s_own = np.asarray(student.apply(sv, x)).argmax(axis=1)
        assert (s_own != k).any()  # the teacher's class differs from the student's on some images
        m_s = _np_student_map(method, student, sv, x, k)
        form_fn = _np_cosine_form if form == "cosine" else _np_squared_mean_form
        match = form_fn(_np_shift(m_s), _np_shift(stored))
        np.testing.assert_allclose(float(aux["parts"]["match"]), match, rtol=1e-10)
        assert match > 1e-3
        parts = {n: float(v) for n, v in aux["parts"].items()}
        np.testing.assert_allclose(
            float(loss), 0.9 * parts["kd"] + 0.1 * parts["bce"] + 2.5 * match, rtol=1e-12
        )
        # The loss's student map, as matched (resized and shifted).
        (name,) = aux["student_maps"]
        np.testing.assert_allclose(
            np.asarray(aux["student_maps"][name]), _np_shift(m_s), rtol=1e-9, atol=1e-12
        )

        # Controls: the student's own class, or either map left unshifted, gives another matching term.
        wrong = {
            "student's class": form_fn(_np_shift(_np_student_map(method, student, sv, x, s_own)),
                                       _np_shift(stored)),
            "unshifted teacher map": form_fn(_np_shift(m_s), stored),
            "unshifted student map": form_fn(m_s, _np_shift(stored)),
        }  # fmt: skip
        for what, alt in wrong.items():
            if what == "unshifted student map" and method == "bb_gradcam" and np.allclose(m_s.min((1, 2)), 0):
                continue  # a ReLU map whose minimum is already 0: the shift changes nothing
            assert abs(alt - match) > 1e-4 * match, what

        direction = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), sv["params"])
        eps = 1e-6

        def at(sign):
            p = jax.tree.map(lambda a, v: a + sign * eps * v, sv["params"], direction)
            return float(value_and_grad(p)[0][0])

        fd = (at(1) - at(-1)) / (2 * eps)
        analytic = sum(
            float(jnp.vdot(g, v))
            for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
        )
        assert abs(fd) > 1e-6
        np.testing.assert_allclose(analytic, fd, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# 3. The teacher's black-box maps.
# ------------------------------------------------------------------------------------------------


def _two_layer(rng, side, k):
    """A two-layer ReLU net: numpy float64 ``(images -> logits)`` and the same net in jax float32."""
    w1, w2 = rng.normal(0, 0.1, (side * side * 3, 16)), rng.normal(0, 0.8, (16, k))

    def np_logits(images):
        return np.maximum(images.reshape(len(images), -1) @ w1, 0) @ w2

    def jax_logits(images):
        z = jax.nn.relu(images.reshape(images.shape[0], -1) @ jnp.asarray(w1, jnp.float32))
        return z @ jnp.asarray(w2, jnp.float32)

    return np_logits, jax_logits


def _blackbox_d(kind, size, **options):
    return ml_collections.ConfigDict(dict(blackbox=dict(map=kind, size=size, options=options)))


def test_teacher_occlusion_map_against_brute_force_then_block_means():
    """``teacher_map`` with map 'occlusion': the logits are the predictor's, and the map equals a brute-force
    numpy loop over every patch position (the drop of sigmoid(logit_k) for the top-1 class k, averaged over
    the patches covering each pixel, float64), block-mean pooled to ``size``; the forward-pass count is the
    patch positions plus two."""
    rng = np.random.default_rng(4)
    side, k, size, stride, baseline = 16, 4, 4, 3, -0.5
    np_logits, jax_logits = _two_layer(rng, side, k)
    x = rng.normal(0, 1, (3, side, side, 3)).astype(np.float32)
    d = _blackbox_d("occlusion", 4, occlusion_size=size, occlusion_stride=stride, occlusion_baseline=baseline)
    out = jax.jit(lambda images: blackbox.teacher_map(jax_logits, images, d))(jnp.asarray(x))
    x64 = x.astype(np.float64)
    logits = np_logits(x64)
    np.testing.assert_allclose(np.asarray(out["logits"]), logits, rtol=1e-4, atol=1e-5)
    cls = logits.argmax(axis=1)

    def score(image):  # sigmoid of logit k for one image (1, H, W, 3)
        return 1.0 / (1.0 + np.exp(-np_logits(image)))

    corners = [0, 3, 6, 9, 12]  # stride 3 and the last patch at 16 - 4
    full = np.zeros((3, side, side))
    count = np.zeros((side, side))
    for r0 in corners:
        for c0 in corners:
            count[r0 : r0 + size, c0 : c0 + size] += 1
            for i in range(3):
                occluded = x64[i].copy()
                occluded[r0 : r0 + size, c0 : c0 + size] = baseline
                drop = score(x64[i][None])[0, cls[i]] - score(occluded[None])[0, cls[i]]
                full[i, r0 : r0 + size, c0 : c0 + size] += drop
    want = _np_block_mean(full / count, 4)
    assert out["map"].shape == (3, 4, 4) and np.abs(want).max() > 1e-3
    np.testing.assert_allclose(np.asarray(out["map"]), want, atol=2e-6)
    assert blackbox.forward_passes(d, side, side) == 5 * 5 + 2


def test_teacher_rise_map_is_rise_with_the_seeded_masks_then_block_means():
    """``teacher_map`` with map 'rise' equals ``perturbation.rise_map`` of sigmoid(logits) for the top-1 class
    with the masks of key fold_in(key(seed), 1), average-pooled by numpy block means; another seed gives
    another map; the forward-pass count is N + 1."""
    rng = np.random.default_rng(5)
    side, k = 16, 4
    _, jax_logits = _two_layer(rng, side, k)
    x = jnp.asarray(rng.normal(0, 1, (2, side, side, 3)), jnp.float32)
    options = dict(rise_masks=16, rise_chunk=8, rise_cells=4, rise_keep=0.5, seed=3)
    d = _blackbox_d("rise", 8, **options)
    out = blackbox.teacher_map(jax_logits, x, d)

    masks = perturbation.rise_masks(jax.random.fold_in(jax.random.key(3), 1), 16, side, side, 4, 0.5)
    cls = jnp.argmax(jax_logits(x), axis=-1)
    full = perturbation.rise_map(lambda im: jax.nn.sigmoid(jax_logits(im)), x, cls, masks, 0.5, 8)
    want = _np_block_mean(np.asarray(full, np.float64), 8)
    assert out["map"].shape == (2, 8, 8)
    np.testing.assert_allclose(np.asarray(out["map"]), want, rtol=1e-5, atol=1e-7)
    other = blackbox.teacher_map(jax_logits, x, _blackbox_d("rise", 8, **{**options, "seed": 4}))
    assert not np.allclose(np.asarray(other["map"]), want, rtol=1e-3)
    assert blackbox.forward_passes(d, side, side) == 17


# ------------------------------------------------------------------------------------------------
# 4. Validation.
# ------------------------------------------------------------------------------------------------


def _refused(c, pattern):
    with pytest.raises(ConfigError) as e:
        validate_config(c)
    message = str(e.value)
    assert re.search(pattern, message), message
    # One sentence: no newline, one full stop at the end, no second sentence inside.
    assert "\n" not in message and message.endswith(".") and not re.search(r"[a-z)]\. [A-Z]", message), (
        message
    )
    return message


def test_blackbox_validation(teacher_dir):
    """Under teacher_access 'blackbox' the tap methods are refused naming the black-box teacher and the
    methods that fit; a black-box method under 'full', without a teacher cache, with an unknown map, a map
    larger than the image, an unknown or misfit map option, and an unknown access are refused; KD and both
    black-box methods (RISE and occlusion) are accepted."""
    for method in ("ewa", "swa", "sswa"):
        message = _refused(
            kd_config(teacher_dir, method, teacher_access="blackbox", teacher_cache=1), r"black-box"
        )
        assert f"method {method!r}" in message and "['kd', 'bb_gradcam', 'bb_input_grad']" in message
    message = _refused(kd_config(teacher_dir, "bb_gradcam", teacher_cache=1), r"teacher_access='blackbox'")
    assert "'sswa'" in message and "'bb_input_grad'" not in message
    _refused(
        kd_config(teacher_dir, "bb_gradcam", teacher_access="blackbox", teacher_cache=0), r"teacher_cache"
    )
    for field, value, pattern in [
        ("map", "lime", r"unknown config\.distill\.blackbox\.map 'lime'"),
        ("size", 33, r"blackbox\.size must be an integer in \[1, 32\]"),
        ("size", 0, r"blackbox\.size must be an integer in \[1, 32\]"),
    ]:
        c = kd_config(teacher_dir, "bb_input_grad", teacher_access="blackbox", teacher_cache=1)
        c.distill.blackbox[field] = value
        _refused(c, pattern)
    c = kd_config(teacher_dir, "bb_gradcam", teacher_access="blackbox", teacher_cache=1)
    c.distill.blackbox.options.rise_cell = 4
    _refused(c, r"unknown attribution method option 'rise_cell'")
    c = kd_config(teacher_dir, "bb_gradcam", teacher_access="blackbox", teacher_cache=1)
    c.distill.blackbox.map, c.distill.blackbox.options.occlusion_size = "occlusion", 40
    _refused(c, r"does not fit 32 pixels")
    _refused(kd_config(teacher_dir, "kd", teacher_access="grey"), r"unknown config\.distill\.teacher_access")

    validate_config(kd_config(teacher_dir, "kd", teacher_access="blackbox"))
    validate_config(kd_config(teacher_dir, "kd", teacher_access="blackbox", teacher_cache=1))
    for method in ("bb_gradcam", "bb_input_grad"):
        validate_config(kd_config(teacher_dir, method, teacher_access="blackbox", teacher_cache=1))
    c = kd_config(teacher_dir, "bb_gradcam", teacher_access="blackbox", teacher_cache=1)
    c.distill.blackbox.map, c.distill.blackbox.size = "occlusion", 32
    validate_config(c)


# ------------------------------------------------------------------------------------------------
# 5. A cached black-box distillation step end to end.
# ------------------------------------------------------------------------------------------------


def test_cached_blackbox_distill_step_end_to_end(teacher_dir, tmp_path):
    """bb_gradcam from the tiny teacher through the task: the cache holds map.npy (N, 1, 4, 4), its meta the
    black-box settings and build.json the forward passes (8 masks + 1); image 0's stored map is
    ``teacher_map`` of its regenerated crop within bfloat16 rounding; two steps give finite metrics, a
    positive matching term and loss = 0.9 KD + 0.1 BCE + beta * match."""
    cache_dir = tmp_path / "cache"
    c = kd_config(teacher_dir, "bb_gradcam", teacher_access="blackbox", teacher_cache=1,
                  teacher_cache_dir=str(cache_dir))  # fmt: skip
    c.distill.blackbox.options.update(rise_masks=8, rise_chunk=8, rise_cells=2, rise_keep=0.5)
    c.distill.blackbox.size = 4
    validate_config(c)
    mesh = data_mesh()
    train = load_data(c, splits=("train",))["train"]
    task = distill_task.build(c, train.num_classes, mesh, create_learning_rate_fn(c, 3))
    state = jax.device_put(task.init_state(), NamedSharding(mesh, PartitionSpec()))
    batches = task.batches(TrainBatches(train, 16, seed=0, mesh=mesh))

    n = len(train)
    assert np.load(cache_dir / "map.npy", mmap_mode="r").shape == (n, 1, 4, 4)
    meta = json.loads((cache_dir / "meta.json").read_text())
    assert set(meta["fields"]) == {"logits", "map"} and meta["fields"]["map"] == [4, 4]
    assert meta["blackbox"]["map"] == "rise" and meta["blackbox"]["options"]["rise_masks"] == 8
    build = json.loads((cache_dir / "build.json").read_text())
    assert build["teacher_forward_passes_per_image_and_draw"] == 9
    assert (build["images"], build["draws"]) == (n, 1) and build["seconds"] > 0

    teacher, teacher_vars = distill.load_teacher(c, mesh)
    idx = np.array([0])
    x = draw_augment(tc.draw_key(c.seed), jnp.asarray(idx, jnp.int32), 0, train.images[idx], train.sizes[idx],
                     train.extents[idx], c.data.image_size, teacher.dtype, c.data.crop_scale)  # fmt: skip
    want = blackbox.teacher_map(lambda im: teacher.apply(teacher_vars, im), x, c.distill)
    stored = batches.teacher_cache.gather(idx, 0)
    got = np.asarray(stored["map"]).astype(np.float32)
    scale = float(np.abs(want["map"]).max())
    assert scale > 0
    np.testing.assert_allclose(got, np.asarray(want["map"]), rtol=1e-2, atol=1e-2 * scale)
    np.testing.assert_allclose(
        np.asarray(stored["logits"]).astype(np.float32), np.asarray(want["logits"]), rtol=1e-2, atol=2e-2
    )

    for s in range(2):
        state, m = task.train_step(state, batches.batch(s))
    m = jax.device_get(m)
    assert set(m) == {"loss", "lr", "kd", "bce", "match", "grad_norm"}
    assert all(np.isfinite(v) for v in m.values()) and float(m["match"]) > 0.0
    np.testing.assert_allclose(
        m["loss"], 0.9 * m["kd"] + 0.1 * m["bce"] + c.distill.beta * m["match"], rtol=1e-5
    )


# ------------------------------------------------------------------------------------------------
# 6. The sweep variant.
# ------------------------------------------------------------------------------------------------


def test_paper_blackbox_variant_plans_and_validates(tmp_path):
    """``configs/paper.py:blackbox`` plans the teacher and, for seeds 0, 1 and 2, the x2 student with KD,
    SSWA, bb_gradcam and bb_input_grad (the black-box ones under teacher_access 'blackbox', the others
    'full'), all from a one-draw cache with the cosine form; ``validate_sweep`` accepts it before any
    teacher exists."""
    config = paper.get_config("blackbox")
    stages = experiment.plan(config, tmp_path)
    methods = ("kd", "sswa", "bb_gradcam", "bb_input_grad")
    expected = [f"kd_x2_{m}" + ("" if seed == 0 else f"@s{seed}") for seed in (0, 1, 2) for m in methods]
    names = [s.name for s in stages]
    assert [n for n in names if n.startswith("kd_")] == expected
    assert names[0] == "teacher" and names[-1] == "report"
    for s in stages:
        if not s.name.startswith("kd_"):
            continue
        d = s.config.distill
        assert d.teacher_access == ("blackbox" if d.method.startswith("bb_") else "full"), s.name
        assert d.method == s.name.split("@")[0].removeprefix("kd_x2_")
        assert d.teacher_cache == 1 and d.matching_form == "cosine"
    assert not (tmp_path / "teacher").exists()
    experiment.validate_sweep(config, stages)
