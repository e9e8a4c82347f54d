"""The evaluators: the sharded localisation against one device and the host metrics, SmoothGrad's noise
per example, config.evals during training, and the registry's one-sentence error."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from apjax import evaluators
from apjax import localization as loc
from apjax.attribution.maps import upsample_map
from apjax.attribution.methods import MethodOptions, attribution_fn, map_fn
from apjax.data.augment import eval_preprocess
from apjax.data.pipeline import data_mesh
from apjax.errors import ConfigError
from apjax.evaluators.context import EvalContext, load_run
from apjax.evaluators.pairs import PairMaps
from apjax.models import create_model, init_variables
from apjax.tasks import train_and_evaluate, validate_config
from tests.test_train import tiny_config


def test_sharded_pairs_equal_one_device_and_the_host_metrics(teacher_dir):
    run = load_run(teacher_dir)
    ctx = EvalContext(run.config, run.model, data_mesh())
    assert ctx.mesh.devices.size == 8
    seg, masks, k, size = (
        ctx.cache("segmentation_val"),
        ctx.masks("segmentation_val"),
        ctx.num_classes,
        ctx.image_size,
    )
    # Every (image, class) with the class in the mask: more pairs than a batch, not a multiple of 8.
    pairs = np.argwhere(np.stack([np.isin(np.arange(1, k + 1), m) for m in masks]))
    assert len(pairs) > 8 and len(pairs) % 8
    keep = np.ones(len(pairs), bool)
    one = data_mesh(jax.devices()[:1])
    fn = map_fn("gradcam", run.model)
    sharded, maps8 = PairMaps(fn, ctx.mesh, size, k, batch_size=12).run(
        run.variables, seg, masks, pairs, keep
    )
    single, maps1 = PairMaps(fn, one, size, k, batch_size=5).run(run.variables, seg, masks, pairs, keep)
    # Other per-device batches round the maps differently (float32), which can move near-ties of the AUC.
    np.testing.assert_allclose(maps8, maps1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sharded["auc"], single["auc"], rtol=0, atol=2e-4)
    # On the same maps the device's scores are the host metrics' (apjax.localization, numpy), exactly.
    for scores, maps in ((sharded, maps8), (single, maps1)):
        host = loc.pair_scores(maps, masks, pairs)
        np.testing.assert_array_equal(scores["auc"], host["auc"])
        for key in ("hit", "hit_ref_cumulative", "constant"):
            np.testing.assert_array_equal(scores[key], host[key], err_msg=key)
            np.testing.assert_array_equal(sharded[key], single[key], err_msg=key)
    # The mask metrics of each pair, from their definitions in float64 on the maps that came back.
    from tests.test_mask_metrics import _numpy_metrics

    for p, (image, cls) in enumerate(pairs[:6]):
        want = _numpy_metrics(maps8[p], masks[image] == cls + 1)
        for key, value in want.items():
            np.testing.assert_allclose(sharded[key][p], value, rtol=1e-5, atol=1e-6, err_msg=key)
    # The maps are the single-device attribution function's, resized.
    idx = pairs[:4, 0]
    x = eval_preprocess(jnp.asarray(seg.images[idx]), jnp.asarray(seg.extents[idx]), out_size=size)
    want = upsample_map(
        attribution_fn("gradcam", run.model, run.variables)(x, jnp.asarray(pairs[:4, 1])), size
    )
    np.testing.assert_allclose(maps8[:4], np.asarray(want), rtol=1e-5, atol=1e-6)
    # SmoothGrad draws each pair's noise from its id: the same on one device and split over eight (its
    # gradients at noisy inputs can cross ReLU kinks under other roundings: a looser tolerance).
    sg = map_fn("smoothgrad", run.model, MethodOptions(smoothgrad_samples=2))
    sub = pairs[:6]
    _, sg8 = PairMaps(sg, ctx.mesh, size, k, batch_size=8).run(run.variables, seg, masks, sub, keep[:6])
    _, sg1 = PairMaps(sg, one, size, k, batch_size=8).run(run.variables, seg, masks, sub, keep[:6])
    np.testing.assert_allclose(sg8, sg1, rtol=0, atol=0.03 * np.abs(sg1).max())


def test_smoothgrad_noise_follows_the_example_not_the_batch():
    model = create_model((2, "M", 3, "M"), 3)
    variables = init_variables(model, jax.random.key(0), 8)
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
    cls = jnp.asarray([0, 2, 1])
    fn = attribution_fn("smoothgrad", model, variables, smoothgrad_samples=2)
    full = np.asarray(fn(x, cls, jnp.asarray([10, 11, 12])))
    # The same examples in another batch (size, order): the same maps.
    part = np.asarray(fn(x[jnp.asarray([2, 0])], cls[jnp.asarray([2, 0])], jnp.asarray([12, 10])))
    np.testing.assert_allclose(part, full[[2, 0]], rtol=1e-6)
    one = np.asarray(fn(x[1:2], cls[1:2], jnp.asarray([11])))
    np.testing.assert_allclose(one, full[1:2], rtol=1e-6)
    # Two identical images (same class) in one batch draw different noise, by id or by position.
    twin = jnp.stack([x[0], x[0]])
    for maps in (fn(twin, cls[:1].repeat(2), jnp.asarray([3, 4])), fn(twin, cls[:1].repeat(2))):
        assert np.abs(np.asarray(maps[0]) - np.asarray(maps[1])).max() > 1e-6


def test_config_evals_run_at_each_evaluation_of_a_tiny_run(teacher_dir, tmp_path):
    c = tiny_config(teacher_dir.parent / "data", num_epochs=1, lr_decay_epochs=())
    c.evals = ml_collections.ConfigDict(
        {"loc": {"type": "localization", "methods": ("gradcam",), "batch_size": 8}}
    )
    final = train_and_evaluate(c, tmp_path / "run")
    assert 0.0 <= final["loc/gradcam/AUC"] <= 1.0 and final["loc/gradcam/pairs"] >= 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val/loc/gradcam/Point" in r for r in rows) and any("val/mAP" in r for r in rows)


def test_unknown_evaluator_is_one_sentence(tmp_path):
    c = tiny_config(tmp_path / "data")
    c.evals = ml_collections.ConfigDict({"locaization": {}})
    with pytest.raises(ConfigError) as e:
        validate_config(c)
    msg = str(e.value)
    assert msg == (
        "config.evals.locaization names no evaluator 'locaization'; "
        "choose one of ['classification', 'localization', 'similarity', 'faithfulness']."
    )
    with pytest.raises(ConfigError, match=r"^unknown evaluator 'nope'; choose one of \['classification'"):
        evaluators.create("nope", None)
