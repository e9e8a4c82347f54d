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
from apjax.deploy.export import export_run
from apjax.deploy.load import EXPLAIN_FILE, FORMAT_VERSION, META_FILE, PREDICT_FILE, WEIGHTS_FILE
from apjax.deploy.predict import resize_image
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
        "apjax.errors",
    ]
    child = np.load(tmp_path / "out.npz")
    deployed = load(exported)
    logits, (explained, maps) = deployed.predict(images), deployed.explain(images)
    _close(child["logits"], logits)
    _close(child["explained"], explained)
    _close(child["maps"], maps)


def test_a_quantized_run_exports_its_quantized_forward(teacher_dir, tmp_path):
    """A quantize run's workdir (here the teacher's checkpoints under an int8 quantize config: the same
    variables) exports the qwix-quantized forward pass that eval.py evaluates."""
    workdir = tmp_path / "quant_int8"
    shutil.copytree(teacher_dir, workdir, ignore=shutil.ignore_patterns("tensorboard"))
    config = json.loads((workdir / "config.json").read_text())
    config.update(task="quantize", quant={"bits": "int8", "source_workdir": ""},
                  distill={"method": "naive", "teacher_workdir": str(teacher_dir)})  # fmt: skip
    (workdir / "config.json").write_text(json.dumps(config))
    meta = export_run(workdir, tmp_path / "export")
    assert meta["compression"]["task"] == "quantize" and meta["compression"]["method"] == "naive"
    assert meta["compression"]["quantization"]["bits"] == "int8"
    run = load_run(workdir, "best")
    deployed = load(tmp_path / "export")
    images = _images(3, 3)
    _check_against_eval(run, deployed, images)
    float_logits, _ = _eval_outputs(load_run(teacher_dir, "best"), images)
    assert not np.allclose(deployed.predict(images), float_logits, rtol=0, atol=1e-4)  # it does quantize


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
