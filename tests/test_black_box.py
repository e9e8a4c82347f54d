"""Black-box attribution (RISE, occlusion) against expectations derived by hand and brute force in numpy."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apjax.attribution import perturbation as pt
from apjax.attribution.methods import MethodOptions, attribution_methods, map_fn, method_label, method_options
from apjax.data.cache import HostCache
from apjax.data.pipeline import data_mesh
from apjax.errors import ConfigError
from apjax.evaluators.pairs import PairMaps
from tests.test_prune import random_variables

TINY = "4,M,8,M"  # a VGG-style chain: conv 4, pool, conv 8, pool, head


def _np_linear_upsample(a: np.ndarray, out: int) -> np.ndarray:
    """Bilinear upsampling of the last two axes of ``a`` (..., n, n) to (..., out, out): half-pixel centres,
    source coordinates clamped to the edge pixels (what skimage's order-1 'reflect' resize does too)."""

    def weights(n):
        u = np.clip((np.arange(out) + 0.5) * n / out - 0.5, 0, n - 1)
        i0 = np.floor(u).astype(int)
        i1 = np.minimum(i0 + 1, n - 1)
        w = np.zeros((out, n))
        np.add.at(w, (np.arange(out), i0), 1 - (u - i0))
        np.add.at(w, (np.arange(out), i1), u - i0)
        return w

    w = weights(a.shape[-1])
    return np.einsum("oi,...ij,pj->...op", w, a, w)


def test_rise_masks_are_upsampled_grids_cropped_at_their_shift():
    rng = np.random.default_rng(0)
    cells, h = 4, 14  # ceil(14 / 4) = 4: grids upsampled to 20 x 20, shifts in [0, 4)
    grids = (rng.random((5, cells, cells)) < 0.5).astype(np.float32)
    dy, dx = rng.integers(0, 4, 5), rng.integers(0, 4, 5)
    got = np.asarray(pt.upsample_and_crop(jnp.asarray(grids), jnp.asarray(dy), jnp.asarray(dx), h, h))
    up = _np_linear_upsample(grids.astype(np.float64), (cells + 1) * 4)
    want = np.stack([up[i, dy[i] : dy[i] + h, dx[i] : dx[i] + h] for i in range(5)])
    np.testing.assert_allclose(got, want, atol=1e-6)

    masks = np.asarray(pt.rise_masks(jax.random.key(0), 4000, h, h, cells, keep=0.3))
    assert masks.shape == (4000, h, h) and masks.min() >= 0 and masks.max() <= 1
    # Interpolation weights sum to one, so each pixel's mean is p; the std of a mean of 4000 values <= 1
    # is at most 1/sqrt(4000) = 0.016.
    assert np.abs(masks.mean(0) - 0.3).max() < 5 * 0.016
    np.testing.assert_array_equal(np.asarray(pt.rise_masks(jax.random.key(1), 3, h, h, cells, 1.0)), 1.0)


def _expected_one_pixel_map(h, cells, keep, pixel):
    """E[RISE map] of the model ``f(I) = I[pixel]`` on an image of ones, derived by hand.

    A mask is M[l] = sum_c a_c(l) B_c with B_c ~ Bernoulli(p) i.i.d. and interpolation weights a_c(l)
    (summing to 1 over c), so E[M[u] M[l]] = p^2 + p (1 - p) sum_c a_c(u) a_c(l), and the map
    E[f(I * M) M[l]] / p = E[M[u] M[l]] / p = p + (1 - p) E_shift[sum_c a_c(u) a_c(l)]; the shift is uniform
    over the ceil(H / s)^2 offsets. a_c is the upsampled one-hot grid of cell c (numpy here).
    """
    cell = -(-h // cells)
    onehots = np.eye(cells * cells).reshape(cells * cells, cells, cells)
    up = _np_linear_upsample(onehots, (cells + 1) * cell)  # (cells^2, U, U)
    acc = np.zeros((h, h))
    for dy in range(cell):
        for dx in range(cell):
            a = up[:, dy : dy + h, dx : dx + h]  # (cells^2, h, h)
            acc += np.einsum("c,chw->hw", a[:, pixel[0], pixel[1]], a)
    return keep + (1 - keep) * acc / cell**2


def test_rise_of_a_one_pixel_model_converges_to_the_map_derived_by_hand():
    h, cells, keep, pixel = 12, 3, 0.4, (5, 2)
    expected = _expected_one_pixel_map(h, cells, keep, pixel)
    x, cls = jnp.ones((1, h, h, 3)), jnp.zeros(1, jnp.int32)
    score = lambda images: images[:, pixel[0], pixel[1], :1]  # noqa: E731  (M, K=1)
    rms = {}
    for n in (100, 1600, 25600):
        errors = []
        for seed in range(8 if n < 25600 else 1):
            masks = pt.rise_masks(jax.random.key(seed), n, h, h, cells, keep)
            got = np.asarray(pt.rise_map(score, x, cls, masks, keep, chunk=100))[0]
            # f(I * M) M[l] / p lies in [0, 1 / p]: the Monte-Carlo mean's std is at most 1 / (2 p sqrt(N)).
            assert np.abs(got - expected).max() < 4 / (2 * keep * np.sqrt(n))
            errors.append(np.mean((got - expected) ** 2))
        rms[n] = np.sqrt(np.mean(errors))
    # The error falls as 1 / sqrt(N): by 4 for 16 times the masks (over 8 keys each).
    assert 2.5 < rms[100] / rms[1600] < 6.5
    assert rms[25600] < 0.01


def _tiny_vgg(k=3, size=16, seed=0):
    model, variables = random_variables(TINY, size, k, seed=seed)
    x = jax.random.normal(jax.random.key(seed + 10), (4, size, size, 3))
    return model, variables, x


def test_rise_map_does_not_depend_on_the_batch_or_the_devices():
    model, v, x = _tiny_vgg()
    fn = jax.jit(map_fn("rise", model, MethodOptions(rise_masks=100, rise_chunk=25)))
    cls = jnp.asarray([0, 2, 1, 2], jnp.int32)
    batch = np.asarray(fn(v, x, cls, jnp.arange(4)))
    alone = np.asarray(fn(v, x[2:3], cls[2:3], jnp.arange(1)))
    np.testing.assert_allclose(batch[2], alone[0], rtol=1e-5, atol=1e-6)
    # The probability read at the pixels RISE keeps, to the map: the full map of a class it scores high is
    # not the map of another class.
    assert not np.allclose(batch[1], np.asarray(fn(v, x[1:2], cls[:1], jnp.arange(1)))[0])

    # The localisation evaluator splits pairs over the 8-device mesh: the same maps as on one device.
    k, size = 3, 16
    masks = np.zeros((2, size, size), np.uint8)
    masks[0, 2:9, 3:12], masks[1, 8:15, 1:7], masks[1, 0:4, 0:16] = 1, 3, 2
    images = np.random.default_rng(1).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    sizes = np.full((2, 2), size, np.int32)
    seg = HostCache(images, sizes, sizes, np.zeros((2, k), np.uint8), None, ["a", "b"])
    pairs = np.array([[0, 0], [1, 1], [1, 2]])
    keep = np.ones(3, bool)
    f = map_fn("rise", model, MethodOptions(rise_masks=100, rise_chunk=25))
    _, maps8 = PairMaps(f, data_mesh(), size, k, batch_size=8).run(v, seg, masks, pairs, keep)
    _, maps1 = PairMaps(f, data_mesh(jax.devices()[:1]), size, k, batch_size=2).run(
        v, seg, masks, pairs, keep
    )
    np.testing.assert_allclose(maps8, maps1, rtol=1e-5, atol=1e-6)


def test_occlusion_corners_cover_every_pixel():
    assert pt.occlusion_corners(32, 8, 8) == [0, 8, 16, 24]
    assert pt.occlusion_corners(30, 8, 6) == [0, 6, 12, 18, 22]
    assert pt.occlusion_corners(5, 5, 3) == [0]
    with pytest.raises(ConfigError, match="does not fit 5 pixels; choose an occlusion_size of at most"):
        pt.occlusion_corners(5, 6, 1)


def _np_occlusion(score, x, cls, size, stride, baseline):
    """Zeiler and Fergus's occlusion by brute force: every patch position, one image at a time."""
    b, h, w, _ = x.shape
    out = np.zeros((b, h, w))
    count = np.zeros((h, w))
    rows = sorted(set(range(0, h - size + 1, stride)) | {h - size})
    cols = sorted(set(range(0, w - size + 1, stride)) | {w - size})
    for r in rows:
        for c in cols:
            count[r : r + size, c : c + size] += 1
            for i in range(b):
                occluded = x[i].copy()
                occluded[r : r + size, c : c + size] = baseline
                drop = score(x[i][None])[0, cls[i]] - score(occluded[None])[0, cls[i]]
                out[i, r : r + size, c : c + size] += drop
    return out / count


def test_occlusion_equals_brute_force_on_a_tiny_net():
    rng = np.random.default_rng(3)
    h, k = 10, 4
    w1, w2 = rng.normal(0, 0.2, (h * h * 3, 16)), rng.normal(0, 0.5, (16, k))

    def np_score(images):  # float64: a two-layer net's probabilities
        z = np.maximum(images.reshape(len(images), -1) @ w1, 0) @ w2
        return 1 / (1 + np.exp(-z))

    def jax_score(images):
        z = jax.nn.relu(images.reshape(images.shape[0], -1) @ jnp.asarray(w1, jnp.float32)) @ jnp.asarray(
            w2, jnp.float32
        )
        return jax.nn.sigmoid(z)

    x = rng.normal(0, 1, (3, h, h, 3))
    cls = np.array([0, 3, 1])
    for size, stride, baseline in ((4, 3, 0.0), (3, 3, -0.5)):
        got = pt.occlusion_map(
            jax_score, jnp.asarray(x, jnp.float32), jnp.asarray(cls), size, stride, baseline
        )
        want = _np_occlusion(np_score, x, cls, size, stride, baseline)
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)


def test_occlusion_and_rise_in_the_registry_read_the_models_probabilities():
    model, v, x = _tiny_vgg()
    assert {"rise", "occlusion"} <= set(attribution_methods())
    assert method_label("rise") == "RISE" and method_label("occlusion") == "Occlusion"
    cls = jnp.asarray([1, 0, 2, 1], jnp.int32)
    got = np.asarray(jax.jit(map_fn("occlusion", model))(v, x, cls, jnp.arange(4)))  # default: 2 px patch
    probabilities = jax.jit(lambda images: jax.nn.sigmoid(model.apply(v, images)))
    want = _np_occlusion(lambda im: np.asarray(probabilities(jnp.asarray(im, jnp.float32)), np.float64),
                         np.asarray(x, np.float64), np.asarray(cls), 2, 1, 0.0)  # fmt: skip
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_method_options_are_converted_and_checked():
    o = method_options({"rise_masks": "200", "rise_keep": "0.5", "occlusion_size": "none"}, ig_steps=4)
    assert (o.rise_masks, o.rise_keep, o.occlusion_size, o.ig_steps) == (200, 0.5, None, 4)
    for bad, match in (
        ({"rise_mask": 10}, "unknown attribution method option 'rise_mask'"),
        ({"rise_masks": 1000, "rise_chunk": 30}, "does not split into chunks"),
        ({"rise_keep": 0.0}, "keep probability"),
        ({"occlusion_size": 0}, "must be at least 1"),
        ({"rise_cells": "many"}, "is not a number"),
    ):
        with pytest.raises(ConfigError, match=match):
            method_options(bad)


def test_eval_py_writes_rise_and_occlusion_maps_of_a_run(teacher_dir, tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "report"

    def eval_py(*options):
        command = [sys.executable, str(root / "eval.py"), f"--workdir={teacher_dir}", f"--out={out}",
                   "--methods=rise,occlusion", "--figure_images=0", "--batch_size=8", *options]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, cwd=root, timeout=300)

    bad = eval_py("--method_options=rise_masks=50,rise_chunk=20")
    assert bad.returncode != 0 and "rise_masks=50 does not split into chunks of rise_chunk=20" in bad.stderr
    assert not out.exists()
    done = eval_py("--method_options=rise_masks=50,rise_chunk=25,occlusion_size=8", "--faithfulness",
                   "--faithfulness_steps=2", "--faithfulness_regions=2")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    saved = json.loads((out / "localization.json").read_text())
    assert saved["method_options"]["rise_masks"] == 50 and saved["method_options"]["occlusion_size"] == 8
    methods = saved["runs"][teacher_dir.name]["methods"]
    for m in ("rise", "occlusion"):
        assert (
            0.0 <= methods[m]["AUC"] <= 1.0
            and methods[m]["pairs"] == saved["runs"][teacher_dir.name]["pairs"]
        )
    assert "RISE" in done.stdout and "Occlusion" in done.stdout
    # --faithfulness: each method's deletion and insertion AUC, in the JSON and the Markdown table.
    assert saved["faithfulness"] == {"steps": 2, "regions": 2}
    assert all(0.0 <= methods[m][k] <= 1.0 for m in methods for k in ("deletion_auc", "insertion_auc"))
    assert all(-1.0 <= methods[m]["morf_aopc"] <= 1.0 for m in methods)
    assert "| deletion AUC | insertion AUC |" in (out / "localization.md").read_text()
