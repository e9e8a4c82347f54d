"""VGG family: parameter counts, taps, tap gradients (finite differences) and torchvision import."""

import os
import pickle
import re
import struct
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from apjax.models import (
    VARIANTS,
    apply_with_taps,
    count_params,
    create_model,
    init_variables,
    tap_gradients,
    tap_names,
    tap_shapes,
)
from apjax.models.torch_import import load_state_dict
from apjax.models.vgg import import_torchvision_vgg_bn, torchvision_conv_indices

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
    shapes = tap_shapes(model, variables, x)
    assert tuple(shapes) == names  # every tap, in forward order
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
        apply_with_taps(model, variables, jnp.zeros((1, 32, 32, 3)), ("conv6_1",))
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vgg19")


def test_returns_only_requested_taps():
    model = create_model("vgg16/8")
    variables = init_variables(model, jax.random.key(0), 32)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    logits, acts, _ = apply_with_taps(model, variables, x, ("conv3_2", "pool5"))
    assert logits.shape == (2, 20)
    assert set(acts) == {"conv3_2", "pool5"}
    # pool5 is the 2x2 max of conv5_3's output.
    _, both, _ = apply_with_taps(model, variables, x, ("conv5_3", "pool5"))
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
            logits = apply_with_taps(model, variables, x, (), perturbations={tap: offset})[0]
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


def test_tap_gradient_in_train_mode_matches_central_differences_float64():
    """The path every matching step uses: train mode (BatchNorm on the batch's statistics, which couple the
    images, and dropout with a fixed key), against central differences of the same train-mode score."""
    with jax.enable_x64(True):
        model = create_model((4, "M", 6, 6, "M", 8, "M"), num_classes=5, dtype=jnp.float64, dropout_rate=0.5)
        variables = jax.tree.map(
            lambda a: jnp.asarray(a, jnp.float64), init_variables(model, jax.random.key(1), 16)
        )
        rng = np.random.default_rng(1)
        x = jnp.asarray(rng.normal(size=(3, 16, 16, 3)))
        seed = jnp.asarray(rng.normal(size=(3, 5)))
        rngs = {"dropout": jax.random.key(5)}
        tap = "conv2_1"
        logits, acts, grads, updates = tap_gradients(model, variables, x, seed, [tap], train=True, rngs=rngs)
        assert set(updates) == {"batch_stats"}

        def score(offset):
            out = apply_with_taps(
                model, variables, x, (), train=True, rngs=rngs, perturbations={tap: offset}
            )[0]
            return float(jnp.sum(out * seed))

        g = np.asarray(grads[tap])
        assert np.count_nonzero(g) > g.size // 4
        eps = 1e-6
        zero = np.zeros(acts[tap].shape)
        live = [tuple(i) for i in np.argwhere(np.abs(g) > 1e-3)[:: max(1, np.count_nonzero(g) // 8)]]
        for idx in live[:8]:
            e = zero.copy()
            e[idx] = eps
            fd = (score(jnp.asarray(e)) - score(jnp.asarray(-e))) / (2 * eps)
            np.testing.assert_allclose(float(g[idx]), fd, rtol=1e-6, atol=1e-9)
        # In train mode an offset in one image moves the others' logits (shared batch statistics): the
        # gradient is of the whole batch's score, as in the reference.
        e = zero.copy()
        e[(0, *live[0][1:])] = 1e-3
        moved = apply_with_taps(
            model, variables, x, (), train=True, rngs=rngs, perturbations={tap: jnp.asarray(e)}
        )[0]
        assert np.max(np.abs(np.asarray(moved)[1:] - np.asarray(logits)[1:])) > 0


def test_pytorch_default_init_is_torchs_layer_init():
    """torch's Conv2d/Linear default: kaiming_uniform(a=sqrt(5)) weights, bound sqrt(6 / ((1 + 5) fan_in)) =
    1 / sqrt(fan_in), and U(-1/sqrt(fan_in), 1/sqrt(fan_in)) biases; torchvision's init has zero biases."""
    widths = (64, "M", 128, "M")
    model = create_model(widths, num_classes=20, init="pytorch_default")
    params = init_variables(model, jax.random.key(0), 32)["params"]
    for name, fan_in in (("conv1_1", 9 * 3), ("conv2_1", 9 * 64), ("head", 128 * 8 * 8)):
        bound = (6 / ((1 + 5) * fan_in)) ** 0.5
        for kind in ("kernel", "bias"):
            w = np.asarray(params[name][kind]).ravel()
            assert np.abs(w).max() <= bound and np.abs(w).max() > (0.9 if w.size > 500 else 0.5) * bound
            if w.size > 1000:  # a uniform on [-b, b] has standard deviation b / sqrt(3)
                np.testing.assert_allclose(w.std(), bound / 3**0.5, rtol=0.05)
    tv = init_variables(create_model(widths, num_classes=20, init="torchvision"), jax.random.key(0), 32)
    assert not np.any(np.asarray(tv["params"]["conv2_1"]["bias"]))
    # kaiming normal, fan_out = 9 * 128, gain sqrt(2)
    np.testing.assert_allclose(
        np.asarray(tv["params"]["conv2_1"]["kernel"]).std(), (2 / (9 * 128)) ** 0.5, rtol=0.05
    )
    with pytest.raises(ValueError, match="unknown init 'xavier'; choose one of"):
        create_model(widths, init="xavier")


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


def test_weight_import_reproduces_torch_layout_logits(tmp_path):
    rng = np.random.default_rng(0)
    widths, k, size = (5, "M", 7, 6, "M", 8, "M"), 4, 19  # 19 -> 9 -> 4 -> 2: floors, uneven widths
    sd = _torch_layout_state_dict(widths, k, side=2, rng=rng)
    path = str(tmp_path / "w.npz")
    np.savez(path, **sd)
    loaded = load_state_dict(path)
    model = create_model(widths, num_classes=k)
    variables = import_torchvision_vgg_bn(
        loaded, init_variables(model, jax.random.key(0), size), widths, head_prefix="classifier.1"
    )
    x = rng.normal(size=(3, 3, size, size))
    expected = _torch_reference_logits(sd, widths, x)
    logits = model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32))
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)


# --- .pth without torch: files written once by torch 2.13.0 (CPU) with
#     python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
#     /tmp/torchvenv/bin/python tests/data/make_torch_fixture.py
# (see that script). vgg16_32_bn.pth is a vgg16_bn-layout state dict at VGG16 widths / 32 with a
# Dropout + Linear head for a 64 x 64 input, holding permuted, transposed, offset and strided views,
# float16, bfloat16, float64, int64 0-d entries and an nn.Parameter; vgg16_32_bn_expected.npz holds the
# same values written by numpy from the torch tensors, so the reader is compared to torch's own values.

DATA = os.path.join(os.path.dirname(__file__), "data")
FIXTURE_WIDTHS = (2, 2, "M", 4, 4, "M", 8, 8, 8, "M", 16, 16, 16, "M", 16, 16, 16, "M")
TORCH_DTYPES = {  # torch's dtype names -> the numpy dtypes a reader must return
    "torch.float32": np.dtype(np.float32),
    "torch.float64": np.dtype(np.float64),
    "torch.float16": np.dtype(np.float16),
    "torch.bfloat16": np.dtype(ml_dtypes.bfloat16),
    "torch.int64": np.dtype(np.int64),
}


def _fixture_expected():
    with np.load(os.path.join(DATA, "vgg16_32_bn_expected.npz")) as f:
        dtypes = {str(k): TORCH_DTYPES[str(t)] for k, t in f["_dtypes"]}
        return {k: f[k] for k in f.files if k != "_dtypes"}, dtypes


def test_pth_reader_returns_the_tensors_torch_wrote():
    expected, dtypes = _fixture_expected()
    sd = load_state_dict(os.path.join(DATA, "vgg16_32_bn.pth"))
    assert list(sd) == list(expected)  # every key, in the state dict's order
    assert {str(d) for d in dtypes.values()} == {"float32", "float64", "float16", "bfloat16", "int64"}
    for key, want in expected.items():
        got = sd[key]
        assert got.dtype == dtypes[key] and got.shape == want.shape, key
        np.testing.assert_array_equal(got.astype(want.dtype), want, err_msg=key)
    # Views of one storage come back as separate copies, not aliases of each other.
    assert not np.shares_memory(sd["features.1.weight"], sd["features.1.bias"])
    assert sd["features.1.num_batches_tracked"].shape == ()
    assert int(sd["features.41.num_batches_tracked"]) == 19  # the 13th of 7, 8, ...


def test_pth_import_reproduces_torch_layout_logits():
    expected, _ = _fixture_expected()
    widths, size = FIXTURE_WIDTHS, 64
    model = create_model(widths, num_classes=3)
    variables = import_torchvision_vgg_bn(
        load_state_dict(os.path.join(DATA, "vgg16_32_bn.pth")),
        init_variables(model, jax.random.key(0), size),
        widths,
        head_prefix="classifier.1",
    )
    np.testing.assert_array_equal(  # OIHW -> HWIO of the permuted-view kernel
        variables["params"]["conv1_1"]["kernel"], expected["features.0.weight"].transpose(2, 3, 1, 0)
    )
    x = np.random.default_rng(3).normal(size=(2, 3, size, size))
    reference = _torch_reference_logits({k: v.astype(np.float64) for k, v in expected.items()}, widths, x)
    logits = model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32))
    np.testing.assert_allclose(np.asarray(logits), reference, rtol=1e-4, atol=1e-4)


def test_pth_checkpoint_with_nested_state_dict():
    sd = load_state_dict(os.path.join(DATA, "checkpoint_nested.pth"))  # {'epoch', 'model', 'optimizer'}
    with np.load(os.path.join(DATA, "checkpoint_nested_expected.npz")) as f:
        assert sorted(sd) == sorted(f.files) == ["bias", "weight"]
        for k in f.files:
            np.testing.assert_array_equal(sd[k], f[k])


def _one_sentence(message):
    assert message.endswith(".") and "\n" not in message and not re.search(r"\.\s+[A-Z]", message), message


@pytest.mark.parametrize(
    "name, needle",
    [
        ("legacy_format.pth", "legacy format"),
        ("torchscript.pt", "TorchScript archive"),
    ],
)
def test_pth_refuses_legacy_and_torchscript_files(name, needle):
    with pytest.raises(ValueError, match=needle) as e:
        load_state_dict(os.path.join(DATA, name))
    _one_sentence(str(e.value))
    assert "re-save" in str(e.value) or "torch.save(model.state_dict()" in str(e.value)


class _Payload:
    """Pickles as a call of ``func(arg)``: what a hostile weight file would run on a plain unpickler."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _write_zip(path, records):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in records.items():
            z.writestr(name, data)


@pytest.mark.parametrize("func", [os.system, exec])
def test_pth_refuses_a_forbidden_global_without_running_it(tmp_path, func):
    marker = tmp_path / "ran"
    arg = f"touch {marker}" if func is os.system else f"open({str(marker)!r}, 'w').close()"
    payload = {"features.0.weight": _Payload(func, arg)}
    path = str(tmp_path / "evil.pth")
    _write_zip(path, {"evil/data.pkl": pickle.dumps(payload, protocol=2), "evil/version": b"3\n"})
    module = os.system.__module__ if func is os.system else "__builtin__"  # protocol 2 writes Python 2 names
    with pytest.raises(ValueError, match=f"references the global {module}.{func.__name__},") as e:
        load_state_dict(path)
    _one_sentence(str(e.value))
    assert not marker.exists()


def test_pth_refuses_a_file_that_is_no_torch_zip(tmp_path):
    plain = tmp_path / "plain.pth"
    plain.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
    with pytest.raises(ValueError, match="not a torch.save zip archive") as e:
        load_state_dict(str(plain))
    _one_sentence(str(e.value))
    empty = str(tmp_path / "empty.pth")
    _write_zip(empty, {"x/readme.txt": b"hi"})
    with pytest.raises(ValueError, match="no data.pkl"):
        load_state_dict(empty)


# A torch.save-format archive built by hand: data.pkl written opcode by opcode (protocol 2, as torch
# writes it), so the byte order and bounds paths can be driven where no torch-written file exists.


def _tensor_pickle(entries):
    """Pickle of OrderedDict(name -> _rebuild_tensor_v2(storage, offset, size, stride, False, {}))."""
    pack = lambda i: b"J" + struct.pack("<i", i)  # BININT
    text = lambda t: b"X" + struct.pack("<I", len(t.encode())) + t.encode()  # BINUNICODE
    ordered_dict = b"ccollections\nOrderedDict\n)R"  # GLOBAL, EMPTY_TUPLE, REDUCE
    out = b"\x80\x02" + ordered_dict
    for name, (storage_type, key, numel, offset, size, stride) in entries.items():
        out += text(name) + b"ctorch._utils\n_rebuild_tensor_v2\n("
        out += b"(" + text("storage") + b"ctorch\n" + storage_type.encode() + b"\n"
        out += text(key) + text("cpu") + pack(numel) + b"tQ"  # TUPLE, BINPERSID
        out += pack(offset) + b"(" + b"".join(map(pack, size)) + b"t(" + b"".join(map(pack, stride)) + b"t"
        out += b"\x89" + ordered_dict + b"tRs"  # NEWFALSE, hooks, TUPLE, REDUCE, SETITEM
    return out + b"."


def _hand_archive(path, entries, storages, byteorder="little"):
    records = {"a/data.pkl": _tensor_pickle(entries), "a/byteorder": byteorder.encode()}
    records.update({f"a/data/{k}": v for k, v in storages.items()})
    _write_zip(str(path), records)
    return str(path)


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_pth_reader_strides_offsets_and_byte_order_by_hand(tmp_path, byteorder):
    end = "<" if byteorder == "little" else ">"
    storages = {
        "0": np.arange(10, dtype=f"{end}f4").tobytes(),
        "1": np.array([5, -6, 7], dtype=f"{end}i8").tobytes(),
        "2": np.array([1.5, -2.25], dtype=f"{end}f2").tobytes(),
    }
    entries = {
        "w": ("FloatStorage", "0", 10, 2, (2, 3), (1, 2)),  # element [i, j] = storage[2 + i + 2 j]
        "n": ("LongStorage", "1", 3, 1, (), ()),
        "h": ("HalfStorage", "2", 2, 0, (2,), (1,)),
    }
    sd = load_state_dict(_hand_archive(tmp_path / "w.pth", entries, storages, byteorder))
    np.testing.assert_array_equal(sd["w"], np.array([[2, 4, 6], [3, 5, 7]], np.float32))
    assert sd["w"].dtype == np.float32 and sd["n"].dtype == np.int64 and int(sd["n"]) == -6
    np.testing.assert_array_equal(sd["h"], np.array([1.5, -2.25], np.float16))


def test_pth_reader_refuses_tensors_outside_their_storage(tmp_path):
    storages = {"0": np.arange(10, dtype="<f4").tobytes()}
    past_end = {"w": ("FloatStorage", "0", 10, 2, (2, 5), (1, 2))}  # reaches element 2 + 1 + 8 = 11
    with pytest.raises(ValueError, match="reaches element 11 of a 10-element storage") as e:
        load_state_dict(_hand_archive(tmp_path / "a.pth", past_end, storages))
    _one_sentence(str(e.value))
    wrong_numel = {"w": ("FloatStorage", "0", 12, 0, (12,), (1,))}  # the record holds 10 elements
    with pytest.raises(ValueError, match="holds 40 bytes but 12 FloatStorage elements need 48"):
        load_state_dict(_hand_archive(tmp_path / "b.pth", wrong_numel, storages))


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
    logits, acts, _ = apply_with_taps(model, variables, x, ("pool5",))
    assert logits.dtype == jnp.float32 and acts["pool5"].dtype == jnp.bfloat16
    ref = create_model("vgg16/8").apply(variables, x)
    np.testing.assert_allclose(
        np.asarray(logits), np.asarray(ref), atol=0.05 * float(jnp.abs(ref).max()) + 1e-3
    )
