"""Attribution maps (SWA, SSWA, EWA, Grad-CAM) and the compression losses, against closed forms,
float64 finite differences and hand-written numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from apjax.attribution import (
    bernoulli_channel_mask,
    channel_weights,
    ewa_map,
    fixed_count_channel_mask,
    gradcam_map,
    map_cosine_similarity,
    normalize_map,
    swa_map,
    tap_maps,
    upsample_map,
)
from apjax.compress import MATCHING_FORMS, bce_loss, kd_loss, matching_loss, multi_tap_matching_loss
from apjax.models import apply_with_taps, create_model, init_variables, tap_gradients
from apjax.models.taps import with_perturbations

TINY = (4, "M", 6, "M", 8, "M")


def _one_hot(classes, k):
    return jax.nn.one_hot(jnp.asarray(classes), k)


def _f64_variables(model, key, image_size, rng):
    """float64 variables with non-trivial BN running statistics (eval mode is then a real affine map)."""
    variables = init_variables(model, key, image_size)
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    for stats in variables["batch_stats"].values():
        stats["mean"] = jnp.asarray(rng.normal(0.0, 0.1, stats["mean"].shape))
        stats["var"] = jnp.asarray(rng.uniform(0.5, 1.5, stats["var"].shape))
    return variables


def _head_logits(model, variables, x, offsets=None):
    """Logits in the model's own dtype: the Dense output captured before the float32 cast of the return."""
    if offsets:
        variables = with_perturbations(model, variables, x, offsets)
    _, state = model.apply(
        variables,
        x,
        capture_intermediates=lambda mdl, _: mdl.name == "head",
        mutable=["intermediates"],
    )
    return state["intermediates"]["head"]["__call__"][0]


# --- 1. SWA at the post-pool tap: the closed form from the head weights ---------------------------------


def test_swa_at_last_pool_is_head_weight_closed_form():
    model = create_model(TINY, num_classes=5)
    variables = init_variables(model, jax.random.key(0), 16)
    x = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
    classes = np.array([4, 0, 2])
    _, acts, grads, _ = jax.jit(lambda v: tap_gradients(model, v, x, _one_hot(classes, 5), ["pool3"]))(
        variables
    )
    a = np.asarray(acts["pool3"], np.float64)  # (B, 2, 2, 8)
    b, h, w, c = a.shape
    kernel = np.asarray(variables["params"]["head"]["kernel"], np.float64)  # (h*w*C, K)
    assert kernel.shape == (h * w * c, 5)
    expected = np.zeros((b, h, w))
    for i, k in enumerate(classes):
        d = np.zeros((h, w, c))  # d logit_k / d A[h, w, c] = W[(h * w_size + w) * C + c, k]
        for hh in range(h):
            for ww in range(w):
                for cc in range(c):
                    d[hh, ww, cc] = kernel[(hh * w + ww) * c + cc, k]
        np.testing.assert_allclose(np.asarray(grads["pool3"][i]), d, rtol=1e-6, atol=1e-9)
        u = d.sum(axis=(0, 1))
        expected[i] = np.maximum(np.einsum("hwc,c->hw", a[i], u), 0.0)
    got = swa_map(acts["pool3"], grads["pool3"])
    assert got.shape == (b, h, w) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-7)
    # tap_maps dispatches 'swa' and 'sswa' (unmasked) to the same map.
    for method in ("swa", "sswa"):
        np.testing.assert_array_equal(np.asarray(tap_maps(method, acts, grads)["pool3"]), np.asarray(got))


# --- 2. Grad-CAM at an inner tap against float64 finite differences ------------------------------------


def test_gradcam_at_inner_tap_matches_finite_differences_float64():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        model = create_model((4, "M", 6, 6, "M", 8, "M"), num_classes=5, dtype=jnp.float64)
        variables = _f64_variables(model, jax.random.key(2), 8, rng)
        tap = "conv2_2"
        x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)))
        # Make every ReLU up to the tap active, just barely at the tap: the max-pool right after the tap then
        # sees no ties (between zeros, or between equal values computed from all-zero inputs), at which a
        # central difference and the gradient legitimately disagree. conv2_2's BN bias is lifted per channel
        # by just enough (measured with a large lift, under which its ReLU is the identity) to keep the map
        # sum_c u_c A_c of mixed sign.
        for name in ("conv1_1", "conv2_1"):
            bn = variables["params"][f"{name}_bn"]
            bn["bias"] = bn["bias"] + 3.0
        bn = variables["params"]["conv2_2_bn"]
        big = 100.0
        lifted = {
            **variables,
            "params": {**variables["params"], "conv2_2_bn": {**bn, "bias": bn["bias"] + big}},
        }
        pre = np.asarray(apply_with_taps(model, lifted, x, (tap,))[1][tap]) - big  # conv2_2 before its ReLU
        assert pre.min() > -big
        bn["bias"] = bn["bias"] + jnp.asarray(np.maximum(-pre.min(axis=(0, 1, 2)), 0.0) + 0.05)
        classes = np.array([2, 4])
        _, acts, grads, _ = jax.jit(lambda v: tap_gradients(model, v, x, _one_hot(classes, 5), [tap]))(
            variables
        )
        a = np.asarray(acts[tap])
        assert a.shape == (2, 4, 4, 6) and a.min() > 0.0
        assert grads[tap].dtype == jnp.float64

        # d logit_k / d A by central differences on the offsets, every element, all at once (vmapped).
        n = a.size
        basis = jnp.eye(n, dtype=jnp.float64).reshape((n, *a.shape))
        step = 1e-4
        logits_at = jax.jit(jax.vmap(lambda e: _head_logits(model, variables, x, {tap: e})))
        plus, minus = np.asarray(logits_at(step * basis)), np.asarray(logits_at(-step * basis))
        assert plus.dtype == np.float64
        picked = (plus - minus)[:, np.arange(2), classes] / (2 * step)  # (n, B)
        fd = np.stack([picked[:, i].reshape(a.shape)[i] for i in range(2)])  # (B, 4, 4, 6)
        np.testing.assert_allclose(np.asarray(grads[tap]), fd, rtol=1e-7, atol=1e-12)
        assert np.abs(fd).max() > 1e-4  # a non-trivial gradient

        for reduce in ("sum", "mean"):
            u = fd.sum(axis=(1, 2)) if reduce == "sum" else fd.mean(axis=(1, 2))
            np.testing.assert_allclose(np.asarray(channel_weights(grads[tap], reduce)), u, rtol=1e-7)
            linear = np.einsum("bhwc,bc->bhw", a, u)
            for relu in (True, False):
                expected = np.maximum(linear, 0.0) if relu else linear
                got = gradcam_map(acts[tap], grads[tap], reduce=reduce, relu=relu)
                assert got.dtype == jnp.float64
                np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-7, atol=1e-12)
        assert (linear < 0).any() and (linear > 0).any()  # the ReLU case is not vacuous
        with pytest.raises(ValueError, match="reduce"):
            channel_weights(grads[tap], "max")


# --- 3. Gradient of the matching loss w.r.t. the student's parameters (second order) -------------------


def test_matching_loss_parameter_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        model = create_model((4, "M", 6, 6, "M", 8, "M"), num_classes=5, dtype=jnp.float64)
        variables = _f64_variables(model, jax.random.key(3), 16, rng)
        # A teacher of the same shape: the student's parameters, each scaled and shifted at random.
        t_vars = {
            "params": jax.tree.map(
                lambda a: a * rng.uniform(0.5, 1.5, a.shape) + 0.05 * rng.normal(size=a.shape),
                variables["params"],
            ),
            "batch_stats": variables["batch_stats"],
        }
        x = jnp.asarray(rng.normal(size=(3, 16, 16, 3)))
        seed = _one_hot([0, 2, 4], 5)
        taps = ("conv2_2", "pool3")
        maps_of = jax.jit(lambda v: tap_maps("swa", *tap_gradients(model, v, x, seed, taps)[1:3]))
        teacher_maps = maps_of(t_vars)
        assert all(float(m.max()) > 0.0 for m in teacher_maps.values())
        params = variables["params"]
        leaves, treedef = jax.tree.flatten(params)
        directions = [
            jax.tree.unflatten(treedef, [jnp.asarray(rng.normal(size=p.shape)) for p in leaves])
            for _ in range(3)
        ]

        for form in MATCHING_FORMS:

            def loss(params, form=form):
                v = {"params": params, "batch_stats": variables["batch_stats"]}
                _, acts, grads, _ = tap_gradients(model, v, x, seed, taps)
                return multi_tap_matching_loss(tap_maps("swa", acts, grads), teacher_maps, form)

            loss_fn = jax.jit(loss)
            grad = jax.jit(jax.grad(loss))(params)
            # The normalised map M / ||M|| is strongly curved where ||M|| is small, so the truncation error of
            # the central difference (~eps^2) needs a small step; float64 round-off stays ~1e-10 at 1e-6.
            eps = 1e-6
            for d in directions:
                shifted = lambda s, d=d: jax.tree.map(lambda a, b: a + s * b, params, d)
                fd = (float(loss_fn(shifted(eps))) - float(loss_fn(shifted(-eps)))) / (2 * eps)
                analytic = sum(
                    float(jnp.vdot(g, q))
                    for g, q in zip(jax.tree.leaves(grad), jax.tree.leaves(d), strict=True)
                )
                assert abs(analytic) > 1e-4, analytic
                np.testing.assert_allclose(analytic, fd, rtol=1e-5)
            # The second-order path is live: the activations at both taps do not depend on the head, so the
            # head kernel's gradient flows only through d logit / d A.
            assert float(jnp.abs(grad["head"]["kernel"]).max()) > 0.0


# --- 4. The reference's SSWA mask: a fixed number of channels, one mask per batch ----------------------


def test_fixed_count_channel_mask():
    c, drop = 64, 0.3
    n_drop = int(c * drop)
    assert n_drop == 19
    mask = fixed_count_channel_mask(jax.random.key(0), c, drop)
    assert mask.shape == (c,) and mask.dtype == jnp.float32
    assert set(np.unique(np.asarray(mask))) <= {0.0, 1.0}
    assert int((np.asarray(mask) == 0).sum()) == n_drop
    assert not np.array_equal(mask, fixed_count_channel_mask(jax.random.key(1), c, drop))
    np.testing.assert_array_equal(mask, fixed_count_channel_mask(jax.random.key(0), c, drop))
    n_keys = 2000
    keys = jax.random.split(jax.random.key(5), n_keys)
    masks = np.asarray(jax.jit(jax.vmap(lambda k: fixed_count_channel_mask(k, c, drop)))(keys))
    assert ((masks == 0).sum(axis=1) == n_drop).all()
    rate, p = (masks == 0).mean(axis=0), n_drop / c
    se = np.sqrt(p * (1 - p) / n_keys)
    assert np.abs(rate - p).max() < 5 * se, np.abs(rate - p).max() / se
    assert int(fixed_count_channel_mask(jax.random.key(0), c, 0.0).sum()) == c
    assert int(fixed_count_channel_mask(jax.random.key(0), 10, 0.1).sum()) == 9
    with pytest.raises(ValueError, match="drop"):
        fixed_count_channel_mask(jax.random.key(0), c, 1.5)


def test_sswa_mask_removes_channels_for_the_whole_batch():
    rng = np.random.default_rng(2)
    b, h, w, c = 3, 4, 5, 8
    a = rng.uniform(0, 2, (b, h, w, c)).astype(np.float32)
    g = rng.normal(size=(b, h, w, c)).astype(np.float32)
    acts, grads = jnp.asarray(a), jnp.asarray(g)
    # Without a mask, SWA is sum-reduced Grad-CAM with a ReLU.
    np.testing.assert_array_equal(np.asarray(swa_map(acts, grads)), np.asarray(gradcam_map(acts, grads)))
    mask = fixed_count_channel_mask(jax.random.key(7), c, 0.3)
    keep = np.asarray(mask).astype(bool)
    assert (~keep).sum() == 2
    u = g.sum(axis=(1, 2))
    expected = np.maximum(np.einsum("bhwc,bc->bhw", a[..., keep], u[:, keep]), 0.0)
    got = swa_map(acts, grads, channel_mask=mask)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
    # A (C,) mask is the same as the (B, C) mask repeating it for every image.
    tiled = jnp.tile(mask[None], (b, 1))
    np.testing.assert_allclose(np.asarray(swa_map(acts, grads, channel_mask=tiled)), np.asarray(got))
    # tap_maps applies a mask only where one is given (the student side is called with none).
    by_tap = tap_maps("sswa", {"t": acts, "s": acts}, {"t": grads, "s": grads}, channel_masks={"t": mask})
    np.testing.assert_allclose(np.asarray(by_tap["t"]), np.asarray(got))
    np.testing.assert_allclose(np.asarray(by_tap["s"]), np.asarray(swa_map(acts, grads)))
    with pytest.raises(ValueError, match="channel_mask"):
        swa_map(acts, grads, channel_mask=jnp.ones((c + 1,)))


# --- 5. The paper's SSWA mask: Bernoulli per image and channel -----------------------------------------


def test_bernoulli_channel_mask():
    keep_prob, n_keys, c = 0.7, 2000, 64
    keys = jax.random.split(jax.random.key(11), n_keys)
    masks = np.asarray(jax.jit(jax.vmap(lambda k: bernoulli_channel_mask(k, 1, c, keep_prob)))(keys))
    assert masks.shape == (n_keys, 1, c) and masks.dtype == np.float32
    assert set(np.unique(masks)) == {0.0, 1.0}
    se = np.sqrt(keep_prob * (1 - keep_prob) / masks.size)
    assert abs(masks.mean() - keep_prob) < 4 * se
    m1 = bernoulli_channel_mask(jax.random.key(3), 4, c, keep_prob)
    np.testing.assert_array_equal(m1, bernoulli_channel_mask(jax.random.key(3), 4, c, keep_prob))
    assert m1.shape == (4, c)
    rows = np.asarray(m1)
    assert all(not np.array_equal(rows[i], rows[j]) for i in range(4) for j in range(i + 1, 4))
    assert not np.array_equal(rows, bernoulli_channel_mask(jax.random.key(4), 4, c, keep_prob))


# --- 6. Logit KD (SPEC section 4) ----------------------------------------------------------------------


def _np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def test_kd_loss_matches_spec_formula():
    rng = np.random.default_rng(3)
    s, t = rng.normal(0, 3, (6, 20)), rng.normal(0, 3, (6, 20))
    y = (rng.random((6, 20)) > 0.7).astype(np.float64)
    temp, alpha = 4.0, 0.9
    p_t, p_s = _np_sigmoid(t / temp), _np_sigmoid(s / temp)
    kl = p_t * np.log(p_t / p_s) + (1 - p_t) * np.log((1 - p_t) / (1 - p_s))
    kd = temp**2 * kl.mean()
    p = _np_sigmoid(s)
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    total, parts = kd_loss(
        jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(y), temp, alpha
    )
    np.testing.assert_allclose(float(parts["kd"]), kd, rtol=1e-5)
    np.testing.assert_allclose(float(parts["bce"]), bce, rtol=1e-5)
    np.testing.assert_allclose(float(total), alpha * kd + (1 - alpha) * bce, rtol=1e-5)
    jitted, _ = jax.jit(kd_loss, static_argnums=(3, 4))(
        jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(y), temp, alpha
    )
    np.testing.assert_allclose(float(jitted), float(total), rtol=1e-6)
    np.testing.assert_allclose(float(bce_loss(jnp.asarray(s, jnp.float32), jnp.asarray(y))), bce, rtol=1e-5)
    # Defaults are T = 4, alpha = 0.9; integer labels work.
    total_default, _ = kd_loss(
        jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(y, jnp.int32)
    )
    np.testing.assert_allclose(float(total_default), float(total), rtol=1e-6)
    # KL(p || p) = 0; extreme logits stay finite.
    _, same = kd_loss(jnp.asarray(t, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(y))
    assert abs(float(same["kd"])) < 1e-6
    big = jnp.asarray([[200.0, -200.0, 0.0]])
    tot, _ = kd_loss(-big, big, jnp.asarray([[1.0, 0.0, 1.0]]))
    assert np.isfinite(float(tot))

    sj, tj, yj = (jnp.asarray(v, jnp.float32) for v in (s, t, y))
    g_t = jax.grad(lambda tt: kd_loss(sj, tt, yj)[0])(tj)
    np.testing.assert_array_equal(np.asarray(g_t), 0.0)
    # SPEC remark: BCE(s/T, sigmoid(t/T)) has the same gradient in s as the KL term (T^2 factor, mean).
    g_kd = jax.grad(lambda ss: kd_loss(ss, tj, yj)[1]["kd"])(sj)
    g_bce = jax.grad(
        lambda ss: temp**2 * optax.sigmoid_binary_cross_entropy(ss / temp, jax.nn.sigmoid(tj / temp)).mean()
    )(sj)
    np.testing.assert_allclose(np.asarray(g_kd), np.asarray(g_bce), rtol=1e-4, atol=1e-8)


def test_kd_loss_with_the_references_epsilon():
    """The reference's KL takes log(q + 1e-7) of the student's two-way probabilities q (SPEC section 7)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        s, t = rng.normal(0, 3, (6, 20)), rng.normal(0, 3, (6, 20))
        y = (rng.random((6, 20)) > 0.7).astype(np.float64)
        p_t, p_s = _np_sigmoid(t / 4.0), _np_sigmoid(s / 4.0)
        kl = p_t * (np.log(p_t) - np.log(p_s + 1e-7)) + (1 - p_t) * (np.log(1 - p_t) - np.log(1 - p_s + 1e-7))
        _, parts = kd_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), 4.0, 0.9, log_eps=1e-7)
        np.testing.assert_allclose(float(parts["kd"]), 16.0 * kl.mean(), rtol=1e-12)
        _, exact = kd_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), 4.0, 0.9)
        gap = abs(float(parts["kd"]) - float(exact["kd"]))
        assert 0 < gap < 1e-4  # the two differ, by about 1e-6 here


# --- 7. Matching loss by hand --------------------------------------------------------------------------


def _np_normalize(m, eps=1e-12):
    flat = m.reshape(m.shape[0], -1)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), eps)


def test_matching_loss_by_hand():
    rng = np.random.default_rng(4)
    ms, mt = rng.uniform(0, 1, (4, 3, 5)), rng.uniform(0, 1, (4, 3, 5))
    ms[1] = 0.0  # an all-zero student map
    mt[2] = 0.0  # an all-zero teacher map
    ns, nt = _np_normalize(ms), _np_normalize(mt)
    expected = {
        "squared_mean": ((nt - ns) ** 2).mean(),
        "l2": np.linalg.norm(ns - nt, axis=1).mean(),
    }
    js, jt = jnp.asarray(ms, jnp.float32), jnp.asarray(mt, jnp.float32)
    for form, value in expected.items():
        got = matching_loss(js, jt, form)
        assert got.shape == () and np.isfinite(float(got))
        np.testing.assert_allclose(float(got), value, rtol=1e-5)
        # (B, N) maps give the same value as (B, h, w).
        np.testing.assert_allclose(
            float(matching_loss(js.reshape(4, -1), jt.reshape(4, -1), form)), value, rtol=1e-6
        )
        # Gradient: zero in the teacher map, finite in the student map (also at the all-zero one).
        g_t = jax.grad(lambda t, form=form: matching_loss(js, t, form))(jt)
        np.testing.assert_array_equal(np.asarray(g_t), 0.0)
        g_s = jax.grad(lambda s, form=form: matching_loss(s, jt, form))(js)
        assert np.isfinite(np.asarray(g_s)).all()
        # Identical maps: zero loss with a finite (zero) gradient, as for a pruned student's first step.
        g_same = jax.grad(lambda s, form=form: matching_loss(s, jt, form))(jt)
        np.testing.assert_allclose(np.asarray(g_same), 0.0, atol=1e-6)
        assert float(matching_loss(jt, jt, form)) < 1e-6
        # Sum over taps.
        multi = multi_tap_matching_loss({"a": js, "b": jt}, {"a": jt, "b": js}, form)
        np.testing.assert_allclose(float(multi), 2 * value, rtol=1e-5)
    with pytest.raises(ValueError, match="squared_mean"):
        matching_loss(js, jt, "l1")
    with pytest.raises(ValueError, match="tap sets"):
        multi_tap_matching_loss({"a": js}, {"b": jt}, "l2")


# --- 8. Normalisation, cosine similarity, EWA, upsampling ----------------------------------------------


def test_normalize_cosine_ewa_upsample_by_hand():
    rng = np.random.default_rng(5)
    m1, m2 = rng.normal(size=(3, 4, 4)), rng.normal(size=(3, 4, 4))
    m2[1] = 0.0
    n1 = normalize_map(jnp.asarray(m1, jnp.float32))
    assert n1.shape == (3, 16) and n1.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(n1), _np_normalize(m1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(n1), axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(normalize_map(jnp.zeros((2, 3, 3)))), 0.0)
    cos = map_cosine_similarity(jnp.asarray(m1, jnp.float32), jnp.asarray(m2, jnp.float32))
    f1, f2 = m1.reshape(3, -1), m2.reshape(3, -1)
    expected = np.array(
        [
            0.0 if not f2[i].any() else f1[i] @ f2[i] / (np.linalg.norm(f1[i]) * np.linalg.norm(f2[i]))
            for i in range(3)
        ]
    )
    assert cos.shape == (3,)
    np.testing.assert_allclose(np.asarray(cos), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(map_cosine_similarity(n1, 3.0 * n1)), 1.0, rtol=1e-6)

    a = rng.normal(size=(2, 3, 3, 5)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(ewa_map(jnp.asarray(a))), (a**2).mean(-1), rtol=1e-6)
    assert set(tap_maps("ewa", {"p": jnp.asarray(a)}, None)) == {"p"}
    with pytest.raises(ValueError, match="gradcam"):
        tap_maps("lrp", {"p": jnp.asarray(a)}, None)
    with pytest.raises(ValueError, match="grads"):
        tap_maps("swa", {"p": jnp.asarray(a)}, None)
    # bfloat16 activations give float32 maps.
    assert ewa_map(jnp.asarray(a, jnp.bfloat16)).dtype == jnp.float32

    # Bilinear upsampling: a constant stays constant, a 1-D ramp stays linear inside, shape (B, s, s).
    up = upsample_map(jnp.full((2, 7, 7), 3.0), 28)
    assert up.shape == (2, 28, 28)
    np.testing.assert_allclose(np.asarray(up), 3.0, rtol=1e-6)
    ramp = jnp.tile(jnp.arange(4.0)[None, None, :], (1, 4, 1))  # (1, 4, 4), value = column index
    up = np.asarray(upsample_map(ramp, 8))
    # Half-pixel centres: output column j samples input coordinate (j + 0.5) / 2 - 0.5, clamped at the edges.
    coords = np.clip((np.arange(8) + 0.5) / 2 - 0.5, 0, 3)
    np.testing.assert_allclose(up[0], np.tile(coords, (8, 1)), rtol=1e-6, atol=1e-6)
    assert upsample_map(ramp, (6, 10)).shape == (1, 6, 10)
