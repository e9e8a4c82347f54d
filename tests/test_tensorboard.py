"""TensorBoard event files: what a run writes (read back without tensorboardX: TFRecord framing, CRCs and
the Event protobuf), resuming without duplicate steps, the switch, and the pictures of maps."""

import io
import json
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from apjax.attribution.overlay import denormalize, grid, overlay
from apjax.data.augment import MEAN, STD
from apjax.trainer.checkpoints import Checkpoints
from apjax.trainer.files import check_resume_config
from apjax.trainer.loop import Task, run_training
from apjax.trainer.state import TrainState
from apjax.trainer.tensorboard import SUBDIR, scalar_tag

# ------------------------------------------------------------------------------------------------
# Reading event files: TFRecords (uint64 length, masked CRC-32C of it, data, masked CRC-32C of the data).
# ------------------------------------------------------------------------------------------------


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def _masked_crc(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    c ^= 0xFFFFFFFF
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(logdir: Path) -> list:
    """Every Event of every event file of ``logdir``, files in name order (TensorBoard's), records checked."""
    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        raw, pos = path.read_bytes(), 0
        while pos < len(raw):
            header = raw[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", raw[pos + 8 : pos + 12])
            data = raw[pos + 12 : pos + 12 + length]
            (data_crc,) = struct.unpack("<I", raw[pos + 12 + length : pos + 16 + length])
            assert header_crc == _masked_crc(header) and data_crc == _masked_crc(data), path
            events.append(event_pb2.Event.FromString(data))
            pos += 16 + length
    return events


def summaries(events: list, purge: bool = True) -> dict:
    """``{(tag, step): scalar value or (h, w) of an image}``, as TensorBoard shows them: an event file
    that starts a session at step s (a resumed run's ``purge_step``) drops every earlier step >= s. Fails
    on a (tag, step) seen twice."""
    out = {}
    for e in events:
        if purge and e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START:
            out = {k: v for k, v in out.items() if k[1] < e.step}
        for v in e.summary.value:
            assert (v.tag, e.step) not in out, f"{v.tag} at step {e.step} twice"
            if v.HasField("image"):
                image = Image.open(io.BytesIO(v.image.encoded_image_string))
                out[v.tag, e.step] = (v.image.height, v.image.width, image.size[::-1])
            else:
                out[v.tag, e.step] = v.simple_value
    return out


def expected_scalars(workdir: Path) -> dict:
    """``{(tag, step): value}`` of metrics.jsonl: a train row's keys, a val row's val/ keys."""
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        val = any(k.startswith("val/") for k in row)
        for k, v in row.items():
            if k != "step" and not (val and k == "epoch"):
                out[scalar_tag(k), row["step"]] = v
    return out


def assert_scalars_match(workdir: Path) -> dict:
    got = summaries(read_events(workdir / SUBDIR))
    want = expected_scalars(workdir)
    scalars = {k: v for k, v in got.items() if not isinstance(v, tuple)}
    assert sorted(scalars) == sorted(want)
    for k, v in want.items():
        np.testing.assert_allclose(scalars[k], v, rtol=1e-6, err_msg=str(k))  # float32 in the event
    return got


# ------------------------------------------------------------------------------------------------
# A tiny training run (the session's teacher: tiny_config, one epoch).
# ------------------------------------------------------------------------------------------------


def test_a_tiny_run_writes_its_metrics_and_maps_to_tensorboard(teacher_dir):
    got = assert_scalars_match(teacher_dir)
    assert ("train/loss", 2) in got and ("val/mAP", 3) in got
    # One picture per evaluation: 4 val images of 32 x 32, the image and the teacher's Grad-CAM overlay.
    height, width = 2 + 4 * (32 + 2), 2 + 2 * (32 + 2)
    assert got["maps", 3] == (height, width, (height, width))
    assert sorted(k for k, v in got.items() if isinstance(v, tuple)) == [("maps", 3)]


# ------------------------------------------------------------------------------------------------
# The loop's writer, on a task of two numbers (fast): resume, the switch, errors.
# ------------------------------------------------------------------------------------------------


class _Batches:
    steps_per_epoch = 3

    def iterate(self, start, total):
        for s in range(start, total):
            yield s, {"x": jnp.float32(s)}


@jax.jit
def _step(state, batch):
    params = {"w": state.params["w"] + batch["x"]}
    metrics = {"loss": jnp.sum(params["w"]) / 100, "lr": jnp.float32(0.1)}
    return state.replace(step=state.step + 1, params=params), metrics


def _task() -> Task:
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params={"w": jnp.zeros(2, jnp.float32)},
        batch_stats={},
        opt_state={},
        rng=jnp.zeros(2, jnp.uint32),
    )
    return Task(
        init_state=lambda: state,
        train_step=_step,
        evaluate=lambda s, cache: {"mAP": float(np.tanh(s.params["w"][0] / 10)), "bce": 0.5},
        figure=lambda s, cache: np.full((6, 4, 3), int(s.step), np.uint8),
    )


def _config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(
        dict(task="toy", num_epochs=3, lr_decay_epochs=(), best_metric="mAP", log_every_steps=2,
             eval_every_epochs=1, checkpoint_every_epochs=1, tensorboard=True)
    )  # fmt: skip
    c.update(overrides)
    return c


def _train(config, workdir):
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    return run_training(config, workdir, _task(), {"val": None}, _Batches(), mesh)


def test_resume_after_a_kill_appends_without_duplicate_steps(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    save = Checkpoints.save_latest

    def killed_at_step_6(self, state, meta):
        if meta["step"] == 6:  # dies after logging epoch 2, before its checkpoint
            raise KeyboardInterrupt
        save(self, state, meta)

    monkeypatch.setattr(Checkpoints, "save_latest", killed_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        _train(_config(), workdir)
    monkeypatch.undo()
    # The writer was closed on the way out: the killed run's last rows are on disk.
    killed = summaries(read_events(workdir / SUBDIR))
    assert ("val/mAP", 6) in killed and ("maps", 6) in killed and ("train/loss", 6) in killed

    _train(_config(), workdir)  # resumes from step 3
    events = read_events(workdir / SUBDIR)
    assert len(list((workdir / SUBDIR).iterdir())) == 2  # a new event file for the resumed run
    with pytest.raises(AssertionError, match="twice"):  # the raw files do hold steps 4..6 twice ...
        summaries(events, purge=False)
    got = assert_scalars_match(workdir)  # ... and TensorBoard sees each once, equal to metrics.jsonl
    assert sorted(k for k in got if k[0] == "maps") == [("maps", 3), ("maps", 6), ("maps", 9)]
    assert got["maps", 9][:2] == (6, 4)
    _train(_config(), workdir)  # finished: nothing to train, no new event file
    assert len(list((workdir / SUBDIR).iterdir())) == 2


def test_tensorboard_false_writes_nothing_and_toggling_it_still_resumes(tmp_path):
    workdir = tmp_path / "run"
    _train(_config(num_epochs=1, tensorboard=False), workdir)
    assert (workdir / "metrics.jsonl").exists() and not (workdir / SUBDIR).exists()
    old = _config(num_epochs=1, tensorboard=False)
    (workdir / "config.json").write_text(old.to_json())
    check_resume_config(workdir, _config(num_epochs=2))  # switching it back on is a resumable change
    del old["tensorboard"]  # a workdir saved before the field existed
    (workdir / "config.json").write_text(old.to_json())
    check_resume_config(workdir, _config(num_epochs=1))
    _train(_config(num_epochs=2), workdir)  # on again: epoch 2 only
    got = summaries(read_events(workdir / SUBDIR))
    assert min(step for _, step in got) == 4 and ("val/mAP", 6) in got


# ------------------------------------------------------------------------------------------------
# Pictures: the overlay, the grid, and the maps of a teacher and a student.
# ------------------------------------------------------------------------------------------------


def test_overlay_blends_the_colormap_over_the_denormalised_image():
    rgb = np.array([[[10, 20, 30], [200, 100, 0]]], np.uint8)
    x = (rgb / 255.0 - np.asarray(MEAN)) / np.asarray(STD)
    np.testing.assert_array_equal(denormalize(x), rgb)
    m = np.array([[0.0, 5.0]])
    out = overlay(rgb, m, alpha=0.5)
    # jet at 0 is dark blue (0, 0, 0.5), at 1 dark red (0.5, 0, 0).
    np.testing.assert_allclose(out[0, 0], np.rint(0.5 * rgb[0, 0] + 0.5 * np.array([0, 0, 127.5])), atol=1)
    np.testing.assert_allclose(out[0, 1], np.rint(0.5 * rgb[0, 1] + 0.5 * np.array([127.5, 0, 0])), atol=1)
    np.testing.assert_array_equal(overlay(rgb, np.zeros((1, 2)), alpha=0.0), rgb)
    g = grid([[rgb, out], [out, rgb]], pad=1)
    assert g.shape == (1 + 2 * 2, 1 + 2 * 3, 3) and (g[0] == 255).all()
    np.testing.assert_array_equal(g[3:4, 1:3], out)  # row 1, column 0
    np.testing.assert_array_equal(g[3:4, 4:6], rgb)


@pytest.mark.default_xla
def test_map_grid_draws_teacher_and_student_maps_side_by_side(teacher_dir):
    from apjax.evaluators.context import load_run
    from apjax.trainer.config import load_data
    from apjax.trainer.map_grid import MapGrid

    run = load_run(teacher_dir, "best")
    val = load_data(run.config, splits=("val",))["val"]
    state = TrainState(step=0, params=run.variables["params"], batch_stats=run.variables["batch_stats"],
                       opt_state={}, rng=None)  # fmt: skip
    taps = ("conv4_3", "conv5_3")
    figure = MapGrid(run.model, 32, taps, reference=(run.model, run.variables), n=3)
    picture = figure(state, val)
    assert picture.shape == (2 + 3 * 34, 2 + 5 * 34, 3) and picture.dtype == np.uint8
    # The same net as teacher and student: the two halves of each row are the same maps.
    for row in range(3):
        top = 2 + row * 34
        teacher = picture[top : top + 32, 2 + 34 : 2 + 3 * 34]
        student = picture[top : top + 32, 2 + 3 * 34 : 2 + 5 * 34]
        np.testing.assert_array_equal(teacher, student)
    np.testing.assert_array_equal(figure(state, val), picture)  # deterministic
