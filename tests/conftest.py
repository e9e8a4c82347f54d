"""Test-wide settings: eight host devices (for sharding tests), short compiles on the CPU, one compilation
cache for the session, and how many pytest-xdist workers ``-n auto`` starts."""

import os
from pathlib import Path

# Must be set before jax initialises its backends: lets tests build a 'data' mesh of 8 CPU devices.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
# XLA:CPU's older elemental emitters compile a tiny run's programs in about three quarters of the time of
# its fusion emitters (a 1-epoch tiny VGG teacher: 9.1 to 9.9 s against 11.8 to 13.4 s, 2026-12-03). They
# round some fused programs differently, so a test that compares two different programs bit for bit (the
# ``default_xla`` mark) runs in a child pytest under XLA's own flags, the ones users run
# (:func:`pytest_pyfunc_call`).
# XLA aborts on a flag it does not know (jaxlib 0.12 dropped this one), so a child python tries it first.
FAST_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"
IN_DEFAULT_XLA_CHILD = bool(os.environ.get("APJAX_TEST_DEFAULT_XLA_CHILD"))


def _xla_accepts(flag: str) -> bool:
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS=f"{os.environ['XLA_FLAGS']} {flag}", JAX_PLATFORMS="cpu")
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    return subprocess.run(probe, env=env, capture_output=True).returncode == 0


if (
    not IN_DEFAULT_XLA_CHILD
    and "--xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]
    and _xla_accepts(FAST_COMPILE_FLAG)
):
    os.environ["XLA_FLAGS"] += " " + FAST_COMPILE_FLAG

# One persistent compilation cache for the session, shared with the xdist workers (they inherit this
# process's environment) and the subprocesses the tests start: many tests jit the same computation (the
# same tiny nets, steps and evaluations) under new Python closures, which jax's in-memory caches cannot
# see; the persistent cache is keyed on the program, so each program compiles once per session. A fresh
# directory each session: nothing carries over between runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and not os.environ.get("APJAX_TEST_NO_CACHE"):
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="apjax-test-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402

# Compile with few optimisations: the tests run small arrays, where compile time dominates.
jax.config.update("jax_disable_most_optimizations", True)


import numpy as np  # noqa: E402
import pytest  # noqa: E402

MAX_WORKERS = 4  # each worker holds its own jax (about 4 GB resident at peak) and session teacher


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "default_xla: the test compares two different XLA programs bit for bit, so it runs in a child "
        "pytest under XLA's default CPU flags (the suite's own compile faster but round differently)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Runs a ``default_xla`` test in a child ``pytest -n 0`` whose XLA flags lack ``FAST_COMPILE_FLAG``
    (its fixtures are set up here too; the child reuses this process's ``teacher_dir``), and fails it here
    with the child's output if it fails there."""
    marked = pyfuncitem.get_closest_marker("default_xla") is not None
    if not marked or FAST_COMPILE_FLAG not in os.environ["XLA_FLAGS"]:
        return None
    import subprocess
    import sys

    env = dict(os.environ, APJAX_TEST_DEFAULT_XLA_CHILD="1")
    env["XLA_FLAGS"] = " ".join(f for f in env["XLA_FLAGS"].split() if f != FAST_COMPILE_FLAG)
    env.pop("PYTEST_XDIST_WORKER", None)
    if "teacher_dir" in pyfuncitem.funcargs:
        env["APJAX_TEST_TEACHER_DIR"] = str(pyfuncitem.funcargs["teacher_dir"])
    command = [sys.executable, "-m", "pytest", "-n", "0", "-q", "-p", "no:cacheprovider", pyfuncitem.nodeid]
    child = subprocess.run(command, cwd=pyfuncitem.config.rootpath, env=env, capture_output=True, text=True)
    if child.returncode != 0:
        output = f"{child.stdout[-12000:]}\n{child.stderr[-3000:]}"
        pytest.fail(f"failed under XLA's default flags (a child pytest):\n{output}", pytrace=False)
    return True


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): one worker per CPU core, at most ``MAX_WORKERS``. The tests are
    mostly XLA compiles, each on one core, so two workers on two cores run the suite in about two thirds
    of the time of one process (702 s against 1,052 s, docs/performance.md); ``-n 0`` runs everything in this
    process (for ``--pdb`` or a single test)."""
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def write_torchvision_npz(path, widths, seed: int = 0) -> None:
    """A torchvision ``vgg16_bn``-layout state dict of these widths (conv and BN, no classifier: the head
    is new, as for the paper's teacher) written as float32 ``.npz``: what ``config.init_from`` reads."""
    from tests.test_models import _torch_layout_state_dict

    sd = _torch_layout_state_dict(widths, num_classes=1, side=1, rng=np.random.default_rng(seed))
    kept = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
    np.savez(path, **{k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in kept.items()})


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A teacher workdir trained as the paper's is: one epoch from torchvision-layout weights
    (``init_from``, an ``.npz``), which are deleted afterwards, so that any consumer of the teacher that
    read ``init_from`` again (restoring, distillation, pruning, eval) fails."""
    from apjax.models import variant_widths
    from apjax.tasks import train_and_evaluate
    from tests.test_train import tiny_config

    if IN_DEFAULT_XLA_CHILD and os.environ.get("APJAX_TEST_TEACHER_DIR"):
        return Path(os.environ["APJAX_TEST_TEACHER_DIR"])  # the parent's (pytest_pyfunc_call)
    root = tmp_path_factory.mktemp("teacher")
    weights = root / "vgg16_bn_tiny.npz"
    c = tiny_config(root / "data", num_epochs=1, lr_decay_epochs=(), init_from=str(weights))
    write_torchvision_npz(weights, variant_widths(c.model))
    workdir = root / "run"
    train_and_evaluate(c, workdir)
    weights.unlink()
    return workdir


@pytest.fixture(scope="session")
def tiny_teacher_run(tmp_path_factory):
    """A tiny teacher (``tiny_config``'s defaults: 3 epochs of 3 steps) trained with ``train_and_evaluate``
    while a probe watched its jitted train step: ``(root, probe, compile_log)``, its workdir
    ``root / 'teacher'`` (tests/test_compile_once.py reads the probe, tests/test_train.py the workdir)."""
    from apjax.tasks import teacher as teacher_task
    from tests.test_compile_once import probed_run
    from tests.test_train import tiny_config

    root = tmp_path_factory.mktemp("tiny_teacher")
    probe, log = probed_run(teacher_task, "make_train_step", tiny_config(root / "data"), root / "teacher")
    return root, probe, log
