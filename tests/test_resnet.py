"""The ResNet family: torchvision's parameter counts, tap shapes, weight import against an independent float64
forward, tap gradients against finite differences, and the distillation loss on ResNets."""

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from apjax.attribution import gradcam_map
from apjax.compress import distill
from apjax.models import apply_with_taps, count_params, init_variables, tap_gradients, tap_shapes
from apjax.models.resnet import create_resnet, import_torchvision_resnet
from apjax.models.torch_import import load_state_dict
from tests.resnet_reference import reference_resnet_logits, torchvision_resnet_state_dict

DATA = Path(__file__).resolve().parent / "data"


@pytest.mark.parametrize(
    "name, torchvision_count",
    [("resnet18", 11_689_512), ("resnet50", 25_557_032)],  # torchvision's published counts (1000 classes)
)
def test_parameter_counts_are_torchvisions(name, torchvision_count):
    def count(num_classes):
        m = create_resnet(name, num_classes=num_classes)
        return count_params(jax.eval_shape(lambda: init_variables(m, jax.random.key(0), 64))["params"])

    assert count(1000) == torchvision_count
    fc_in = 512 if name == "resnet18" else 2048
    # A 20-way head instead of 1000: the fc loses 980 rows of fc_in weights and 980 biases.
    assert count(20) == torchvision_count - 980 * fc_in - 980


def test_tap_shapes_at_224_and_students():
    m = create_resnet("resnet50/4")
    v = jax.eval_shape(lambda: init_variables(m, jax.random.key(0), 224))
    acts = tap_shapes(m, v, jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    # Widths 64/4 = 16 in the stem; bottleneck outputs 4 x (64, 128, 256, 512) / 4.
    expected = {
        "stem": (2, 56, 56, 16),
        "layer1": (2, 56, 56, 64),
        "layer2": (2, 28, 28, 128),
        "layer3": (2, 14, 14, 256),
        "layer4": (2, 7, 7, 512),
        "pool": (2, 1, 1, 512),
    }
    assert {k: a.shape for k, a in acts.items()} == expected
    with pytest.raises(ValueError, match="unknown ResNet 'resnet34'"):
        create_resnet("resnet34")
    with pytest.raises(ValueError, match="unknown taps \\['conv5_3'\\]"):
        apply_with_taps(
            m, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), v), jnp.zeros((1, 64, 64, 3)), ("conv5_3",)
        )


@pytest.mark.parametrize("depth", [18, 50])
def test_import_reproduces_the_float64_torch_layout_forward(depth):
    sd = torchvision_resnet_state_dict(depth, 16, 5, seed=depth)
    model = create_resnet(f"resnet{depth}/16", num_classes=5)
    variables = import_torchvision_resnet(
        sd, init_variables(model, jax.random.key(0), 40), model, head_prefix="fc"
    )
    x = np.random.default_rng(1).normal(size=(2, 40, 40, 3)).astype(np.float32)
    got = model.apply(variables, jnp.asarray(x))
    expected = reference_resnet_logits(sd, depth, x.transpose(0, 3, 1, 2))
    assert np.std(expected) > 0.1  # a non-trivial function of the input
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


def test_import_from_a_torch_written_pth_keeps_the_new_head():
    """tests/data/resnet18_32.pth was written by torch.save (see make_resnet_fixture.py) from the same
    seeded builder: read without torch, its tensors are the builder's, and the backbone imports."""
    sd = load_state_dict(str(DATA / "resnet18_32.pth"))
    expected = torchvision_resnet_state_dict(18, 32, 5, seed=11)
    assert list(sd) == list(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(sd[k], v, err_msg=k)
    model = create_resnet("resnet18/32", num_classes=7)  # another head: it stays new
    fresh = init_variables(model, jax.random.key(3), 32)
    variables = import_torchvision_resnet(sd, fresh, model)
    np.testing.assert_array_equal(variables["params"]["head"]["kernel"], fresh["params"]["head"]["kernel"])
    np.testing.assert_array_equal(
        variables["params"]["layer2_0"]["downsample"]["conv"]["kernel"],
        sd["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(variables["batch_stats"]["stem"]["bn"]["var"], sd["bn1.running_var"])
    with pytest.raises(ValueError, match=r"'conv1.weight' has shape \(2, 3, 7, 7\) but the model expects"):
        wider = create_resnet("resnet18/16")
        import_torchvision_resnet(sd, init_variables(wider, jax.random.key(0), 32), wider)


def test_tap_gradient_at_a_stage_matches_central_differences_float64():
    with jax.enable_x64(True):
        model = create_resnet("resnet18/16", num_classes=4, dtype=jnp.float64)
        sd = torchvision_resnet_state_dict(18, 16, 4, seed=5)
        variables = import_torchvision_resnet(sd, init_variables(model, jax.random.key(0), 32), model, "fc")
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        rng = np.random.default_rng(2)
        x = jnp.asarray(rng.normal(size=(2, 32, 32, 3)))
        seed = jnp.asarray(rng.normal(size=(2, 4)))
        tap = "layer3"
        _, acts, grads, _ = tap_gradients(model, variables, x, seed, [tap])
        g = np.asarray(grads[tap])
        assert np.count_nonzero(g) > g.size // 4

        logits_at = jax.jit(
            lambda offset: apply_with_taps(model, variables, x, (), perturbations={tap: offset})[0]
        )

        def score(offset):
            return float(jnp.sum(logits_at(offset) * seed))

        eps, zero = 1e-6, np.zeros(acts[tap].shape)
        for idx in [tuple(i) for i in np.argwhere(np.abs(g) > 1e-3)[:: max(1, np.count_nonzero(g) // 6)]][:6]:
            e = zero.copy()
            e[idx] = eps
            fd = (score(jnp.asarray(e)) - score(jnp.asarray(-e))) / (2 * eps)
            np.testing.assert_allclose(float(g[idx]), fd, rtol=1e-6, atol=1e-9)
        assert gradcam_map(acts[tap], grads[tap]).shape == (2, 2, 2)


@pytest.mark.parametrize("method", ["ewa", "sswa"])  # activations only; tap gradients, second order, masks
def test_distill_loss_runs_on_a_resnet_teacher_and_student(method):
    """The distillation loss is model-agnostic: a ResNet-18/16 teacher and a ResNet-18/32 student, matched
    at layer3 (2x2 at 32 px), give a finite loss and a finite, non-zero student gradient."""
    teacher = create_resnet("resnet18/16", num_classes=5)
    student = create_resnet("resnet18/32", num_classes=5)
    tv = init_variables(teacher, jax.random.key(0), 32)
    sv = init_variables(student, jax.random.key(1), 32)
    d = ml_collections.ConfigDict(
        dict(method=method, taps=("layer3",), beta=10.0, matching_form="squared_mean",
             sswa_mode="fixed_count", sswa_drop=0.3, temperature=4.0, alpha=0.9, kd_log_eps=1e-7)
    )  # fmt: skip
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(np.eye(5)[[0, 1, 2, 3]], jnp.float32)

    def loss(p):
        return distill.distill_loss(p, student, sv["batch_stats"], teacher, tv, x, labels, d,
                                    jax.random.key(2), jax.random.key(3))  # fmt: skip

    (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(sv["params"])
    assert np.isfinite(float(value))
    assert (float(aux["parts"]["match"]) > 0) == (method != "kd")
    leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(g).all() for g in leaves) and any(np.abs(g).max() > 0 for g in leaves)
    if method == "sswa":
        assert int((np.asarray(aux["teacher_masks"]["layer3"]) == 0).sum()) == int(16 * 0.3)  # 256/16 = 16


def test_resnet_through_the_tasks_prune_and_localization(tmp_path):
    """The second family through the same tasks and configs: a ResNet-18/16 teacher (one epoch on tiny
    synthetic data at 64 px), an EWA student at ``layer4`` (SSWA's second order: the loss test above), the
    localisation report (Grad-CAM at ``layer4``); unstructured pruning's masks over every conv kernel of the
    nested tree (count checked against the torchvision layout's conv weights); structured pruning refused in
    one sentence."""
    from apjax.compress.unstructured import global_magnitude_masks
    from apjax.evaluation import load_run, localization_report
    from apjax.tasks import train_and_evaluate, validate_config
    from apjax.trainer.state import mask_params
    from configs import prune_structured, prune_unstructured, resnet_kd
    from tests.test_train import tiny_config

    teacher = tmp_path / "teacher"
    t = tiny_config(
        tmp_path / "data", num_epochs=1, lr_decay_epochs=(), model="resnet18/16", dropout_rate=0.0
    )
    t.data.image_size, t.data.cache_size, t.data.synthetic.image_size = 64, 0, 72  # layer4 is 2x2
    train_and_evaluate(t, teacher)

    def stage(module, arg, model):
        c = module.get_config(f"data=synthetic,small,{arg}")
        c.data, c.model, c.batch_size, c.dropout_rate = t.data, model, 16, 0.0
        c.num_epochs, c.lr_decay_epochs, c.log_every_steps = 1, (), 2
        c.distill.teacher_workdir, c.distill.taps = str(teacher), ("layer4",)
        return c

    train_and_evaluate(stage(resnet_kd, "method=ewa", "resnet18/32"), tmp_path / "kd")  # SSWA: the loss test
    out = tmp_path / "report"
    results = localization_report([teacher, tmp_path / "kd"], methods=("gradcam",), out_dir=out, batch_size=8)
    assert results["runs"]["teacher"]["pairs"] > 0
    for name in ("teacher", "kd"):
        m = results["runs"][name]["methods"]["gradcam"]
        assert 0.0 <= m["AUC"] <= 1.0 and 0.0 <= m["Point"] <= 1.0
    kd = results["runs"]["kd"]["methods"]["gradcam"]
    assert np.isnan(kd["Cos"]) == (kd["similarity_pairs"] == 0)

    # Every conv weight of torchvision's layout (stem, blocks, shortcuts) is prunable; the head is not.
    sd = torchvision_resnet_state_dict(18, 16, 10, seed=0)
    n = sum(v.size for k, v in sd.items() if k.endswith("weight") and v.ndim == 4)
    params = load_run(teacher).variables["params"]
    pruned = mask_params(params, global_magnitude_masks(params, 0.5))
    kernels = [np.asarray(x) for _, x in jax.tree_util.tree_leaves_with_path(pruned) if x.ndim == 4]
    assert sum(k.size for k in kernels) == n
    assert sum(int((k == 0).sum()) for k in kernels) == round(0.5 * n)
    np.testing.assert_array_equal(pruned["head"]["kernel"], params["head"]["kernel"])
    validate_config(stage(prune_unstructured, "method=sswa", "resnet18/16"))

    with pytest.raises(ValueError, match="structured pruning is implemented for plain conv chains"):
        validate_config(stage(prune_structured, "method=naive", "resnet18/16"))
