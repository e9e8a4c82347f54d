"""Test-wide settings: eight host devices (for sharding tests), short compiles on the CPU, one compilation
cache for the session, and how many pytest-xdist workers ``-n auto`` starts."""

import os

# Must be set before jax initialises its backends: lets tests build a 'data' mesh of 8 CPU devices.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

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
