"""apjax.deploy: a trained run exported with jax.export computes what the eval computes, loads without the
trainer, and says what is wrong in one sentence.

The export of the session's tiny teacher (``teacher_dir``) is written once, by ``export.py`` itself. Its
``predict`` is compared with the eval step's forward pass and its ``explain`` with the localisation
evaluation's Grad-CAM (``attribution_fn('gradcam')`` then ``upsample_map``), for batches of 1 and 3 (one
symbolic batch dimension). Tolerance: both sides compute the same float32 operations, in orders XLA
chooses per program; each of the tiny VGG's 14 layers sums at most 9 * 64 = 576 products, whose float32
sum in another order moves by about sqrt(576) = 24 roundings of the result, so over 14 layers about
14 * 24 * eps32 = 4e-5 of the values' scale: :func:`_close` allows 1e-4 of it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from apjax.attribution.maps import upsample_map
from apjax.attribution.methods import attribution_fn
from apjax.data.augment import MEAN, STD, crop_resize, eval_preprocess
from apjax.deploy import load
from apjax.deploy.export import _weights_file, export_run, weights_meta
from apjax.deploy.load import EXPLAIN_FILE, FORMAT_VERSION, META_FILE, PREDICT_FILE, WEIGHTS_FILE
from apjax.deploy.predict import resize_image
from apjax.deploy.storage import pack_int4, sparse_bytes, sparse_decode, sparse_encode, unpack_int4
from apjax.deploy.weights import quantize_kernel, stored_weights
from apjax.errors import ConfigError, MissingFileError
from apjax.evaluators.context import load_run

ROOT = Path(__file__).resolve().parent.parent
TINY_WIDTHS = (8, 8, "M", 16, 16, "M", 32, 32, 32, "M", 64, 64, 64, "M", 64, 64, 64, "M")  # vgg16/8
SIZE = 32  # tiny_config's image size


def _python(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _close(got, want) -> None:
    want = np.asarray(want, np.float64)
    scale = max(float(np.abs(want).max()), np.finfo(np.float32).tiny)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=1e-4 * scale)


def _one_sentence(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message and message.endswith(".") and "Traceback" not in message, message
    return message


@pytest.fixture(scope="module")
def exported(teacher_dir, tmp_path_factory) -> Path:
    """The tiny teacher's best checkpoint exported by ``export.py``."""
    out = tmp_path_factory.mktemp("deploy") / "teacher"
    done = _python("export.py", f"--workdir={teacher_dir}", f"--out={out}")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "predict.stablehlo" in done.stdout and "python -m apjax.deploy.predict" in done.stdout
    return out


def _eval_outputs(run, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What apjax's evaluation computes for uint8 images already at the input size: the eval step's
    logits (eval_preprocess, whose resize is then the identity) and the localisation evaluation's
    Grad-CAM map of each image's top-1 class, resized to the input.

    On one device, as the export runs: the restored weights are replicated over the test's 8 host
    devices, and there an int8 net's program rounds some activations to the neighbouring int8 step
    (measured against one device: this test's int8 net's Grad-CAM maps 5% of their largest value apart),
    while a float net computes the same bits on both."""
    variables = jax.device_get(run.variables)
    extents = np.full((len(images), 2), SIZE, np.int32)
    x = eval_preprocess(images, extents, out_size=SIZE, dtype=run.model.dtype)
    logits = np.asarray(jax.jit(run.model.apply)(variables, x), np.float32)
    top1 = np.argmax(logits, axis=-1).astype(np.int32)
    maps = attribution_fn("gradcam", run.model, variables)(eval_preprocess(images, extents, SIZE), top1)
    return logits, np.asarray(upsample_map(maps, SIZE))


def _check_against_eval(run, deployed, images: np.ndarray) -> None:
    logits, maps = _eval_outputs(run, images)
    predicted = deployed.predict(images)
    explained_logits, explained_maps = deployed.explain(images)
    assert predicted.dtype == np.float32 and predicted.shape == logits.shape
    assert explained_maps.dtype == np.float32 and explained_maps.shape == (len(images), SIZE, SIZE)
    _close(predicted, logits)
    _close(explained_logits, predicted)
    _close(explained_maps, maps)
    assert np.abs(maps).max() > 0  # the maps compared are not all zero


def test_exported_predict_and_explain_equal_the_evaluation_for_any_batch(exported, teacher_dir):
    run = load_run(teacher_dir, "best")
    deployed = load(exported)
    for n, seed in ((1, 0), (3, 1)):
        _check_against_eval(run, deployed, _images(n, seed))
    assert run.step == deployed.meta["source"]["step"]


def test_meta_describes_the_run_and_counts_the_weights_by_hand(exported, teacher_dir):
    meta = json.loads((exported / META_FILE).read_text())
    assert meta["format_version"] == FORMAT_VERSION and "cpu" in meta["platforms"]
    assert meta["input"]["height"] == meta["input"]["width"] == SIZE
    assert meta["input"]["normalization"]["mean"] == list(MEAN) and meta["input"]["normalization"][
        "std"
    ] == list(STD)
    assert meta["model"]["family"] == "vgg" and meta["model"]["config_model"] == "vgg16/8"
    assert meta["model"]["gradcam_tap"] == "conv5_3"
    assert meta["compression"]["task"] == "teacher" and meta["compression"]["method"] is None
    assert meta["source"]["workdir"] == str(teacher_dir) and meta["source"]["checkpoint"] == "best"
    k = len(meta["classes"])
    assert k == json.loads((teacher_dir / "config.json").read_text())["data"]["synthetic"]["num_classes"]
    # Val metrics: the row of final_metrics.json for the best checkpoint's step.
    final = json.loads((teacher_dir / "final_metrics.json").read_text())
    row = f"val, best (step {meta['source']['step']})"
    assert meta["val_metrics"] == {"row": row, "metrics": final["rows"][row]}
    # By hand: each conv 3x3 kernel and bias, its BatchNorm's scale, bias (params), mean and variance
    # (batch_stats); the head reads the last map, 32 / 2**5 = 1 pixel square, of 64 channels.
    params, stats, c_in = 0, 0, 3
    for w in TINY_WIDTHS:
        if w != "M":
            params, stats, c_in = params + 9 * c_in * w + w + 2 * w, stats + 2 * w, w
    params += (1 * 1 * 64) * k + k
    count = params + stats
    assert meta["weights"]["params"] == params and meta["weights"]["count"] == count
    assert meta["weights"]["bytes"] == 4 * count
    for name in (PREDICT_FILE, EXPLAIN_FILE, WEIGHTS_FILE):
        assert meta["files"][name] == (exported / name).stat().st_size
    # The weights are stored once, beside the functions, which are far smaller than them.
    assert meta["files"][WEIGHTS_FILE] >= 4 * count > meta["files"][PREDICT_FILE]


def test_load_runs_in_a_process_that_cannot_import_the_trainer(exported, tmp_path):
    images = _images(3, 2)
    np.save(tmp_path / "images.npy", images)
    blocked = ("apjax.trainer", "apjax.tasks", "orbax", "apjax.models", "apjax.data", "apjax.compress",
               "apjax.attribution", "apjax.evaluators", "flax", "ml_collections", "qwix")  # fmt: skip
    code = (
        "import json, sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None  # any import of these (or below them) fails\n"
        "import numpy as np\n"
        "from apjax.deploy import load\n"
        "d = load(sys.argv[1])\n"
        "x = np.load(sys.argv[2])\n"
        "logits = d.predict(x)\n"
        "explained, maps = d.explain(x)\n"
        "np.savez(sys.argv[3], logits=logits, explained=explained, maps=maps)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('apjax') and sys.modules[m])))\n"
    )
    done = _python("-c", code, str(exported), str(tmp_path / "images.npy"), str(tmp_path / "out.npz"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [
        "apjax",
        "apjax.deploy",
        "apjax.deploy.load",
        "apjax.deploy.storage",
        "apjax.errors",
    ]
    child = np.load(tmp_path / "out.npz")
    deployed = load(exported)
    logits, (explained, maps) = deployed.predict(images), deployed.explain(images)
    _close(child["logits"], logits)
    _close(child["explained"], explained)
    _close(child["maps"], maps)


@pytest.mark.parametrize("bits", ["int8", "int4w"])
def test_quantized_runs_export_their_forward_from_packed_weights(bits, exported, teacher_dir, tmp_path):
    """A quantize run's workdir (here the teacher's checkpoints under a quantize config: the same
    variables) exports the qwix-quantized forward pass that eval.py evaluates, from conv kernels stored as
    int8 or packed int4 values and per-channel scales: a weight file smaller than the float export's."""
    workdir = tmp_path / f"quant_{bits}"
    shutil.copytree(teacher_dir, workdir, ignore=shutil.ignore_patterns("tensorboard"))
    config = json.loads((workdir / "config.json").read_text())
    config.update(task="quantize", quant={"bits": bits, "source_workdir": ""},
                  distill={"method": "naive", "teacher_workdir": str(teacher_dir)})  # fmt: skip
    (workdir / "config.json").write_text(json.dumps(config))
    meta = export_run(workdir, tmp_path / "export")
    assert meta["compression"]["task"] == "quantize" and meta["compression"]["method"] == "naive"
    assert meta["compression"]["quantization"]["bits"] == bits
    storage = {"int8": "int8", "int4w": "int4_packed"}[bits]
    weights = meta["weights"]
    assert weights["storage"] == storage and weights["file_bytes"] == meta["files"][WEIGHTS_FILE]
    convs = [a for a in weights["arrays"] if a["storage"] == storage]
    assert len(convs) == 13 and all(len(a["shape"]) == 4 for a in convs)
    for a in convs:  # the values at 1 byte or half a byte each, and one float32 scale per output channel
        n, c_out = int(np.prod(a["shape"])), a["shape"][-1]
        assert a["stored_bytes"] == (n if bits == "int8" else (n + 1) // 2) + 4 * c_out
    float_meta = json.loads((exported / META_FILE).read_text())
    assert weights["stored_bytes"] < weights["bytes"] == float_meta["weights"]["bytes"]
    assert meta["files"][WEIGHTS_FILE] < float_meta["files"][WEIGHTS_FILE]
    run = load_run(workdir, "best")
    deployed = load(tmp_path / "export")
    images = _images(3, 3)
    _check_against_eval(run, deployed, images)
    float_logits, _ = _eval_outputs(load_run(teacher_dir, "best"), images)
    assert not np.allclose(deployed.predict(images), float_logits, rtol=0, atol=1e-4)  # it does quantize


def test_int4_packing_round_trips_exactly():
    values = np.array([-8, -1, 0, 7, 3, -5, 2, -8, 7, 1, -3, 0, 6, -7, 4, 5, -2], np.int8)  # 17: an odd count
    packed = pack_int4(values)
    assert packed.dtype == np.uint8 and packed.shape == (9,)
    assert packed[0] == 0xF8 and packed[1] == 0x70 and packed[8] == 0x0E  # -8 low, -1 high; 0, 7; -2, pad
    np.testing.assert_array_equal(unpack_int4(packed, values.size), values)
    traced = jax.jit(unpack_int4, static_argnums=(1, 2))(packed, 17, jnp)
    np.testing.assert_array_equal(np.asarray(traced), values)
    every = np.tile(np.arange(-8, 8, dtype=np.int8), 3)[:-1]  # all 16 values, 47 of them
    np.testing.assert_array_equal(unpack_int4(pack_int4(every), every.size), every)
    with pytest.raises(ValueError):
        pack_int4(np.array([8]))


@pytest.mark.parametrize(
    ("qtype", "bound", "qmin", "qmax"), [("int8", 127.5, -128, 127), ("int4", 7.5, -8, 7)]
)
def test_quantized_values_and_scales_equal_a_per_channel_computation_by_hand(qtype, bound, qmin, qmax):
    """qwix's rule for a conv kernel (HWIO): per output channel, scale = max |w| / (qmax + 0.5), values
    round(w / scale) clipped to the type. Each channel's largest magnitude is positive here (a negative
    one lands on qmin or qmin + 1 depending on the last bit of the scale)."""
    kernel = np.random.default_rng(6).normal(size=(1, 1, 2, 3)).astype(np.float32)
    kernel[0, 0, 0] = np.abs(kernel).max(axis=(0, 1, 2)) * 1.5  # the largest magnitude: positive
    values, scale = quantize_kernel(kernel, qtype)
    absmax = np.abs(kernel.astype(np.float64)).max(axis=(0, 1, 2))
    by_hand = absmax / bound
    np.testing.assert_allclose(scale, by_hand, rtol=2 * np.finfo(np.float32).eps, atol=0)
    assert scale.dtype == np.float32 and scale.shape == (3,) and values.dtype == np.int8
    np.testing.assert_array_equal(values, np.clip(np.round(kernel / by_hand), qmin, qmax))
    assert (values[0, 0, 0] == qmax).all()


def test_sparse_bitmask_round_trips_exactly_at_the_bytes_counted_by_hand():
    kernel = np.zeros((3, 3, 1, 2), np.float32)  # 18 values: 3 bytes of bitmask
    kernel[0, 0, 0, 1], kernel[1, 2, 0, 0], kernel[2, 2, 0, 1] = 1.5, -2.25, 3e-7
    kernel[2, 1, 0, 0] = -0.0  # stored, so that the bits come back
    mask, values = sparse_encode(kernel)
    assert mask.dtype == np.uint8 and mask.shape == (3,) and values.dtype == np.float32
    np.testing.assert_array_equal(values, kernel.ravel()[[1, 10, 15, 17]])  # row-major order
    assert mask.nbytes + values.nbytes == 3 + 4 * 4 == sparse_bytes(18, 4)
    back = sparse_decode(mask, values, kernel.shape)
    np.testing.assert_array_equal(back.view(np.uint32), kernel.view(np.uint32))
    dense = np.random.default_rng(7).normal(size=(3, 3, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(sparse_decode(*sparse_encode(dense), dense.shape), dense)
    with pytest.raises(ValueError):
        sparse_decode(mask, values[:3], kernel.shape)


def test_a_pruned_export_stores_sparse_kernels_and_loads_them_dense(exported, teacher_dir, tmp_path):
    """The float export's weights with 90% of each conv kernel zeroed, stored as an unstructured pruning
    run's (bitmask and non-zero values): a smaller file, which the loader rebuilds into the same dense
    arrays, so that predict gives what the float weights give."""
    variables = jax.device_get(load_run(teacher_dir, "best").variables)

    def prune(path, leaf):
        if path[-1].key != "kernel" or leaf.ndim != 4:
            return leaf
        return np.where(np.abs(leaf) >= np.quantile(np.abs(leaf), 0.9), leaf, 0).astype(np.float32)

    pruned = jax.tree_util.tree_map_with_path(prune, dict(variables))
    stored = stored_weights(pruned, "prune_unstructured", None)
    assert stored.storage == "sparse_bitmask"
    out = tmp_path / "sparse"
    shutil.copytree(exported, out)
    data = _weights_file(stored.files)
    (out / WEIGHTS_FILE).write_bytes(data)
    meta = json.loads((out / META_FILE).read_text())
    meta["weights"] = weights_meta(stored, len(data))
    (out / META_FILE).write_text(json.dumps(meta))
    for row in meta["weights"]["arrays"]:
        if row["storage"] == "sparse_bitmask":
            n = int(np.prod(row["shape"]))
            assert row["stored_bytes"] == -(-n // 8) + 4 * row["nonzero"] and row["dense_bytes"] == 4 * n
    float_meta = json.loads((exported / META_FILE).read_text())
    assert meta["weights"]["stored_bytes"] < meta["weights"]["bytes"] == float_meta["weights"]["bytes"]
    assert len(data) < float_meta["files"][WEIGHTS_FILE]
    deployed = load(out)
    for (_, dense, _), loaded in zip(stored.arguments, deployed._weights, strict=True):
        np.testing.assert_array_equal(np.asarray(loaded), dense)
    images = _images(2, 8)
    dense_logits = load(exported)._predict(tuple(stored.arrays), images)  # the float export, pruned weights
    np.testing.assert_array_equal(deployed.predict(images), np.asarray(dense_logits))


def test_bad_inputs_end_in_one_sentence(exported, teacher_dir, tmp_path):
    # No run: an empty workdir; a run's config without checkpoints (and exporting creates none).
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError) as e:
        export_run(tmp_path / "empty", tmp_path / "out")
    assert "config.json" in _one_sentence(e)
    (tmp_path / "untrained").mkdir()
    shutil.copy(teacher_dir / "config.json", tmp_path / "untrained")
    with pytest.raises(MissingFileError) as e:
        export_run(tmp_path / "untrained", tmp_path / "out")
    assert "no best checkpoint" in _one_sentence(e)
    assert not (tmp_path / "untrained" / "checkpoints").exists() and not (tmp_path / "out").exists()
    # A sweep's folder (its config's task is 'experiment'): the message names a run in it.
    sweep = tmp_path / "sweep"
    (sweep / "teacher").mkdir(parents=True)
    (sweep / "teacher" / "final_metrics.json").write_text("{}")
    config = json.loads((teacher_dir / "config.json").read_text())
    (sweep / "config.json").write_text(json.dumps({**config, "task": "experiment"}))
    with pytest.raises(ConfigError) as e:
        export_run(sweep, tmp_path / "out")
    assert f"--workdir {sweep / 'teacher'}" in _one_sentence(e)
    # An existing --out: refused, and --overwrite replaces only an export.
    with pytest.raises(ConfigError) as e:
        export_run(teacher_dir, exported)
    assert "--overwrite" in _one_sentence(e)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError) as e:
        export_run(teacher_dir, tmp_path / "notes", overwrite=True)
    assert "not an apjax export" in _one_sentence(e) and (tmp_path / "notes" / "mine.txt").exists()
    # A newer format, a missing file.
    newer = tmp_path / "newer"
    shutil.copytree(exported, newer)
    meta = json.loads((newer / META_FILE).read_text())
    (newer / META_FILE).write_text(json.dumps({**meta, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ConfigError) as e:
        load(newer)
    assert "newer" in _one_sentence(e)
    (newer / META_FILE).write_text(json.dumps(meta))
    (newer / EXPLAIN_FILE).unlink()
    with pytest.raises(MissingFileError) as e:
        load(newer)
    assert EXPLAIN_FILE in _one_sentence(e)
    # Images of the wrong size, dtype or rank.
    deployed = load(exported)
    for bad in (_images(2, 0)[:, :31], _images(2, 0).astype(np.float32), _images(1, 0)[0]):
        with pytest.raises(ConfigError) as e:
            deployed.predict(bad)
        _one_sentence(e)
        with pytest.raises(ConfigError):
            deployed.explain(bad)


def test_overwrite_replaces_an_export_with_the_latest_checkpoint(exported, teacher_dir, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(exported, out)
    meta = export_run(teacher_dir, out, checkpoint="latest", overwrite=True)
    saved = json.loads((out / META_FILE).read_text())
    assert saved == meta and saved["source"]["checkpoint"] == "latest"
    final = json.loads((teacher_dir / "final_metrics.json").read_text())
    assert saved["source"]["step"] == final["step"]  # the latest checkpoint is the last step's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temporary folder left


def test_the_predict_command_resizes_as_the_eval_up_to_uint8_rounding():
    """The predict command resizes with PIL's BILINEAR per channel in float32, then rounds to uint8; the eval
    resizes with apjax's antialiased triangle filter in float32 (:func:`apjax.data.augment.crop_resize`).
    They agree to the final rounding (at most 0.5) plus float32 rounding of values up to 255."""
    for shape in ((45, 50, 3), (200, 150, 3), (20, 24, 3)):  # shrink, shrink more, enlarge
        image = np.random.default_rng(4).integers(0, 256, shape, dtype=np.uint8)
        sizes = jnp.asarray([shape[:2]])
        ours = crop_resize(image[None], jnp.asarray([[0, 0, *shape[:2]]]), sizes, sizes, SIZE)[0]
        resized = resize_image(image, SIZE, SIZE)
        assert resized.dtype == np.uint8 and resized.shape == (SIZE, SIZE, 3)
        assert np.abs(resized - np.asarray(ours, np.float64)).max() <= 0.5 + 256 * np.finfo(np.float32).eps


def test_predict_command_prints_each_images_top_classes(exported, tmp_path):
    image = np.random.default_rng(5).integers(0, 256, (45, 50, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    done = _python("-m", "apjax.deploy.predict", str(exported), str(tmp_path / "photo.png"))
    assert done.returncode == 0, done.stderr[-4000:]
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith(f"{tmp_path / 'photo.png'}: ")
    printed = [item.rsplit(" ", 1) for item in line.split(": ", 1)[1].split(", ")]
    deployed = load(exported)
    z = deployed.predict(resize_image(image, SIZE, SIZE)[None])[0].astype(np.float64)
    probabilities = 1.0 / (1.0 + np.exp(-z))
    top = np.argsort(-probabilities)[:3]
    assert [name for name, _ in printed] == [deployed.classes[i] for i in top]
    np.testing.assert_allclose([float(p) for _, p in printed], probabilities[top], atol=5e-4)
    done = _python("-m", "apjax.deploy.predict", str(exported), str(tmp_path / "broken.png"))
    assert done.returncode != 0
    assert done.stderr.startswith(f"error: cannot read the image {tmp_path / 'broken.png'}")
    assert len(done.stderr.splitlines()[0].split(". ")) == 1  # one sentence
