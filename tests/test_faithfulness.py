"""Deletion, insertion and MoRF region perturbation (the faithfulness evaluator) against brute force in numpy
float64."""

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


def _np_region_curve(prob, x, a, k, size, regions, baseline):
    """One image's MoRF curve by brute force: the size x size regions from the top-left corner (the last
    row / column narrower), each scored by its map's sum in float64, ordered highest first (stable: ties by
    row-major region index); point j has the first j regions replaced by the baseline."""
    h, w = a.shape
    cells = [(i, j) for i in range(0, h, size) for j in range(0, w, size)]  # row-major region index
    sums = np.array([a[i : i + size, j : j + size].sum() for i, j in cells])
    order = np.argsort(-sums, kind="stable")
    image, curve = x.copy(), [prob(x)[k]]
    for r in order[: min(regions, len(cells))]:
        i, j = cells[r]
        image[i : i + size, j : j + size] = np.broadcast_to(baseline, x.shape)[i : i + size, j : j + size]
        curve.append(prob(image)[k])
    return np.array(curve)


def test_region_perturbation_curve_and_aopc_equal_brute_force_on_a_linear_model():
    rng = np.random.default_rng(2)
    h, size, k_classes = 10, 3, 3  # 4 x 4 regions: 9 of 3 x 3, 6 of 3 x 1 or 1 x 3, one 1 x 1 corner
    w = rng.normal(0, 0.3, (h, h, 3, k_classes))

    def np_prob(image):
        return 1 / (1 + np.exp(-np.einsum("hwc,hwck->k", image, w)))

    def jax_prob(images):
        return jax.nn.sigmoid(jnp.einsum("bhwc,hwck->bk", images, jnp.asarray(w, jnp.float32)))

    x = rng.normal(0, 1, (4, h, h, 3))
    maps = rng.normal(0, 1, (4, h, h))
    maps[1] = 0.5  # constant: the full regions tie (row-major), then the narrow ones, then the corner
    maps[2, 0:3, 0:3] += 5.0 - maps[2, 0:3, 0:3].mean()  # the highest sum, twice: region 0 before region 6
    maps[2, 3:6, 6:9] = maps[2, 0:3, 0:3]
    maps[3] = 0.0  # a zero map: every region ties
    classes = np.array([0, 2, 1, 0])
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    for regions in (5, 16, 64):  # L = 5, every region, more than there are (L = 16)
        got = fa.region_curve(jax_prob, f32(x), f32(maps), jnp.asarray(classes), size, regions, 0 * f32(x))
        assert got.shape == (4, min(regions, 16) + 1)
        for i in range(4):
            want = _np_region_curve(np_prob, x[i], maps[i], classes[i], size, regions, 0.0)
            np.testing.assert_allclose(np.asarray(got[i]), want, atol=2e-6)
            aopc = np.sum(want[0] - want) / len(want)  # 1 / (L + 1) sum_{k=0..L} (p_0 - p_k)
            assert float(fa.aopc(got)[i]) == pytest.approx(aopc, abs=2e-6)
    # The region order itself: the constant map's full regions first, row-major, the corner last.
    ranks = np.asarray(fa.region_ranks(f32(maps[1:2]), size))[0]
    assert ranks[0, 0] == 0 and ranks[0, 3] == 1 and ranks[8, 8] == 8 and ranks[9, 0] == 12
    assert ranks[0, 9] == 9 and ranks[9, 9] == 15 and ranks[9, 2] == 12 and ranks[5, 9] == 10
    assert fa.default_region_size(227) == 9 and fa.default_region_size(224) == 9
    assert fa.default_region_size(64) == 3 and fa.default_region_size(16) == 1


def test_uniform_region_noise_depends_on_the_pair_alone_and_lies_in_each_channels_range():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(0, 1, (3, 8, 8, 3)) * np.array([1.0, 2.0, 0.5]), jnp.float32)
    ids = jnp.asarray([11, 7, 3], jnp.int32)
    noise = np.asarray(fa.uniform_noise(x, ids))
    flat = np.asarray(x).reshape(3, -1, 3)
    lo, hi = flat.min(axis=1)[:, None, None], flat.max(axis=1)[:, None, None]
    assert np.all(noise >= lo) and np.all(noise <= hi)
    span = (noise.reshape(3, -1, 3).max(axis=1) - noise.reshape(3, -1, 3).min(axis=1)) / (hi - lo)[:, 0, 0]
    assert np.all(span > 0.8)  # 64 draws per channel spread over the range, not a corner of it
    # Pair 7 first in another batch of two, beside another image: the same noise and the same AOPC.
    other = jnp.stack([x[1], x[0] + 1.0])
    again = np.asarray(fa.uniform_noise(other, jnp.asarray([7, 5], jnp.int32)))
    np.testing.assert_array_equal(again[0], noise[1])
    assert not np.allclose(noise[0], noise[2])
    wts = jnp.asarray(rng.normal(0, 0.3, (8, 8, 3, 2)), jnp.float32)
    prob = lambda images: jax.nn.sigmoid(jnp.einsum("bhwc,hwck->bk", images, wts))  # noqa: E731
    maps = jnp.asarray(rng.normal(0, 1, (3, 8, 8)), jnp.float32)

    def aopc(images, m, pair_ids, classes):
        fill = fa.uniform_noise(images, jnp.asarray(pair_ids, jnp.int32))
        return np.asarray(fa.aopc(fa.region_curve(prob, images, m, jnp.asarray(classes), 3, 5, fill)))

    first = aopc(x, maps, [11, 7, 3], [0, 1, 0])
    second = aopc(other, jnp.stack([maps[1], maps[0]]), [7, 5], [1, 1])
    assert second[0] == pytest.approx(first[1], abs=1e-7)


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
    # 32 px in regions of 5: 7 x 7 of them, the last row and column 2 px; the uniform baseline (default).
    region = dict(region_size=5, regions=6)
    ev = evaluators.create("faithfulness", ctx, methods=("gradcam",), steps=4, batch_size=8, **region)
    out = ev.run(run.variables)
    pairs = ev._pairs.pairs(run.variables)
    assert out["gradcam/pairs"] == len(pairs) > 0
    per_pair = ev.pair_scores("gradcam", run.variables, pairs)
    assert out["gradcam/deletion_auc"] == pytest.approx(per_pair["deletion_auc"].mean())
    assert out["gradcam/morf_aopc"] == pytest.approx(per_pair["morf_aopc"].mean())
    # A pair's AOPC (its noise) does not depend on its place in the batch.
    moved = ev.pair_scores("gradcam", run.variables, pairs[:3][::-1])
    np.testing.assert_allclose(moved["morf_aopc"], per_pair["morf_aopc"][:3][::-1], atol=1e-6)
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
    # MoRF: the noise of each pair's example id (image index * K + class), the curve by brute force.
    ids = jnp.asarray(pairs[:3, 0] * ctx.num_classes + pairs[:3, 1], jnp.int32)
    noise = np.asarray(fa.uniform_noise(x, ids))
    for p in range(3):
        curve = _np_region_curve(prob, np.asarray(x[p]), maps[p], pairs[p, 1], 5, 6, noise[p])
        assert per_pair["morf_aopc"][p] == pytest.approx(np.mean(curve[0] - curve), abs=1e-5)
    with pytest.raises(ConfigError, match="insertion_baseline='noise'"):
        evaluators.create("faithfulness", ctx, insertion_baseline="noise")
    with pytest.raises(ConfigError, match=r"^faithfulness region_baseline='gauss'; choose one of"):
        evaluators.create("faithfulness", ctx, region_baseline="gauss")
    with pytest.raises(ConfigError, match=r"^faithfulness region_size=33 exceeds the input side of 32"):
        evaluators.create("faithfulness", ctx, region_size=33)
    for bad, message in (({"regions": 0}, "regions=0 must"), ({"region_size": 0}, "region_size=0 must")):
        with pytest.raises(ConfigError, match=message):
            fa.check_faithfulness(bad)
