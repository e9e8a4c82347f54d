"""The training steps compile once: over several steps, across epoch boundaries and evaluations.

``apjax.tasks.train_and_evaluate`` runs a tiny teacher (3 epochs of 3 steps, an evaluation and checkpoints
after each epoch: the session's ``tiny_teacher_run``, tests/conftest.py) and then a tiny SSWA distillation
from that teacher. The jitted step the task builds is wrapped, so the test sees every call: jax's compile
log (``jax.log_compiles``) must report a compilation during the first call only, the step's jit cache must
hold one entry at the end, and from the second epoch on nothing at all may compile (so neither the
evaluation, the metrics accumulation nor the checkpointing of the first epoch left anything shape- or
dtype-unstable behind).
"""

from __future__ import annotations

import contextlib
import logging

import jax
import pytest

from apjax.compress import distill
from apjax.tasks import train_and_evaluate
from configs import vgg16_kd
from tests.test_train import tiny_config

# On one xdist worker with tests/test_train.py's eval test: both read the session's tiny_teacher_run.
pytestmark = pytest.mark.xdist_group("tiny_teacher")

STUDENT = "2,2,M,4,4,M,4,4,4,M,8,8,8,M,8,8,8,M"
STEPS_PER_EPOCH = 3  # 48 training images, batch 16
EPOCHS = 3


class _CompileLog(logging.Handler):
    """Collects jax's "Compiling <module> ..." records (logged at WARNING under ``jax.log_compiles``)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Compiling "):
            self.messages.append(message.split(" with ", 1)[0])


@contextlib.contextmanager
def compile_log():
    handler = _CompileLog()
    logger = logging.getLogger("jax._src.interpreters.pxla")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield handler
    finally:
        logger.removeHandler(handler)


class StepProbe:
    """Wraps a jitted step: per call, the compilations logged during it and the jit cache size after it."""

    def __init__(self, jitted, log: _CompileLog):
        self.jitted, self.log = jitted, log
        self.compiles_in_call: list[list[str]] = []
        self.cache_sizes: list[int] = []
        self.log_index_at_call: list[int] = []
        self.log_index_after_call: list[int] = []

    def __call__(self, *args):
        before = len(self.log.messages)
        self.log_index_at_call.append(before)
        out = self.jitted(*args)
        jax.block_until_ready(out)
        self.compiles_in_call.append(self.log.messages[before:])
        self.cache_sizes.append(self.jitted._cache_size())
        self.log_index_after_call.append(len(self.log.messages))
        return out


def probed_run(module, step_factory: str, config, workdir) -> tuple[StepProbe, _CompileLog]:
    """Runs ``train_and_evaluate(config, workdir)`` with ``module.<step_factory>`` (the task's builder of its
    jitted step) wrapped so that the one step it builds is probed: (that probe, the compile log)."""
    probes: list[StepProbe] = []
    original = getattr(module, step_factory)
    with pytest.MonkeyPatch.context() as mp, compile_log() as log:

        def probed(*args, **kwargs):
            probes.append(StepProbe(original(*args, **kwargs), log))
            return probes[-1]

        mp.setattr(module, step_factory, probed)
        train_and_evaluate(config, workdir)
    assert len(probes) == 1
    return probes[0], log


def _check_probe(probe: StepProbe, log: _CompileLog) -> None:
    assert len(probe.compiles_in_call) == EPOCHS * STEPS_PER_EPOCH
    assert probe.compiles_in_call[0], "the first step should have compiled the step"
    recompiled = {i: c for i, c in enumerate(probe.compiles_in_call) if i > 0 and c}
    assert not recompiled, f"the train step compiled again at calls {recompiled}"
    assert probe.cache_sizes == [1] * len(probe.cache_sizes), probe.cache_sizes
    # From the first step of epoch 2 to the end of the last step: the evaluation, the metrics sync and the
    # checkpoint at the end of epoch 2 reuse what epoch 1 compiled.
    window = log.messages[probe.log_index_at_call[STEPS_PER_EPOCH] : probe.log_index_after_call[-1]]
    assert window == [], window


def test_teacher_step_compiles_once(tiny_teacher_run):
    _, probe, log = tiny_teacher_run
    _check_probe(probe, log)


def test_distill_step_compiles_once(tiny_teacher_run):
    root, _, _ = tiny_teacher_run
    c = vgg16_kd.get_config("data=synthetic,small,method=sswa")
    c.data = tiny_config(root / "data").data
    c.model, c.batch_size = STUDENT, 16
    c.num_epochs, c.lr_decay_epochs, c.log_every_steps = EPOCHS, (2,), 2
    c.distill.teacher_workdir = str(root / "teacher")
    c.distill.taps = ("conv5_3",)
    probe, log = probed_run(distill, "make_distill_step", c, root / "sswa")
    _check_probe(probe, log)
