"""Deletion and insertion (the faithfulness evaluator) against brute force in numpy float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apjax import evaluators
from apjax.attribution.maps import upsample_map
from apjax.attribution.methods import map_fn
from apjax.data.augment import eval_preprocess
from apjax.data.pipeline import data_mesh
from apjax.errors import ConfigError
from apjax.evaluators import faithfulness as fa
from apjax.evaluators.context import EvalContext, load_run


def _np_curves(prob, x, a, k, steps, deletion_baseline, insertion_baseline):
    """One image's curves by brute force: pixels ordered by the map (stable, highest first), point t has
    the first floor(t n / S) of them deleted / inserted."""
    h, w = a.shape
    order = np.argsort(-a.ravel(), kind="stable")
    deletion, insertion = [], []
    for t in range(steps + 1):
        first = np.zeros(h * w, bool)
        first[order[: t * h * w // steps]] = True
        first = first.reshape(h, w, 1)
        deletion.append(prob(np.where(first, deletion_baseline, x))[k])
        insertion.append(prob(np.where(first, x, insertion_baseline))[k])
    return np.array(deletion), np.array(insertion)


def test_curves_and_their_areas_equal_brute_force_on_a_linear_model():
    rng = np.random.default_rng(0)
    h, k_classes, steps = 6, 3, 5  # 36 pixels: 0, 7, 14, 21, 28, 36 of them at the six points
    w = rng.normal(0, 0.3, (h, h, 3, k_classes))

    def np_prob(image):  # float64 probabilities of a linear model on the image
        return 1 / (1 + np.exp(-np.einsum("hwc,hwck->k", image, w)))

    def jax_prob(images):
        return jax.nn.sigmoid(jnp.einsum("bhwc,hwck->bk", images, jnp.asarray(w, jnp.float32)))

    x = rng.normal(0, 1, (3, h, h, 3))
    maps = rng.normal(0, 1, (3, h, h))
    maps[2] = 0.5  # a constant map: row-major order
    maps[1, 0, :3] = maps[1, 0, 0]  # ties inside a map
    classes = np.array([0, 2, 1])
    blurred = rng.normal(0, 1, x.shape)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    got = fa.curves(jax_prob, f32(x), f32(maps), jnp.asarray(classes), steps, 0 * f32(x), f32(blurred))
    grid = np.linspace(0, 1, steps + 1)

    def area(y):  # the trapezoid rule over the fractions of pixels
        return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(grid)))

    for i in range(3):
        d, ins = _np_curves(np_prob, x[i], maps[i], classes[i], steps, 0.0, blurred[i])
        np.testing.assert_allclose(np.asarray(got["deletion"][i]), d, atol=2e-6)
        np.testing.assert_allclose(np.asarray(got["insertion"][i]), ins, atol=2e-6)
        assert float(fa.curve_auc(got["deletion"])[i]) == pytest.approx(area(d), abs=2e-6)
        assert float(fa.curve_auc(got["insertion"])[i]) == pytest.approx(area(ins), abs=2e-6)
    # The ends: nothing deleted is the image itself, everything deleted is the baseline.
    np.testing.assert_allclose(got["deletion"][:, 0], got["insertion"][:, -1], atol=1e-7)


def test_gaussian_blur_equals_a_loop_with_edges_repeated():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (2, 7, 9, 3))
    sigma, r = 1.2, 4  # window 2 ceil(3 sigma) + 1 = 9
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    g /= g.sum()
    want = np.zeros_like(x)
    for i in range(7):
        for j in range(9):
            for di in range(-r, r + 1):
                for dj in range(-r, r + 1):
                    ii, jj = min(max(i + di, 0), 6), min(max(j + dj, 0), 8)
                    want[:, i, j] += g[di + r] * g[dj + r] * x[:, ii, jj]
    np.testing.assert_allclose(
        np.asarray(fa.gaussian_blur(jnp.asarray(x, jnp.float32), sigma)), want, atol=1e-5
    )
    flat = jnp.full((1, 5, 5, 3), 0.7)
    np.testing.assert_allclose(np.asarray(fa.gaussian_blur(flat, 2.0)), 0.7, atol=1e-6)


def test_faithfulness_evaluator_scores_a_runs_own_maps_on_its_own_model(teacher_dir):
    run = load_run(teacher_dir)
    ctx = EvalContext(run.config, run.model, data_mesh())
    ev = evaluators.create("faithfulness", ctx, methods=("gradcam",), steps=4, batch_size=8)
    out = ev.run(run.variables)
    pairs = ev._pairs.pairs(run.variables)
    assert out["gradcam/pairs"] == len(pairs) > 0
    per_pair = ev.pair_scores("gradcam", run.variables, pairs)
    assert out["gradcam/deletion_auc"] == pytest.approx(per_pair["deletion_auc"].mean())
    # Three pairs by brute force: the map on one device, then every curve point's forward pass alone.
    seg = ctx.cache("segmentation_val")
    size, sigma = ctx.image_size, 5.0 * ctx.image_size / 224
    idx = pairs[:3, 0]
    x = eval_preprocess(jnp.asarray(seg.images[idx]), jnp.asarray(seg.extents[idx]), out_size=size)
    fn = jax.jit(map_fn("gradcam", run.model))
    maps = np.asarray(
        upsample_map(fn(run.variables, x, jnp.asarray(pairs[:3, 1], jnp.int32), jnp.arange(3)), size)
    )
    forward = jax.jit(lambda im: jax.nn.sigmoid(run.model.apply(run.variables, im)))
    prob = lambda image: np.asarray(forward(jnp.asarray(image[None], jnp.float32))[0], np.float64)  # noqa: E731
    blurred = np.asarray(fa.gaussian_blur(x, sigma))
    for p in range(3):
        d, ins = _np_curves(prob, np.asarray(x[p]), maps[p], pairs[p, 1], 4, 0.0, blurred[p])
        trapezoid = lambda y: (y.sum() - (y[0] + y[-1]) / 2) / 4  # noqa: E731
        assert per_pair["deletion_auc"][p] == pytest.approx(trapezoid(d), abs=1e-5)
        assert per_pair["insertion_auc"][p] == pytest.approx(trapezoid(ins), abs=1e-5)
    with pytest.raises(ConfigError, match="insertion_baseline='noise'"):
        evaluators.create("faithfulness", ctx, insertion_baseline="noise")
