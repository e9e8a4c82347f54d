"""Pruning: exact global magnitude masks, weights that stay zero, L1 filter choice, surgery, both tasks."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apjax.compress import structured, unstructured
from apjax.evaluation import evaluate_workdir, load_run
from apjax.models import conv_names, count_params, create_model, init_variables, variant_widths
from apjax.tasks import train_and_evaluate, validate_config
from apjax.trainer.optim import create_learning_rate_fn, create_optimizer
from apjax.trainer.state import TrainState, apply_gradients, mask_params
from configs import prune_structured, prune_unstructured
from tests.test_train import tiny_config


def random_variables(widths, image_size, num_classes, seed=0):
    """Variables of ``create_model(widths)`` with every leaf random (BN statistics included)."""
    model = create_model(widths, num_classes=num_classes, dropout_rate=0.0)
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), image_size))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "var" in name:
            return rng.uniform(0.5, 2.0, s.shape).astype(np.float32)
        if "scale" in name:
            return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
        return rng.normal(0, 0.3, s.shape).astype(np.float32)

    return model, jax.tree_util.tree_map_with_path(fill, shapes)


# ------------------------------------------------------------------------------------------------
# Unstructured.
# ------------------------------------------------------------------------------------------------


def test_global_magnitude_masks_prune_an_exact_count_with_one_threshold():
    _, v = random_variables(variant_widths("vgg16/8"), 32, 5)
    params = v["params"]
    n = sum(params[c]["kernel"].size for c in conv_names(variant_widths("vgg16/8")))
    previous = None
    for r in (1, 2, 3):
        sparsity = 1 - 0.8**r
        masks = unstructured.global_magnitude_masks(params, sparsity, previous)
        pruned = np.concatenate([~np.asarray(m).ravel() for m in masks.values()])
        assert pruned.sum() == round(sparsity * n)
        mags = np.concatenate([np.abs(params[c]["kernel"]).ravel() for c in masks])
        # One threshold over all layers: every pruned weight is no larger than every kept one.
        assert mags[pruned].max() <= mags[~pruned].min()
        if previous is not None:  # masks only grow sparser
            assert all(np.all(np.asarray(masks[c]) <= np.asarray(previous[c])) for c in masks)
        previous = masks
    assert set(masks) == set(conv_names(variant_widths("vgg16/8")))  # Dense and BN are never masked
    masked = mask_params(params, masks)
    for name, p in params.items():
        for leaf, value in p.items():
            if name in masks and leaf == "kernel":
                np.testing.assert_array_equal(np.asarray(masked[name][leaf]), np.where(masks[name], value, 0))
            else:
                np.testing.assert_array_equal(np.asarray(masked[name][leaf]), value)


def test_global_magnitude_masks_count_is_exact_with_tied_magnitudes():
    params = {
        "conv1_1": {"kernel": np.ones((3, 3, 1, 2), np.float32)},
        "conv1_2": {"kernel": -np.ones((3, 3, 2, 1), np.float32)},
    }
    masks = unstructured.global_magnitude_masks(params, 0.5)
    assert sum(int((~np.asarray(m)).sum()) for m in masks.values()) == round(0.5 * 36)


def test_masked_updates_keep_pruned_weights_exactly_zero():
    c = tiny_config("/unused")
    c.optimizer.update(momentum=0.9, weight_decay=0.1)
    _, v = random_variables(variant_widths("vgg16/8"), 32, 5)
    masks = unstructured.global_magnitude_masks(v["params"], 0.5)
    params = mask_params(jax.tree.map(jnp.asarray, v["params"]), masks)
    tx = create_optimizer(c, create_learning_rate_fn(c, 1))
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=v["batch_stats"],
        opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(0)), masks=masks,
    )  # fmt: skip
    for i in range(3):
        grads = jax.tree.map(lambda p, i=i: jnp.full_like(p, 1.0 + i), state.params)  # dense gradients
        state = apply_gradients(state, tx, grads, state.batch_stats)
    for name, m in masks.items():
        k = np.asarray(state.params[name]["kernel"])
        assert np.all(k[~np.asarray(m)] == 0.0)
        assert np.all(k[np.asarray(m)] != np.asarray(params[name]["kernel"])[np.asarray(m)])  # kept ones move
    assert not np.array_equal(np.asarray(state.params["head"]["kernel"]), v["params"]["head"]["kernel"])


def small_prune_config(module, teacher_dir, method, **overrides):
    c = module.get_config(f"data=synthetic,small,method={method}")
    t = tiny_config(teacher_dir.parent / "data")
    c.data, c.model, c.batch_size = t.data, t.model, 16
    c.dropout_rate = 0.0
    c.num_epochs, c.log_every_steps = 1, 2
    c.distill.teacher_workdir = str(teacher_dir)
    c.distill.taps = ("conv4_3",)
    for k, v in overrides.items():
        c[k] = v
    return c


def test_unstructured_rounds_prune_exactly_keep_zeros_and_resume(teacher_dir, tmp_path, capsys):
    c = small_prune_config(prune_unstructured, teacher_dir, "naive")  # matching: the structured test
    c.prune.rounds, c.prune.rate = 2, 0.2
    c.data.on_device = True  # the rounds share one device-resident copy of the split (the same batches)
    workdir = tmp_path / "prune_u"
    train_and_evaluate(c, workdir)
    teacher = load_run(teacher_dir)
    n = sum(teacher.variables["params"][k]["kernel"].size for k in conv_names(variant_widths(c.model)))
    summary = json.loads((workdir / "final_metrics.json").read_text())
    convs = conv_names(variant_widths(c.model))
    for r in (1, 2):
        rdir = workdir / f"round_{r:02d}"
        params = load_run(rdir, "latest").variables["params"]
        zeros = sum(int(np.sum(np.asarray(params[k]["kernel"]) == 0)) for k in convs)
        assert zeros == round((1 - 0.8**r) * n)  # exact, after a round of training steps
        assert summary["rounds"][r - 1]["conv_weights_zero"] == zeros
        assert json.loads((rdir / "final_metrics.json").read_text())["conv_weights_zero"] == zeros
        for name, p in params.items():  # Dense and BN: no weight pruned, all trained
            if name not in convs:
                leaf = "kernel" if name == "head" else "scale"
                assert all(np.all(np.asarray(x) != 0) for x in p.values())
                assert not np.array_equal(np.asarray(p[leaf]), teacher.variables["params"][name][leaf])
    assert summary["params_total"] == count_params(teacher.variables["params"])
    assert summary["params_nonzero"] == summary["params_total"] - summary["conv_weights_zero"]
    # eval.py's path: the workdir resolves to its last round.
    m = evaluate_workdir(workdir, "latest")
    assert m["mAP"] == pytest.approx(summary["rounds"][1]["val"]["mAP"], abs=1e-6)
    # Rerunning skips the finished rounds and trains nothing.
    before = (workdir / "round_02" / "metrics.jsonl").read_text()
    capsys.readouterr()
    train_and_evaluate(c, workdir)
    assert "Round 1 is finished" in capsys.readouterr().out
    assert (workdir / "round_02" / "metrics.jsonl").read_text() == before


# ------------------------------------------------------------------------------------------------
# Structured.
# ------------------------------------------------------------------------------------------------


def test_l1_filter_keep_drops_the_smallest_l1_filters():
    kernel = np.zeros((3, 3, 2, 10), np.float32)
    norms = np.array([5.0, 1.0, 7.0, 0.5, 3.0, 9.0, 2.0, 8.0, 4.0, 6.0])
    kernel[0, 0, 0, :] = norms * np.array([1, -1] * 5)  # signs do not matter: L1 norm
    params = {"conv1_1": {"kernel": kernel}}
    keep = structured.l1_filter_keep(params, (10,), (0.35,))  # int(10 * 0.65) = 6 kept, 4 dropped
    np.testing.assert_array_equal(keep["conv1_1"], [0, 2, 5, 7, 8, 9])  # norms 0.5, 1, 2, 3 dropped


def test_p07_gives_the_papers_parameter_count():
    widths = variant_widths("vgg16")
    _, v = random_variables(widths, 227, 20)
    keep = structured.l1_filter_keep(v["params"], widths, structured.layer_ratios(widths, 0.7))
    new_widths, pruned = structured.surgery(v, widths, keep)
    # The reference keeps int(C * (1 - 0.7)) filters; 1 - 0.7 is 0.30000000000000004 in floating point,
    # so 64 -> 19 (19.2) and 512 -> 153 (153.6).
    assert new_widths == (19, 64, "M", 128, 128, "M", 256, 256, 256, "M", *[153] * 3, "M", *[153] * 3, "M")
    # The count by hand: conv 9 * C_in * C_out + C_out (bias) + 2 * C_out (BN scale and bias), then the head
    # (153 * 7 * 7 inputs, 20 outputs, with bias).
    by_hand = [
        (9 * 3 * 19 + 19) + 2 * 19,  # conv1_1: 570
        (9 * 19 * 64 + 64) + 2 * 64,  # conv1_2: 11,136
        (9 * 64 * 128 + 128) + 2 * 128,  # 74,112
        (9 * 128 * 128 + 128) + 2 * 128,  # 147,840
        (9 * 128 * 256 + 256) + 2 * 256,  # 295,680
        2 * ((9 * 256 * 256 + 256) + 2 * 256),  # 2 x 590,592
        (9 * 256 * 153 + 153) + 2 * 153,  # conv4_1: 352,971
        5 * ((9 * 153 * 153 + 153) + 2 * 153),  # conv4_2 .. conv5_3: 5 x 211,140
        153 * 7 * 7 * 20 + 20,  # head: 149,960
    ]
    assert sum(by_hand) == 3_269_153  # the paper's 3.27M
    assert count_params(pruned["params"]) == 3_269_153
    # The surgery output has exactly the shapes of a fresh net of the new widths.
    fresh = jax.eval_shape(lambda: init_variables(create_model(new_widths), jax.random.key(0), 227))
    assert jax.tree.map(np.shape, pruned) == jax.tree.map(lambda s: s.shape, fresh)


def zero_pruned_channels(variables, widths, keep):
    """The original net with each pruned channel's output forced to zero after its ReLU (eval mode):
    its conv kernel column and bias, BN bias and running mean zeroed, so BN maps 0 to 0 and ReLU keeps 0."""
    v = jax.tree.map(np.array, variables)
    for name in conv_names(widths):
        dropped = np.setdiff1d(np.arange(v["params"][name]["kernel"].shape[-1]), keep[name])
        v["params"][name]["kernel"][..., dropped] = 0
        v["params"][name]["bias"][dropped] = 0
        v["params"][f"{name}_bn"]["bias"][dropped] = 0
        v["batch_stats"][f"{name}_bn"]["mean"][dropped] = 0
    return v


def test_surgery_computes_the_original_with_pruned_channels_zeroed():
    widths = (6, "M", 8, 7, "M", 9, "M", 10, "M", 12, "M")
    image_size = 64  # a 2x2 last map: the head's rows must follow each kept channel to all 4 positions
    model, v = random_variables(widths, image_size, 5, seed=1)
    ratios = (0.5, 0.3, 0.0, 0.4, 0.5, 0.6)
    keep = structured.l1_filter_keep(v["params"], widths, ratios)
    new_widths, pruned = structured.surgery(v, widths, keep)
    # Kept int(C * (1 - p)): 6 * 0.5 = 3, 8 * 0.7 = 5.6, 7, 9 * 0.6 = 5.4, 10 * 0.5 = 5, 12 * 0.4 = 4.8.
    assert new_widths == (3, "M", 5, 7, "M", 5, "M", 5, "M", 4, "M")
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, image_size, image_size, 3)), jnp.float32)
    small = create_model(new_widths, num_classes=5, dropout_rate=0.0)
    got = small.apply(jax.tree.map(jnp.asarray, pruned), x)
    expected = model.apply(jax.tree.map(jnp.asarray, zero_pruned_channels(v, widths, keep)), x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
    assert np.std(np.asarray(expected)) > 1e-2  # a non-trivial function
    # Row order matters: NHWC flattens (H, W, C), so each kept channel keeps one row per position (the
    # mask tiled). Expanding each channel to a contiguous block, right for torchvision's (C, H, W) order,
    # computes another function here.
    last = conv_names(widths)[-1]
    mask = np.zeros(12, bool)
    mask[keep[last]] = True
    head = v["params"]["head"]["kernel"]
    np.testing.assert_array_equal(pruned["params"]["head"]["kernel"], head[np.tile(mask, 4)])
    wrong = dict(pruned["params"], head={**pruned["params"]["head"], "kernel": head[np.repeat(mask, 4)]})
    bad = small.apply({"params": wrong, "batch_stats": pruned["batch_stats"]}, x)
    assert np.max(np.abs(np.asarray(bad) - np.asarray(expected))) > 1e-2


def test_structured_task_trains_the_smaller_net_and_eval_loads_it(teacher_dir, tmp_path):
    c = small_prune_config(prune_structured, teacher_dir, "sswa")
    workdir = tmp_path / "prune_s"
    final = train_and_evaluate(c, workdir)
    info = json.loads((workdir / "model.json").read_text())
    widths = variant_widths(c.model)
    ratios = structured.layer_ratios(widths, 0.7)
    # The teacher is a VGG16/8 (8, 8, 16, 16, 32 x 3, 64 x 6); conv1_1 and conv4_1..conv5_3 keep
    # int(C * 0.3): 8 -> 2 (2.4), 64 -> 19 (19.2).
    kept = [2, 8, 16, 16, 32, 32, 32, 19, 19, 19, 19, 19, 19]
    assert [w for w in widths if w != "M"][:2] == [8, 8] and ratios[0] == 0.7
    assert [int(x) for x in info["model"].split(",") if x != "M"] == kept
    summary = json.loads((workdir / "final_metrics.json").read_text())
    assert summary["params_total"] == info["params"] < info["teacher_params"]
    m = evaluate_workdir(workdir, "latest")
    assert m["mAP"] == pytest.approx(final["mAP"], abs=1e-6)


def test_pruning_config_errors(teacher_dir):
    c = small_prune_config(prune_structured, teacher_dir, "kd")
    with pytest.raises(ValueError, match="unknown method 'kd'; choose one of"):
        validate_config(c)
    c = small_prune_config(prune_structured, teacher_dir, "naive")
    c.prune.pattern = (1, 0)
    with pytest.raises(ValueError, match="one 0 or 1 per conv"):
        validate_config(c)
    c = small_prune_config(prune_unstructured, teacher_dir, "naive")
    c.prune.rate = 1.0
    with pytest.raises(ValueError, match=r"config.prune.rate must be in \(0, 1\)"):
        validate_config(c)
    c = small_prune_config(prune_unstructured, teacher_dir, "naive")
    c.model = "vgg16/4"
    with pytest.raises(ValueError, match="is not the teacher's model"):
        train_and_evaluate(c, teacher_dir.parent / "wrong_model")
