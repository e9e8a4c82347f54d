"""Rule-based (Excitation Backprop, LRP alpha1-beta0, RAP, on the BN-folded net) and gradient-family
attribution: BN folding, conservation laws, per-connection numpy references, Integrated Gradients'
completeness, finite differences, shapes and dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apjax.attribution import gradients, rules
from apjax.data.augment import MEAN, STD
from apjax.models import create_model, init_variables

WIDTHS = (4, "M", 6, 6, "M")  # 12x12 -> 6x6 -> 3x3
SIZE = 12
K = 5


def _variables(model, key, rng, dtype=jnp.float32, bias_free=False):
    """Variables with random conv/head biases, BN affine parameters and running statistics (non-trivial
    folding), or, with ``bias_free``, every (folded) bias exactly zero."""
    variables = init_variables(model, key, SIZE)
    variables = jax.tree.map(lambda a: jnp.asarray(a, dtype), variables)
    params, stats = variables["params"], variables["batch_stats"]

    def draw(sample, like):
        return jnp.zeros_like(like) if bias_free else jnp.asarray(sample(like.shape), dtype)

    for name in [n for n in params if n.startswith("conv") and not n.endswith("_bn")]:
        params[name]["bias"] = draw(lambda s: rng.normal(0.0, 0.1, s), params[name]["bias"])
        bn = params[f"{name}_bn"]
        bn["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, bn["scale"].shape), dtype)
        bn["bias"] = draw(lambda s: rng.normal(0.0, 0.2, s), bn["bias"])
        st = stats[f"{name}_bn"]
        st["mean"] = draw(lambda s: rng.normal(0.0, 0.1, s), st["mean"])
        st["var"] = jnp.asarray(rng.uniform(0.5, 1.5, st["var"].shape), dtype)
    params["head"]["kernel"] = jnp.asarray(rng.normal(0.0, 0.3, params["head"]["kernel"].shape), dtype)
    params["head"]["bias"] = draw(lambda s: rng.normal(0.0, 0.1, s), params["head"]["bias"])
    return variables


def _images(rng, batch, dtype=jnp.float32):
    """Normalised images of pixels strictly inside [0, 1], hence inside the z^B bounds."""
    u = rng.uniform(0.02, 0.98, (batch, SIZE, SIZE, 3))
    return jnp.asarray((u - np.asarray(MEAN)) / np.asarray(STD), dtype)


def _per_image_sums(record):
    return {n: np.asarray(r, np.float64).reshape(r.shape[0], -1).sum(axis=1) for n, r in record.items()}


# --- independent numpy references: explicit conv matrices, loop max-pools, per-connection rules ---------


def _conv_matrix(kernel, h, w):
    """The 3x3 / padding 1 conv as a matrix (h*w*Co, h*w*Ci) on (H, W, C)-flattened maps."""
    kernel = np.asarray(kernel, np.float64)
    ci, co = kernel.shape[2], kernel.shape[3]
    m = np.zeros((h, w, co, h, w, ci))
    for y in range(h):
        for x in range(w):
            for dy in range(3):
                for dx in range(3):
                    yy, xx = y + dy - 1, x + dx - 1
                    if 0 <= yy < h and 0 <= xx < w:
                        m[y, x, :, yy, xx, :] = kernel[dy, dx].T
    return m.reshape(h * w * co, h * w * ci)


def _np_pool(a):
    h, w, c = a.shape
    return a[: h // 2 * 2, : w // 2 * 2].reshape(h // 2, 2, w // 2, 2, c).max(axis=(1, 3))


def _np_pool_wta(a, r):
    """Each output's relevance to the first arg-max of its window."""
    out = np.zeros_like(a)
    for y in range(r.shape[0]):
        for x in range(r.shape[1]):
            for c in range(r.shape[2]):
                win = a[2 * y : 2 * y + 2, 2 * x : 2 * x + 2, c]
                dy, dx = np.unravel_index(np.argmax(win), (2, 2))
                out[2 * y + dy, 2 * x + dx, c] += r[y, x, c]
    return out


def _np_forward(layers, x):
    """One image (H, W, 3) through the folded layers: (logits, inputs of each layer, conv matrices)."""
    acts, mats, h = [], {}, np.asarray(x, np.float64)
    for i, layer in enumerate(layers):
        acts.append(h)
        if layer["type"] == "conv":
            mats[i] = _conv_matrix(layer["kernel"], h.shape[0], h.shape[1])
            z = mats[i] @ h.ravel() + np.tile(np.asarray(layer["bias"], np.float64), h.shape[0] * h.shape[1])
            h = np.maximum(z, 0.0).reshape(h.shape[0], h.shape[1], -1)
        elif layer["type"] == "pool":
            h = _np_pool(h)
        else:
            h = h.ravel() @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)
    return h, acts, mats


def _np_zb(x, m, r):
    lo = np.tile((0.0 - np.asarray(MEAN)) / np.asarray(STD), x.shape[0] * x.shape[1])
    hi = np.tile((1.0 - np.asarray(MEAN)) / np.asarray(STD), x.shape[0] * x.shape[1])
    mp, mn = np.maximum(m, 0), np.minimum(m, 0)
    xf = x.ravel()
    terms = m * xf[None] - mp * lo[None] - mn * hi[None]  # (out, in), each >= 0
    z = terms.sum(axis=1)
    return (terms.T @ (r.ravel() / z)).reshape(x.shape)


def _np_lrp(layers, x, k):
    logits, acts, mats = _np_forward(layers, x)
    r = np.zeros_like(logits)
    r[k] = logits[k]
    for i in range(len(layers) - 1, 0, -1):
        a, layer = acts[i], layers[i]
        if layer["type"] == "pool":
            r = _np_pool_wta(a, r)
            continue
        mp = (
            np.maximum(mats[i], 0)
            if layer["type"] == "conv"
            else np.maximum(np.asarray(layer["kernel"]), 0).T
        )
        zp = mp * a.ravel()[None]  # a_i w+_ij, (out, in)
        r = (zp.T @ (r.ravel() / zp.sum(axis=1))).reshape(a.shape)
    return _np_zb(acts[0], mats[0], r).sum(axis=-1)


def _np_rap(layers, x, k):
    logits, acts, mats = _np_forward(layers, x)
    a = acts[-1]
    c = np.abs(a.ravel() * np.asarray(layers[-1]["kernel"], np.float64)[:, k])
    r = (logits[k] * c / c.sum()).reshape(a.shape)
    for i in range(len(layers) - 2, 0, -1):
        a = acts[i]
        if layers[i]["type"] == "pool":
            r = _np_pool_wta(a, r)
            continue
        z = mats[i] * a.ravel()[None]  # every connection's contribution a_i w_ij
        zp, zn = np.maximum(z, 0), np.maximum(-z, 0)
        act, inh = zp.sum(axis=1), zn.sum(axis=1)
        tot = act + inh
        div = lambda u, v: np.divide(u, v, out=np.zeros_like(u), where=v > 0)
        rf = r.ravel()
        pos, neg = np.maximum(rf, 0), np.minimum(rf, 0)
        cin = zp.T @ div(pos, act) + zn.T @ (div(pos, tot) + div(neg, inh) + div(neg, tot))
        nz = cin != 0
        cin[nz] -= (cin.sum() - rf.sum()) / nz.sum()
        r = cin.reshape(a.shape)
    return np.maximum(_np_zb(acts[0], mats[0], r).sum(axis=-1), 0.0)


# --- 1. BN folding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_fold_batchnorm_keeps_the_logits(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        rng = np.random.default_rng(0)
        model = create_model(WIDTHS, num_classes=K, dtype=dtype)
        variables = _variables(model, jax.random.key(0), rng, dtype)
        x = _images(rng, 4, dtype)
        layers = rules.fold_batchnorm(variables, WIDTHS)
        assert [(ly["type"], ly["name"]) for ly in layers] == [
            ("conv", "conv1_1"), ("pool", "pool1"), ("conv", "conv2_1"), ("conv", "conv2_2"),
            ("pool", "pool2"), ("dense", "head"),
        ]  # fmt: skip
        assert layers[2]["kernel"].shape == (3, 3, 4, 6) and layers[2]["bias"].shape == (6,)
        assert layers[-1]["kernel"].shape == (3 * 3 * 6, K)
        ref = np.asarray(model.apply(variables, x))
        # The layer list is a pytree (static type/name): a jit argument; folding also works under jit.
        got = jax.jit(rules.folded_forward)(layers, x)
        got_traced = jax.jit(lambda v, x: rules.folded_forward(rules.fold_batchnorm(v, WIDTHS), x))(
            variables, x
        )
        assert got.dtype == dtype and got.shape == (4, K)
        tol = 1e-12 if dtype == jnp.float64 else 1e-5
        np.testing.assert_allclose(np.asarray(got), ref, rtol=tol, atol=tol * np.abs(ref).max())
        np.testing.assert_allclose(np.asarray(got_traced), np.asarray(got), rtol=tol, atol=tol)
        # Activations: the input of every layer; the ReLU outputs are non-negative.
        _, acts = rules.folded_forward(layers, x, return_activations=True)
        assert [a.shape[1:] for a in acts] == [
            (12, 12, 3),
            (12, 12, 4),
            (6, 6, 4),
            (6, 6, 6),
            (6, 6, 6),
            (3, 3, 6),
        ]
        assert all(float(a.min()) >= 0.0 for a in acts[1:])
        # The folding is not vacuous: BN moved the weights.
        assert not np.allclose(
            np.asarray(layers[0]["kernel"]), np.asarray(variables["params"]["conv1_1"]["kernel"])
        )


# --- 2. LRP alpha1-beta0: conservation and the per-connection reference --------------------------------


def test_lrp_conserves_the_logit_at_every_layer_of_a_bias_free_net():
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        model = create_model(WIDTHS, num_classes=K, dtype=jnp.float64)
        variables = _variables(model, jax.random.key(1), rng, jnp.float64, bias_free=True)
        x = _images(rng, 4, jnp.float64)
        layers = rules.fold_batchnorm(variables, WIDTHS)
        assert all(float(jnp.abs(ly["bias"]).max()) == 0.0 for ly in layers if ly["type"] != "pool")
        logits = np.asarray(rules.folded_forward(layers, x))
        classes = logits.argmax(axis=1)
        logit = logits[np.arange(4), classes]
        assert (logit > 0).all()
        lrp = jax.jit(lambda ls, x, k: rules.lrp_alpha1beta0(ls, x, k, return_layers=True))
        m, record = lrp(layers, x, jnp.asarray(classes))
        assert set(record) == {"logits", "pool2", "conv2_2", "conv2_1", "pool1", "conv1_1", "input"}
        for name, total in _per_image_sums(record).items():
            np.testing.assert_allclose(total, logit, rtol=1e-10, err_msg=name)
        np.testing.assert_allclose(np.asarray(m), np.asarray(record["input"]).sum(-1), rtol=1e-12)
        # Non-negative everywhere above the input (z+ of a positive logit); the z^B input relevance too.
        assert all(float(record[n].min()) >= 0.0 for n in record)
        assert m.shape == (4, SIZE, SIZE) and m.dtype == jnp.float64


def test_lrp_and_excitation_backprop_match_the_per_connection_reference():
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        model = create_model(WIDTHS, num_classes=K, dtype=jnp.float64)
        variables = _variables(model, jax.random.key(2), rng, jnp.float64)  # with biases
        x = _images(rng, 2, jnp.float64)
        layers = rules.fold_batchnorm(variables, WIDTHS)
        classes = np.array([1, 3])
        got = np.asarray(jax.jit(rules.lrp_alpha1beta0)(layers, x, jnp.asarray(classes)))
        for b in range(2):
            np.testing.assert_allclose(
                got[b], _np_lrp(layers, np.asarray(x[b]), classes[b]), rtol=1e-9, atol=1e-12
            )
        # Excitation Backprop is the z+ propagation of a unit seed: at conv2_2 it equals LRP's relevance
        # there divided by the logit (same rules above conv2_2).
        _, lrp_rec = rules.lrp_alpha1beta0(layers, x, classes, return_layers=True)
        eb, eb_rec = rules.excitation_backprop(layers, x, classes, read_at="conv2_2", return_layers=True)
        logit = np.asarray(lrp_rec["logits"]).sum(axis=1)
        expected = np.asarray(lrp_rec["conv2_2"]) / logit[:, None, None, None]
        np.testing.assert_allclose(np.asarray(eb_rec["conv2_2"]), expected, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(np.asarray(eb), np.maximum(expected.sum(-1), 0.0), rtol=1e-10, atol=1e-14)


# --- 3. Excitation Backprop: a probability distribution at every layer ---------------------------------


def test_excitation_backprop_is_a_distribution_at_every_layer():
    rng = np.random.default_rng(3)
    model = create_model(WIDTHS, num_classes=K)
    variables = _variables(model, jax.random.key(3), rng, bias_free=True)
    x = _images(rng, 3)
    layers = rules.fold_batchnorm(variables, WIDTHS)
    classes = jnp.asarray([0, 2, 4])
    eb = jax.jit(lambda ls, x, k: rules.excitation_backprop(ls, x, k, read_at="conv1_1", return_layers=True))
    m, probs = eb(layers, x, classes)
    assert set(probs) == {"logits", "pool2", "conv2_2", "conv2_1", "pool1", "conv1_1"}
    for name, total in _per_image_sums(probs).items():
        assert float(probs[name].min()) >= 0.0, name
        np.testing.assert_allclose(total, 1.0, rtol=1e-5, err_msg=name)
    assert m.shape == (3, SIZE, SIZE) and m.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(m).sum(axis=(1, 2)), 1.0, rtol=1e-5)
    # The default tap of a VGG16 and an unknown tap: a clear error listing the choices.
    with pytest.raises(ValueError, match="conv2_2"):
        rules.excitation_backprop(layers, x, classes)


# --- 4. RAP: conservation (with biases) and the per-connection reference -------------------------------


def test_rap_conserves_the_logit_at_every_layer_and_matches_the_reference():
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        model = create_model(WIDTHS, num_classes=K, dtype=jnp.float64)
        variables = _variables(model, jax.random.key(4), rng, jnp.float64)  # biases present
        x = _images(rng, 3, jnp.float64)
        layers = rules.fold_batchnorm(variables, WIDTHS)
        logits = np.asarray(rules.folded_forward(layers, x))
        classes = np.array([0, 1, 2])  # whatever the sign of the logit
        logit = logits[np.arange(3), classes]
        m, record = jax.jit(lambda ls, x, k: rules.rap(ls, x, k, return_layers=True))(
            layers, x, jnp.asarray(classes)
        )
        # The promised sums: the head's input, every hidden conv and pool, and the z^B input relevance all
        # sum to the class logit.
        for name, total in _per_image_sums(record).items():
            np.testing.assert_allclose(total, logit, rtol=1e-9, atol=1e-12, err_msg=name)
        # Step 1 gives relevance of the logit's sign; the uniform shift makes hidden relevance bipolar.
        pool2 = np.asarray(record["pool2"])
        assert all((np.sign(logit[b]) * pool2[b] >= 0).all() for b in range(3))
        conv1 = np.asarray(record["conv1_1"])
        assert (conv1 > 0).any() and (conv1 < 0).any()
        np.testing.assert_allclose(
            np.asarray(m), np.maximum(np.asarray(record["input"]).sum(-1), 0.0), rtol=1e-12
        )
        for b in range(3):
            np.testing.assert_allclose(
                np.asarray(m[b]), _np_rap(layers, np.asarray(x[b]), classes[b]), rtol=1e-8, atol=1e-12
            )


# --- 5. Integrated Gradients: completeness -------------------------------------------------------------


def test_integrated_gradients_completeness():
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        # torchvision's init: the error bounds below were measured on its logit scale.
        model = create_model(WIDTHS, num_classes=K, dtype=jnp.float64, init="torchvision")
        variables = _variables(model, jax.random.key(5), rng, jnp.float64)
        x = _images(rng, 3, jnp.float64)[:2]
        classes = jnp.asarray([4, 0])
        f = lambda z: np.asarray(model.apply(variables, z))[np.arange(2), np.asarray(classes)]
        ig_fn = jax.jit(gradients.integrated_gradients, static_argnums=(0, 4, 6))
        # Far baselines (zeros, another image): the path crosses ReLU kinks, where the midpoint rule's error
        # is O(1/steps) (measured on these images: up to 6e-3 at 512 steps, 1.4e-3 at 2048, 2e-4 at 8192,
        # for logit differences of 1e-3 to 4).
        for x0 in (jnp.zeros_like(x), jnp.broadcast_to(_images(rng, 1, jnp.float64), x.shape)):
            ig = ig_fn(model, variables, x, classes, 2048, x0, 512)
            assert ig.shape == x.shape and ig.dtype == jnp.float64
            delta = f(x) - f(x0)
            assert np.abs(delta).max() > 0.5
            np.testing.assert_allclose(np.asarray(ig).sum(axis=(1, 2, 3)), delta, rtol=0, atol=3e-3)
        # A near baseline crosses no kink: the net is affine along the path and completeness is exact.
        x0 = x + 1e-7 * jnp.asarray(rng.normal(size=x.shape))
        ig = ig_fn(model, variables, x, classes, 8, x0)
        delta = f(x) - f(x0)
        assert np.abs(delta).min() > 1e-9
        np.testing.assert_allclose(np.asarray(ig).sum(axis=(1, 2, 3)), delta, rtol=1e-6)
        # The default baseline is zeros; the map is the RGB sum.
        ig0 = ig_fn(model, variables, x, classes, 8, jnp.zeros_like(x))
        np.testing.assert_allclose(
            np.asarray(ig_fn(model, variables, x, classes, 8)), np.asarray(ig0), rtol=1e-12
        )
        np.testing.assert_allclose(
            np.asarray(ig_fn(model, variables, x, classes, 8, None, 4)), np.asarray(ig0), rtol=1e-12
        )
        unrolled = gradients.integrated_gradients(model, variables, x, classes, 8, None, 2, unroll=True)
        np.testing.assert_allclose(np.asarray(unrolled), np.asarray(ig0), rtol=1e-12)
        ig_map = gradients.integrated_gradients_map(model, variables, x, classes, 8)
        np.testing.assert_allclose(np.asarray(ig_map), np.asarray(ig0).sum(-1), rtol=1e-10, atol=1e-14)


# --- 6. Shapes, dtypes and the gradient against finite differences -------------------------------------


def test_every_map_shape_and_dtype():
    rng = np.random.default_rng(6)
    model = create_model(WIDTHS, num_classes=K)
    variables = _variables(model, jax.random.key(6), rng)
    x = _images(rng, 2)
    classes = jnp.asarray([3, 1])
    key = jax.random.key(0)

    def all_maps(v, x, k):
        layers = rules.fold_batchnorm(v, WIDTHS)
        return {
            "eb": rules.excitation_backprop(layers, x, k, read_at="conv2_2"),
            "eb_pool": rules.excitation_backprop(layers, x, k, read_at="pool1"),
            "lrp": rules.lrp_alpha1beta0(layers, x, k),
            "rap": rules.rap(layers, x, k),
            "grad": gradients.gradient_map(model, v, x, k),
            "ixg": gradients.input_x_gradient_map(model, v, x, k),
            "sg": gradients.smoothgrad_map(model, v, x, k, key, samples=3),
            "input_grad": gradients.input_gradient(model, v, x, k),
            "ig_full": gradients.integrated_gradients(model, v, x, k, steps=4),
        }

    maps = jax.jit(all_maps)(variables, x, classes)
    full = (2, SIZE, SIZE, 3)
    shapes = {"eb": (2, 6, 6), "eb_pool": (2, 6, 6), "input_grad": full, "ig_full": full}
    for name, m in maps.items():
        assert m.shape == shapes.get(name, (2, SIZE, SIZE)), name
        assert m.dtype == jnp.float32, name
        assert np.isfinite(np.asarray(m)).all() and float(jnp.abs(m).max()) > 0.0, name
    for name in ("eb", "eb_pool", "rap", "grad", "sg"):
        assert float(maps[name].min()) >= 0.0, name
    # A scalar class broadcasts over the batch; the gradient-family relations hold.
    same = gradients.gradient_map(model, variables, x, 3)
    np.testing.assert_allclose(np.asarray(same[0]), np.asarray(maps["grad"][0]), rtol=1e-6)
    g = np.asarray(maps["input_grad"])
    np.testing.assert_allclose(np.asarray(maps["grad"]), np.abs(g).max(-1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(maps["ixg"]), (np.asarray(x) * g).sum(-1), rtol=1e-5, atol=1e-8)
    # SmoothGrad: the chunking does not change the noise draws; with zero noise it is the gradient map.
    sg3 = gradients.smoothgrad_map(model, variables, x, classes, key, samples=3, chunk=3)
    np.testing.assert_allclose(np.asarray(sg3), np.asarray(maps["sg"]), rtol=1e-5, atol=1e-9)
    sg0 = gradients.smoothgrad_map(model, variables, x, classes, jax.random.PRNGKey(0), 2, noise=0.0, chunk=2)
    np.testing.assert_allclose(np.asarray(sg0), np.asarray(maps["grad"]), rtol=1e-6)


def test_gradient_map_matches_finite_differences():
    with jax.enable_x64(True):
        rng = np.random.default_rng(7)
        model = create_model(WIDTHS, num_classes=K, dtype=jnp.float64)
        variables = _variables(model, jax.random.key(7), rng, jnp.float64)
        x = np.asarray(_images(rng, 2, jnp.float64))
        classes = np.array([2, 0])
        got = np.asarray(jax.jit(lambda x, k: gradients.gradient_map(model, variables, x, k))(x, classes))
        logit = jax.jit(lambda x: model.apply(variables, x))
        step = 1e-6
        for b, y, xx in [(0, 3, 4), (1, 7, 2), (1, 0, 11)]:
            fd = []
            for c in range(3):
                e = np.zeros_like(x)
                e[b, y, xx, c] = step
                diff = np.asarray(logit(x + e))[b, classes[b]] - np.asarray(logit(x - e))[b, classes[b]]
                fd.append(abs(diff) / (2 * step))
            np.testing.assert_allclose(got[b, y, xx], max(fd), rtol=1e-6, atol=1e-10)
            assert max(fd) > 1e-6
