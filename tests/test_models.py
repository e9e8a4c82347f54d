"""VGG family: parameter counts, taps, tap gradients (finite differences) and torchvision import."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apjax.models import (
    VARIANTS,
    count_params,
    create_model,
    init_variables,
    tap_gradients,
    tap_names,
    tap_shapes,
)
from apjax.models.torch_import import (
    import_torchvision_vgg_bn,
    load_state_dict,
    torchvision_conv_indices,
)

# SPEC section 2: the paper's and torchvision's counts with BN (running statistics excluded).
PAPER_COUNTS = {"vgg16": 15_224_916, "vgg16/2": 3_935_284, "vgg16/4": 1_048_356, "vgg16/8": 294_364}


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_parameter_counts(name):
    model = create_model(name)
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), 227))
    assert count_params(shapes["params"]) == PAPER_COUNTS[name]


def test_tap_names_and_shapes_at_227():
    model = create_model("vgg16")
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), 227))
    names = tap_names(model.widths)
    x = jax.ShapeDtypeStruct((2, 227, 227, 3), jnp.float32)
    shapes = tap_shapes(model, variables, x, names)
    # Convs keep the side (padding 1); each pool floors the side by 2: 227, 113, 56, 28, 14, 7.
    sides = {1: 227, 2: 113, 3: 56, 4: 28, 5: 14}
    widths = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}
    expected = {}
    for b, n_convs in zip(range(1, 6), (2, 2, 3, 3, 3), strict=True):
        for i in range(1, n_convs + 1):
            expected[f"conv{b}_{i}"] = (2, sides[b], sides[b], widths[b])
        expected[f"pool{b}"] = (2, sides[b] // 2, sides[b] // 2, widths[b])
    assert set(names) == set(expected)
    assert {k: v.shape for k, v in shapes.items()} == expected


def test_unknown_tap_and_small_image_raise():
    model = create_model("vgg16/8")
    with pytest.raises(ValueError, match="too small"):
        init_variables(model, jax.random.key(0), 31)
    variables = init_variables(model, jax.random.key(0), 32)
    with pytest.raises(ValueError, match="unknown taps"):
        model.apply(variables, jnp.zeros((1, 32, 32, 3)), taps=("conv6_1",))
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vgg19")


def test_returns_only_requested_taps():
    model = create_model("vgg16/8")
    variables = init_variables(model, jax.random.key(0), 32)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    (logits, acts), state = model.apply(variables, x, taps=("conv3_2", "pool5"), mutable=["intermediates"])
    assert logits.shape == (2, 20)
    assert set(acts) == {"conv3_2", "pool5"}
    # pool5 is the 2x2 max of conv5_3's output.
    _, both = model.apply(variables, x, taps=("conv5_3", "pool5"))
    c = np.asarray(both["conv5_3"])
    np.testing.assert_array_equal(np.asarray(acts["pool5"]), c.reshape(2, 1, 2, 1, 2, -1).max((2, 4)))
    # pool5 is the max-pool of ReLU outputs: non-negative.
    assert float(acts["pool5"].min()) >= 0.0


def test_tap_gradient_matches_central_differences_float64():
    with jax.enable_x64(True):
        model = create_model((4, "M", 6, 6, "M", 8, "M"), num_classes=5, dtype=jnp.float64)
        variables = init_variables(model, jax.random.key(0), 16)
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        # Non-trivial BN statistics so that the eval-mode affine map matters.
        rng = np.random.default_rng(0)
        variables["batch_stats"] = {
            name: {"mean": jnp.asarray(rng.normal(0, 0.1, s["mean"].shape)),
                   "var": jnp.asarray(rng.uniform(0.5, 1.5, s["var"].shape))}
            for name, s in variables["batch_stats"].items()
        }  # fmt: skip
        x = jnp.asarray(rng.normal(size=(2, 16, 16, 3)))
        seed = jnp.asarray(rng.normal(size=(2, 5)))
        tap = "conv2_1"
        _, acts, grads, _ = tap_gradients(model, variables, x, seed, [tap])
        assert grads[tap].dtype == jnp.float64
        # Enough live units that the comparison is not 0 == 0.
        assert np.count_nonzero(np.asarray(grads[tap])) > grads[tap].size // 4

        def score(offset):
            logits, _ = model.apply(variables, x, offsets={tap: offset})
            return float(jnp.sum(logits * seed))

        eps = 1e-6
        zero = np.zeros(acts[tap].shape)
        g = np.asarray(grads[tap])
        live = [tuple(i) for i in np.argwhere(np.abs(g) > 1e-3)[:: max(1, np.count_nonzero(g) // 6)]]
        for idx in live[:6] + [(0, 3, 4, 1), (1, 7, 0, 5)]:
            e = zero.copy()
            e[idx] = eps
            fd = (score(jnp.asarray(e)) - score(jnp.asarray(-e))) / (2 * eps)
            np.testing.assert_allclose(float(g[idx]), fd, rtol=1e-6, atol=1e-9)


# --- torchvision import: a numpy float64 forward pass in torch's NCHW layout as the reference ---


def _torch_layout_state_dict(widths, num_classes, side, rng):
    sd, in_c = {}, 3
    for idx, w in zip(torchvision_conv_indices(widths), [w for w in widths if w != "M"], strict=True):
        sd[f"features.{idx}.weight"] = rng.normal(0, (2 / (9 * in_c)) ** 0.5, (w, in_c, 3, 3))
        sd[f"features.{idx}.bias"] = rng.normal(0, 0.1, w)
        sd[f"features.{idx + 1}.weight"] = rng.uniform(0.5, 1.5, w)
        sd[f"features.{idx + 1}.bias"] = rng.normal(0, 0.1, w)
        sd[f"features.{idx + 1}.running_mean"] = rng.normal(0, 0.1, w)
        sd[f"features.{idx + 1}.running_var"] = rng.uniform(0.5, 2.0, w)
        sd[f"features.{idx + 1}.num_batches_tracked"] = np.array(7)
        in_c = w
    sd["classifier.1.weight"] = rng.normal(0, 0.1, (num_classes, in_c * side * side))
    sd["classifier.1.bias"] = rng.normal(0, 0.1, num_classes)
    return sd


def _torch_reference_logits(sd, widths, x_nchw):
    x = x_nchw.astype(np.float64)
    idxs = iter(torchvision_conv_indices(widths))
    for w in widths:
        if w == "M":
            n, c, h, wd = x.shape
            x = x[:, :, : h // 2 * 2, : wd // 2 * 2].reshape(n, c, h // 2, 2, wd // 2, 2).max((3, 5))
            continue
        i = next(idxs)
        k, b = sd[f"features.{i}.weight"], sd[f"features.{i}.bias"]
        xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        h, wd = x.shape[2:]
        out = np.zeros((x.shape[0], k.shape[0], h, wd))
        for dy in range(3):
            for dx in range(3):
                out += np.einsum("nchw,oc->nohw", xp[:, :, dy : dy + h, dx : dx + wd], k[:, :, dy, dx])
        out += b[None, :, None, None]
        bn = f"features.{i + 1}"
        mean, var = sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"]
        out = (out - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)
        out = out * sd[f"{bn}.weight"][None, :, None, None] + sd[f"{bn}.bias"][None, :, None, None]
        x = np.maximum(out, 0)
    flat = x.reshape(x.shape[0], -1)  # torch flattens (C, H, W)
    return flat @ sd["classifier.1.weight"].T + sd["classifier.1.bias"]


def test_torchvision_indices_of_vgg16_match_spec():
    assert torchvision_conv_indices(VARIANTS["vgg16"]) == (
        0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40,
    )  # fmt: skip


@pytest.mark.parametrize("suffix", [".npz", ".pth"])
def test_weight_import_reproduces_torch_layout_logits(tmp_path, suffix):
    rng = np.random.default_rng(0)
    widths, k, size = (5, "M", 7, 6, "M", 8, "M"), 4, 19  # 19 -> 9 -> 4 -> 2: floors, uneven widths
    sd = _torch_layout_state_dict(widths, k, side=2, rng=rng)
    path = str(tmp_path / f"w{suffix}")
    if suffix == ".npz":
        np.savez(path, **sd)
    else:
        torch = pytest.importorskip("torch")
        torch.save({key: torch.from_numpy(np.asarray(v)) for key, v in sd.items()}, path)
    loaded = load_state_dict(path)
    model = create_model(widths, num_classes=k)
    variables = import_torchvision_vgg_bn(
        loaded, init_variables(model, jax.random.key(0), size), widths, head_prefix="classifier.1"
    )
    x = rng.normal(size=(3, 3, size, size))
    expected = _torch_reference_logits(sd, widths, x)
    logits, _ = model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32))
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)


def test_weight_import_keeps_new_head_and_rejects_mismatch():
    rng = np.random.default_rng(1)
    widths = (4, "M", 6, "M")
    sd = _torch_layout_state_dict(widths, 3, side=2, rng=rng)
    model = create_model(widths, num_classes=3)
    init = init_variables(model, jax.random.key(0), 8)
    imported = import_torchvision_vgg_bn(sd, init, widths)
    np.testing.assert_array_equal(imported["params"]["head"]["kernel"], init["params"]["head"]["kernel"])
    np.testing.assert_allclose(
        imported["params"]["conv2_1"]["kernel"],
        sd["features.4.weight"].transpose(2, 3, 1, 0),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="another architecture"):
        import_torchvision_vgg_bn(
            sd, init_variables(create_model((4, "M", 8, "M")), jax.random.key(0), 8), (4, "M", 8, "M")
        )
    with pytest.raises(KeyError, match="no 'features.8.weight'"):
        import_torchvision_vgg_bn(
            sd, init_variables(create_model((4, "M", 6, "M", 6)), jax.random.key(0), 8), (4, "M", 6, "M", 6)
        )


def test_bfloat16_computation_keeps_float32_parameters():
    model = create_model("vgg16/8", dtype=jnp.bfloat16)
    variables = init_variables(model, jax.random.key(0), 32)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    logits, acts = model.apply(variables, x, taps=("pool5",))
    assert logits.dtype == jnp.float32 and acts["pool5"].dtype == jnp.bfloat16
    ref, _ = create_model("vgg16/8").apply(variables, x)
    np.testing.assert_allclose(
        np.asarray(logits), np.asarray(ref), atol=0.05 * float(jnp.abs(ref).max()) + 1e-3
    )
