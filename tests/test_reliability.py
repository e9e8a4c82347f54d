"""Reliability: determinism, SIGKILL at random points, non-finite training, a full disk, bad inputs.

Whole runs go through ``train.py`` in subprocesses (8 CPU devices each) driven by :data:`DRIVER`, which
hooks the run to report what it did (every checkpoint saved or restored with a hash of its state, the
image rows it read, the files it wrote) and to misbehave on cue (SIGKILL at a chosen event, NaN
parameters after a step, a full disk during a checkpoint's commit). The runs share a persistent
compilation cache, so only the first one compiles. The uninterrupted run (``reference``) is shared with
tests/test_distributed.py.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from apjax import cli, metrics
from apjax.compress import distill
from apjax.tasks import train_and_evaluate
from apjax.trainer.checkpoints import restore_state
from apjax.trainer.config import load_data
from apjax.trainer.files import write_json_atomic
from configs import vgg16_kd
from tests.test_train import tiny_config

# One xdist worker runs this file and tests/test_distributed.py: they share the session's reference run and
# its background runs, which another worker would start a second time.
pytestmark = pytest.mark.xdist_group("reliability")

ROOT = Path(__file__).resolve().parents[1]
# Five convs and five pools: the training loop of VGG16/8 (32px input) at a fraction of its compile time.
MODEL = "8,M,8,M,16,M,16,M,16,M"
TIMEOUT = 300


def rel_config(data_dir, **overrides):
    """tiny_config with a five-conv net for 2 epochs of 3 steps.

    A run logs at steps 2, 3, 4, 6, evaluates 4 times (epochs 1 and 2, the final state, the best
    checkpoint) and saves latest/3, best/3, latest/6 and possibly best/6.
    """
    c = tiny_config(data_dir)
    c.model = MODEL
    c.num_epochs, c.lr_decay_epochs = 2, (1,)
    for k, v in overrides.items():
        c[k] = v
    return c


# The subprocess: hooks into apjax, then runs train.py as `python train.py --config=... --workdir=...`.
# Its one argument is a JSON object: root, config_file, workdir, events (a JSON-lines file it appends
# to), and optional coordinator/num_processes/process_id (jax.distributed), kill [event, occurrence,
# delay_s], sync_saves (wait for each checkpoint to be complete), poison_after (a step after which the
# parameters become NaN), enospc ('latest/6': the commit of that checkpoint fails with ENOSPC),
# record_rows, audit (a folder whose writes are reported), flags (more command-line flags).
DRIVER = textwrap.dedent(
    r"""
    import atexit, errno, hashlib, json, os, runpy, signal, sys, threading
    args = json.loads(sys.argv[1])
    sys.path.insert(0, args["root"])
    import jax
    if args.get("coordinator"):
        jax.distributed.initialize(
            coordinator_address=args["coordinator"], num_processes=args["num_processes"],
            process_id=args["process_id"])
    import numpy as np
    from apjax import tasks
    from apjax.trainer import evaluation
    from apjax.trainer.checkpoints import Checkpoints
    from orbax.checkpoint._src.path import async_path

    def log(**row):
        with open(args["events"], "a") as f:
            f.write(json.dumps(row) + "\n")

    def fingerprint(tree):
        h = hashlib.sha256()
        for leaf in jax.tree.leaves(jax.device_get(tree)):
            h.update(np.ascontiguousarray(leaf).tobytes())
        return h.hexdigest()

    counts = {}
    def event(name):
        counts[name] = counts.get(name, 0) + 1
        kill = args.get("kill")
        if kill and kill[0] == name and counts[name] == kill[1]:
            log(event="kill", at=name, n=kill[1], delay=kill[2])
            if kill[2] <= 0:
                os.kill(os.getpid(), signal.SIGKILL)
            timer = threading.Timer(kill[2], os.kill, (os.getpid(), signal.SIGKILL))
            timer.start()
            atexit.register(timer.join)  # a run that ends first is killed on its way out

    save = Checkpoints._save
    def _save(manager, state, meta):
        params = jax.device_get(state.params)
        finite = all(bool(np.isfinite(x).all()) for x in jax.tree.leaves(params))
        log(event="save", which=os.path.basename(str(manager.directory)), step=int(meta["step"]),
            fingerprint=fingerprint(state), finite=finite)
        save(manager, state, meta)
        if args.get("sync_saves"):
            manager.wait_until_finished()
        event("save")
    Checkpoints._save = staticmethod(_save)

    restore = Checkpoints.restore
    def _restore(manager, abstract_state):
        out = restore(manager, abstract_state)
        if out is not None:
            log(event="restore", which=os.path.basename(str(manager.directory)), step=int(out[1]["step"]),
                fingerprint=fingerprint(out[0]))
        return out
    Checkpoints.restore = staticmethod(_restore)

    evaluate = evaluation.evaluate
    def _evaluate(*a, **k):
        event("evaluate")
        return evaluate(*a, **k)
    evaluation.evaluate = _evaluate

    build_task = tasks.build_task
    def _build_task(*a, **k):
        task = build_task(*a, **k)
        step = task.train_step
        def train_step(state, batch):
            state, metrics = step(state, batch)
            event("step")
            if args.get("poison_after") is not None and int(state.step) == args["poison_after"]:
                state = state.replace(params=jax.tree.map(lambda p: p * float("nan"), state.params))
            return state, metrics
        task.train_step = train_step
        return task
    tasks.build_task = _build_task

    write_text = async_path.write_text
    async def _write_text(path, text, *a, **k):
        folder = path.parent
        if path.name == "commit_success.txt" and folder.name.endswith(".orbax-checkpoint-tmp"):
            if folder.parent.name in ("latest", "best"):  # the commit of a whole checkpoint
                name = folder.parent.name + "/" + folder.name.split(".")[0]
                if args.get("enospc") == name:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
                event("commit")
        return await write_text(path, text, *a, **k)
    async_path.write_text = _write_text

    if args.get("record_rows"):
        load_data = tasks.load_data
        class Rows:
            def __init__(self, split, array):
                self.split, self.array = split, array
            def __len__(self):
                return len(self.array)
            def __getattr__(self, name):
                return getattr(self.array, name)
            def __getitem__(self, idx):
                log(event="rows", split=self.split, rows=np.asarray(idx).tolist())
                return self.array[idx]
        def _load_data(config, splits=("train", "val")):
            data = load_data(config, splits)
            for split, cache in data.items():
                cache.images = Rows(split, cache.images)
            return data
        tasks.load_data = _load_data

    if args.get("audit"):
        def audit(name, a):
            if name == "open":
                mode, fl = a[1], a[2]
                writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
                    isinstance(fl, int) and fl & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
                paths = [a[0]] if writing else []
            elif name in ("os.rename", "os.link", "os.symlink"):
                paths = [a[0], a[1]]
            elif name in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate", "os.chmod"):
                paths = [a[0]]
            else:
                return
            for p in paths:
                if isinstance(p, (str, bytes, os.PathLike)) and os.fsdecode(p).startswith(args["audit"]):
                    log(event="write", what=name, path=os.fsdecode(p))
        sys.addaudithook(audit)

    sys.argv = ["train.py", "--config=" + args["config_file"], "--workdir=" + args["workdir"]]
    sys.argv += args.get("flags", [])
    runpy.run_path(os.path.join(args["root"], "train.py"), run_name="__main__")
    """
)

CONFIG_FILE = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from tests.test_reliability import rel_config

    def get_config():
        return rel_config({data!r})
    """
)


@dataclasses.dataclass
class Env:
    root: Path
    data: Path
    config_file: Path
    jax_cache: Path

    def config(self, **overrides):
        return rel_config(self.data, **overrides)


def write_config_file(path: Path, data: Path) -> Path:
    path.write_text(CONFIG_FILE.format(root=str(ROOT), data=str(data)))
    return path


def subprocess_env(env: Env, devices: int = 8) -> dict:
    return {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "true",  # as tests/conftest.py sets for this process
        "JAX_COMPILATION_CACHE_DIR": str(env.jax_cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def driver_command(env: Env, workdir: Path, events: Path, **args) -> list[str]:
    args = {
        "root": str(ROOT),
        "config_file": str(args.pop("config_file", env.config_file)),
        "workdir": str(workdir),
        "events": str(events),
        **args,
    }
    return [sys.executable, "-c", DRIVER, json.dumps(args)]


def run_driver(env: Env, name: str, **args) -> tuple[subprocess.CompletedProcess, list[dict], Path]:
    """Runs the driver in ``<root>/<name>``; returns (completed process, its events, its workdir)."""
    workdir, events = env.root / name, env.root / f"{name}.events.jsonl"
    cmd = driver_command(env, workdir, events, **args)
    r = subprocess.run(cmd, env=subprocess_env(env), capture_output=True, text=True, timeout=TIMEOUT)
    return r, read_events(events), workdir


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def saves(events: list[dict]) -> dict[tuple[str, int], str]:
    return {(e["which"], e["step"]): e["fingerprint"] for e in events if e["event"] == "save"}


def error_line(r: subprocess.CompletedProcess) -> str:
    """The 'error: ...' line a command line ended with."""
    found = re.findall(r"(?:^|\])error: ([^\r\n]*)", r.stderr, flags=re.M)  # tqdm may precede it
    assert found, r.stderr[-3000:]
    return found[-1]


def assert_one_sentence(message: str, *fragments: str) -> None:
    """One sentence (one line, one final full stop or question mark) that holds every fragment."""
    assert "\n" not in message and message[-1] in ".?", message
    assert ". " not in message and "? " not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def checkpoint_names(workdir: Path, which: str) -> list[str]:
    folder = workdir / "checkpoints" / which
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def restore_params(env: Env, workdir: Path, which: str = "latest", config=None):
    _, state, meta = restore_state(config or env.config(), workdir, which)
    return jax.device_get(state), meta


def metric_rows(workdir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in rows]


# The session fixtures below are imported by tests/test_distributed.py too, where pytest would build them
# a second time: their values are kept here, once per session.
_SESSION: dict = {}


@pytest.fixture(scope="session")
def reliability_env(tmp_path_factory) -> Env:
    """The data (generated once, here), the config file of rel_config and a compilation cache."""
    if "env" not in _SESSION:
        root = tmp_path_factory.mktemp("reliability")
        env = Env(root, root / "data", root / "rel_config.py", root / "jax_cache")
        load_data(env.config())
        write_config_file(env.config_file, env.data)
        _SESSION["env"] = env
    return _SESSION["env"]


@pytest.fixture(scope="session")
def reference(reliability_env):
    """An uninterrupted run (8 CPU devices, one process): (events, workdir)."""
    if "reference" not in _SESSION:
        r, events, workdir = run_driver(reliability_env, "reference")
        assert r.returncode == 0, r.stderr[-3000:]
        found = saves(events)
        assert {("latest", 3), ("best", 3), ("latest", 6)} <= set(found), found
        assert all(e["finite"] for e in events if e["event"] == "save")
        _SESSION["reference"] = events, workdir
    return _SESSION["reference"]


# Whole runs that depend on nothing but the reference's compilation cache, by the test that checks each.
# They start together in the background (one at a time, beside whatever the main thread runs: the kill
# chain, the two-process run), so that two cores stay busy.
BACKGROUND_RUNS = {
    "test_same_config_and_seed_train_to_identical_bits": ("again", {}),
    "test_nan_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint": ("nan", {"poison_after": 4}),
    "test_non_finite_parameters_are_never_checkpointed": (
        "nan_params",
        {"poison_after": 3, "flags": ["--config.eval_every_epochs=2"]},
    ),
    "test_disk_full_during_a_checkpoint_ends_in_one_sentence_keeping_the_last": (
        "disk_full",
        {"enospc": "latest/6"},
    ),
}


@pytest.fixture(scope="session")
def background_runs(request, reliability_env, reference):
    """{test name: future of run_driver's result} for the selected tests of BACKGROUND_RUNS."""
    selected = [item.name for item in request.session.items if item.name in BACKGROUND_RUNS]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        yield {
            test: pool.submit(
                run_driver, reliability_env, *BACKGROUND_RUNS[test][:1], **BACKGROUND_RUNS[test][1]
            )
            for test in selected
        }


def background_run(background_runs, request) -> tuple[subprocess.CompletedProcess, list[dict], Path]:
    return background_runs[request.node.name].result(timeout=4 * TIMEOUT)


# ------------------------------------------------------------------------------------------------
# Determinism.
# ------------------------------------------------------------------------------------------------


def test_same_config_and_seed_train_to_identical_bits(reliability_env, reference, background_runs, request):
    ref_events, ref_dir = reference
    r, events, workdir = background_run(background_runs, request)
    assert r.returncode == 0, r.stderr[-3000:]
    assert saves(events) == saves(ref_events)  # every checkpoint, bit for bit
    a, meta_a = restore_params(reliability_env, ref_dir)
    b, meta_b = restore_params(reliability_env, workdir)
    assert meta_a == meta_b and meta_a["step"] == 6
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    final_a = json.loads((ref_dir / "final_metrics.json").read_text())
    final_b = json.loads((workdir / "final_metrics.json").read_text())
    assert final_a == final_b
    assert metric_rows(ref_dir) == metric_rows(workdir)


# ------------------------------------------------------------------------------------------------
# Crashes.
# ------------------------------------------------------------------------------------------------

# Events a run certainly goes through, by the step it resumes from: train steps, evaluations (epoch
# ends, the final state, the best checkpoint), checkpoint saves and their commits (best/6 may not happen).
_EVENTS_FROM = {
    0: {"step": 6, "evaluate": 4, "save": 3, "commit": 3},
    3: {"step": 3, "evaluate": 3, "save": 1, "commit": 1},
    6: {"evaluate": 2},
}


def _kill_point(rng: np.random.Generator, resumed_from: int) -> list:
    """[event, occurrence, delay_s]: SIGKILL that long after that event (a commit: inside it, at once)."""
    feasible = _EVENTS_FROM[resumed_from]
    kind = str(rng.choice(sorted(feasible)))
    occurrence = int(rng.integers(1, feasible[kind] + 1))
    delay = 0.0 if kind == "commit" else round(float(rng.uniform(0.0, 0.3)), 3)
    return [kind, occurrence, delay]


def _resumed_from(workdir: Path) -> int:
    steps = [int(n) for n in checkpoint_names(workdir, "latest") if n.isdigit()]
    return max(steps, default=0)


def test_sigkill_at_random_points_then_resume_gives_identical_bits(reliability_env, reference):
    """Three SIGKILLs, each followed by a rerun of the same command. The first lands inside the commit of
    latest/3, after best/3 is complete (that run waits for each save); the other two at seeded random
    events of the run (a train step, an evaluation, a save or a commit) plus a random delay. The final
    state equals the uninterrupted run's bit for bit, and every checkpoint restored or saved on the way
    is, bit for bit, the one the uninterrupted run saved at that step."""
    ref_events, ref_dir = reference
    ref_saves = saves(ref_events)
    rng = np.random.default_rng(int(os.environ.get("APJAX_KILL_SEED", "20201206")))  # to try other points
    env, name = reliability_env, "killed"
    workdir = env.root / name
    first = ["commit", 2, 0.0]
    r, events, _ = run_driver(env, name, kill=first, sync_saves=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    # A half-written latest/3 beside a complete best/3: resuming must neither load the first nor trip
    # over the second when it saves best/3 again.
    assert checkpoint_names(workdir, "latest") == ["3.orbax-checkpoint-tmp"]
    assert checkpoint_names(workdir, "best") == ["3"]
    kills = [first]
    for _ in range(2):
        point = _kill_point(rng, _resumed_from(workdir))
        r, run_events, _ = run_driver(env, name, kill=point)
        events += run_events
        assert r.returncode == -signal.SIGKILL, (kills, point, r.stderr[-3000:])
        kills.append(point)
    r, run_events, _ = run_driver(env, name)
    events += run_events
    assert r.returncode == 0, (kills, r.stderr[-3000:])
    restored = [e for e in events if e["event"] == "restore"]
    assert restored, "the runs after a kill resumed from a checkpoint"
    for e in restored + [e for e in events if e["event"] == "save"]:
        assert ref_saves[(e["which"], e["step"])] == e["fingerprint"], (e, kills)
    assert _resumed_from(workdir) == 6
    a, _ = restore_params(env, ref_dir)
    b, _ = restore_params(env, workdir)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    final_a = json.loads((ref_dir / "final_metrics.json").read_text())
    assert json.loads((workdir / "final_metrics.json").read_text()) == final_a
    print(f"kill points: {kills}")


# ------------------------------------------------------------------------------------------------
# Non-finite values.
# ------------------------------------------------------------------------------------------------


def test_nan_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint(
    reliability_env, reference, background_runs, request
):
    # NaN parameters after step 4: the loss of step 5 is NaN, found at the log of step 6 (the end of
    # epoch 2), before that epoch's evaluation and checkpoint.
    r, events, workdir = background_run(background_runs, request)
    assert r.returncode == 1, r.stderr[-3000:]
    latest = workdir / "checkpoints" / "latest"
    assert_one_sentence(
        error_line(r), "training became non-finite (loss=nan", "by step 6", f"step 3 in {latest}"
    )
    assert checkpoint_names(workdir, "latest") == ["3"]
    assert all(e["finite"] for e in events if e["event"] == "save")
    state, meta = restore_params(reliability_env, workdir)
    assert meta["step"] == 3
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
    best, _ = restore_params(reliability_env, workdir, "best")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(best.params))
    assert not (workdir / "final_metrics.json").exists()
    assert all(np.isfinite(v) for row in metric_rows(workdir) for v in row.values())


def test_non_finite_parameters_are_never_checkpointed(background_runs, request):
    r, events, workdir = background_run(background_runs, request)
    assert r.returncode == 1, r.stderr[-3000:]
    assert_one_sentence(
        error_line(r), "the parameters became non-finite by step", "the last good checkpoint is"
    )
    assert all(e["finite"] for e in events if e["event"] == "save"), [
        (e["which"], e["step"], e["finite"]) for e in events if e["event"] == "save"
    ]


# ------------------------------------------------------------------------------------------------
# A full disk.
# ------------------------------------------------------------------------------------------------


def test_disk_full_during_a_checkpoint_ends_in_one_sentence_keeping_the_last(
    reliability_env, reference, background_runs, request
):
    ref_events, _ = reference
    r, events, workdir = background_run(background_runs, request)
    assert r.returncode == 1, r.stderr[-3000:]
    message = error_line(r)
    half = workdir / "checkpoints" / "latest" / "6.orbax-checkpoint-tmp"
    assert_one_sentence(message, "the disk is full", str(half), "free some space", "run the same command")
    assert "Traceback" not in r.stderr.split("error: ")[-1]
    # The previous complete checkpoint is still there and loads, bit for bit what was saved.
    assert checkpoint_names(workdir, "latest") == ["3", "6.orbax-checkpoint-tmp"]
    state, meta = restore_params(reliability_env, workdir)
    assert meta["step"] == 3
    assert (
        saves(ref_events)[("latest", 3)]
        == [e["fingerprint"] for e in events if e["event"] == "save" and e["which"] == "latest"][0]
    )
    assert not (workdir / "final_metrics.json").exists()
    assert not [p for p in workdir.iterdir() if p.name.startswith(".")]


def test_disk_full_while_writing_json_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    path = tmp_path / "final_metrics.json"
    write_json_atomic(path, {"old": 1})
    real_write_text = Path.write_text

    def write_half_then_fail(self, text, *a, **k):
        real_write_text(self, text[: len(text) // 2], *a, **k)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", write_half_then_fail)
    with pytest.raises(OSError) as e:
        write_json_atomic(path, {"new": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_metrics.json"]
    assert cli.is_user_error(e.value)
    tmp = f".final_metrics.json.tmp{os.getpid()}"
    assert_one_sentence(cli.error_message(e.value), "the disk is full", tmp)


def test_disk_full_reported_by_tensorstore_names_the_file():
    # What Orbax raised on a real full tmpfs (abridged): a ValueError carrying the OS error.
    path = "/w/checkpoints/latest/6.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/d/3b11"
    error = ValueError(
        'RESOURCE_EXHAUSTED: Error writing "params.conv2_1.kernel/0" in OCDBT database at local file '
        f'"/w/checkpoints/latest/6.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": '
        f'Failed writing: "{path}": Failed to write 190 bytes to file 9: No space left on device '
        "[os_error_code='28'] [tensorstore_spec='{\"driver\": \"zarr\"}']"
    )
    wrapped = RuntimeError("background save failed")
    wrapped.__cause__ = error
    assert cli.is_user_error(wrapped)
    assert_one_sentence(cli.error_message(wrapped, "/w"), "the disk is full", path)
    assert cli.disk_full_path(ValueError("logits contains NaN")) is None
    assert cli.error_message(ValueError("x is wrong; do y.")) == "x is wrong; do y."


def test_only_config_errors_non_finite_runs_and_a_full_disk_end_in_one_sentence():
    from apjax.errors import ConfigError, MissingFileError, UnwritableError

    assert cli.is_user_error(ConfigError("x is wrong; do y."))
    assert cli.is_user_error(MissingFileError("no run in /w; train first."))
    assert cli.is_user_error(FloatingPointError("training became non-finite by step 6."))
    # Anything else is a bug (or the machine's failure) and keeps its traceback.
    for bug in (ValueError("bad shape"), KeyError("conv9"), OSError("device lost"), ImportError("no x")):
        assert not cli.is_user_error(bug), bug
    # The variants are still the built-in errors the same mistakes raised before.
    assert issubclass(MissingFileError, FileNotFoundError) and issubclass(UnwritableError, PermissionError)
    assert issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------------------------------------
# Bad inputs (those not covered in test_voc.py, test_train.py, test_distill.py).
# ------------------------------------------------------------------------------------------------


def test_voc_image_without_objects_is_kept_with_all_zero_labels(tmp_path):
    from apjax.data import voc
    from tests.test_voc import TRAIN_IDS, write_fake_voc

    manual = tmp_path / "manual"
    root, _ = write_fake_voc(manual)
    empty = TRAIN_IDS[1]
    (root / "Annotations" / f"{empty}.xml").write_text(
        f"<annotation><filename>{empty}.jpg</filename><size><width>48</width><height>36</height>"
        "<depth>3</depth></size><segmented>0</segmented></annotation>"
    )
    voc.prepare_voc(str(tmp_path / "data"), manual_dir=str(manual))
    source = voc.load_voc_split(str(tmp_path / "data"), "train")
    labels = {}
    for i in range(len(source)):
        ex = source[i]
        image_id = ex["image_id"].decode() if isinstance(ex["image_id"], bytes) else str(ex["image_id"])
        labels[image_id] = np.asarray(ex["labels"])
    assert sorted(labels) == sorted(TRAIN_IDS)
    assert labels[empty].sum() == 0 and all(labels[i].sum() > 0 for i in TRAIN_IDS if i != empty)
    # Multi-label metrics take such an image as a negative for every class.
    y = np.stack([labels[i] for i in TRAIN_IDS])
    x = np.random.default_rng(0).normal(size=y.shape)
    keep = y.sum(1) > 0
    m = metrics.classification_metrics(x, y)
    assert np.isfinite(m["mAP"]) and m["per_image_AP"] == metrics.per_image_ap(x[keep], y[keep])


def test_teacher_of_another_class_count_is_refused(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    tc = rel_config(tmp_path / "data")
    (teacher / "config.json").write_text(tc.to_json_best_effort())
    c = vgg16_kd.get_config("data=synthetic,small,method=sswa")
    c.data = rel_config(tmp_path / "data").data
    c.data.synthetic.num_classes = 8
    c.distill.teacher_workdir = str(teacher)
    with pytest.raises(ValueError) as e:
        distill.teacher_config(c)
    assert_one_sentence(str(e.value), f"the teacher in {teacher}", "10 classes", "with 8", "same data")


def test_misspelled_config_override_on_the_command_line(reliability_env):
    # train.py's own parsing (absl's app.run hands ml_collections' AttributeError over as a traceback).
    cmd = [sys.executable, str(ROOT / "train.py"), f"--config={reliability_env.config_file}"]
    cmd += [f"--workdir={reliability_env.root / 'never'}", "--config.optimizer.learning_rat=0.1"]
    r = subprocess.run(cmd, env=subprocess_env(reliability_env), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert_one_sentence(
        error_line(r), "--config.optimizer.learning_rat names no field", "--config.optimizer.learning_rate?"
    )
    assert not (reliability_env.root / "never").exists()


def test_config_flag_errors_in_one_sentence(capsys):
    def parse(*argv):
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "config", flag_values=values, lock_config=True)
        with pytest.raises(SystemExit) as e:
            cli.parse_flags(["prog", *argv], flag_values=values)
        return str(e.value.code).removeprefix("error: ")

    base = "--config=configs/teacher_vgg16.py:data=synthetic,small"
    assert_one_sentence(parse(base, "--config.data.imagesize=3"), "did you mean --config.data.image_size?")
    assert_one_sentence(parse(base, "--config.zzz=3"), "--config.zzz names no field", "check its spelling")
    message = parse("--config=configs/teacher_vgg16.py:data=synthetic,smal")
    assert_one_sentence(message, "unknown config argument 'smal'", "the arguments are")
    assert message.startswith("--config=configs/teacher_vgg16.py:data=synthetic,smal: unknown config")
    assert "Traceback" not in message


def test_bad_flag_values_name_their_own_flag():
    """A refused value of an ordinary flag names that flag (not --config), and a missing required one."""

    def parse(*argv):
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "config", flag_values=values, lock_config=True)
        flags.DEFINE_bool("distributed", False, "", flag_values=values)
        flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "", flag_values=values)
        flags.DEFINE_integer("batch_size", 32, "", flag_values=values)
        flags.DEFINE_string("out", None, "", flag_values=values)
        flags.mark_flag_as_required("out", flag_values=values)
        with pytest.raises(SystemExit) as e:
            cli.parse_flags(["prog", *argv], flag_values=values)
        return str(e.value.code).removeprefix("error: ")

    base = ("--config=configs/teacher_vgg16.py:data=synthetic,small", "--out=o")
    for flag, reason in [
        ("--distributed=maybe", "Non-boolean argument to boolean flag"),
        ("--checkpoint=bset", "value should be one of <best|latest>"),
        ("--batch_size=abc", "invalid literal for int()"),
    ]:
        message = parse(*base, flag)
        assert message.startswith(f"{flag} is not a valid value for {flag.split('=')[0]} ({reason}"), message
        assert_one_sentence(message, "pass --helpshort")
    message = parse(base[0])
    assert message == "--out is required; give it a value (pass --helpshort to see what it takes)."


def test_unwritable_workdir_and_bad_batch_size_write_nothing(tmp_path, reliability_env):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError) as e:
        train_and_evaluate(reliability_env.config(), blocker / "run")
    assert_one_sentence(str(e.value), f"cannot create the workdir {blocker / 'run'}", "writable --workdir")
    with pytest.raises(ValueError) as e:
        train_and_evaluate(reliability_env.config(batch_size=12), tmp_path / "run")
    assert_one_sentence(str(e.value), "batch_size=12 does not split evenly over 8 devices", "multiple of 8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_read_only_workdir(tmp_path, reliability_env):
    workdir = tmp_path / "run"
    workdir.mkdir()
    workdir.chmod(0o555)
    try:
        with pytest.raises(PermissionError) as e:
            train_and_evaluate(reliability_env.config(), workdir)
    finally:
        workdir.chmod(0o755)
    assert_one_sentence(str(e.value), f"the workdir {workdir} is not writable", "writable --workdir")
    assert list(workdir.iterdir()) == []


def _copy_data(env: Env, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(env.data, data)
    return data


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def test_damaged_host_cache_names_the_folder(tmp_path, reliability_env):
    data = _copy_data(reliability_env, tmp_path)
    (cache,) = (data / "apjax_cache").glob("*/train_36")
    _truncate(cache / "images.npy")
    with pytest.raises(ValueError) as e:
        load_data(rel_config(data))
    assert_one_sentence(str(e.value), f"the host cache {cache} is damaged", "delete that folder")


def test_damaged_prepared_dataset_names_the_folder_and_leaves_no_cache(tmp_path, reliability_env):
    data = _copy_data(reliability_env, tmp_path)
    shutil.rmtree(data / "apjax_cache")
    (records,) = (data / "apjax_synthetic").glob("*/1.0.0/*-train.array_record-*")
    _truncate(records)
    with pytest.raises((ValueError, OSError)) as e:  # as the reader failed: a RuntimeError, an OSError
        load_data(rel_config(data))
    assert_one_sentence(
        str(e.value), "of the prepared dataset", str(records.parent), "delete that folder and prepare"
    )
    assert not (data / "apjax_cache").exists() or not any((data / "apjax_cache").rglob("*.npy"))
