"""The training loop every task runs: resume, train, evaluate, checkpoint, log.

One 'data' mesh spans all devices (of all processes): the train state is replicated (``P()``) and each
batch is split along its first axis (``P('data')``); a task's train step is one ``jax.jit`` with donated
state, so BatchNorm statistics, the loss and the gradients are over the global batch. Training is
addressed by step: the batch of step s and its PRNG keys are functions of (seed, s) alone, so a resumed
run continues exactly where the checkpoint left it. A task (:class:`Task`) gives the loop its initial
state, its step and its evaluation; the loop knows no task by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from apjax.data import HostCache
from apjax.data.pipeline import TrainBatches
from apjax.trainer.checkpoints import Checkpoints, resumed_best
from apjax.trainer.config import best_metric_of
from apjax.trainer.evaluation import CLASSIFICATION_PERCENT
from apjax.trainer.files import write_json_atomic
from apjax.trainer.metrics_log import MetricsLog, format_table
from apjax.trainer.optim import epochs_to_steps
from apjax.trainer.state import TrainState, all_finite
from apjax.trainer.tensorboard import TensorBoardLog


@dataclasses.dataclass
class Task:
    """What a task (teacher training, distillation, ...) gives the common training loop.

    Attributes:
      init_state: () -> a fresh :class:`TrainState` (not yet on the mesh).
      train_step: (state, batch) -> (state, metrics); jitted, metrics stay on the device. Metrics are
        averaged between log steps; ``loss`` must be among them.
      evaluate: (state, cache) -> dict of floats on a split; must hold the ``config.best_metric`` that picks
        the best checkpoint (:data:`BEST_METRICS`).
      describe: optional (final state) -> dict of extra entries for ``final_metrics.json`` (e.g. the
        parameter counts of a pruned net).
      abstract_init: optional (sharding) -> the state's shapes (``jax.ShapeDtypeStruct`` leaves) to
        restore a checkpoint into, built without computing the initial state (and so without reading a
        weight file); by default the shapes of ``init_state()``.
      batches: optional (the run's :class:`TrainBatches`) -> the batches ``train_step`` reads, e.g. with a
        teacher's cached outputs added (:class:`apjax.compress.teacher_cache.CachedBatches`).
      figure: optional (state, cache) -> a uint8 (H, W, 3) picture of the maps on a few images of the
        split (:class:`apjax.trainer.map_grid.MapGrid`), written to TensorBoard at each evaluation (process
        0 only, ``config.tensorboard``).
    """

    init_state: Callable[[], TrainState]
    train_step: Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]
    evaluate: Callable[[TrainState, HostCache], dict[str, float]]
    describe: Callable[[TrainState], dict[str, Any]] | None = None
    abstract_init: Callable[[Any], TrainState] | None = None
    batches: Callable[[TrainBatches], TrainBatches] | None = None
    figure: Callable[[TrainState, HostCache], np.ndarray] | None = None

    def abstract_state(self, sharding) -> TrainState:
        """What a checkpoint of this task is restored into (see ``abstract_init``)."""
        if self.abstract_init is not None:
            return self.abstract_init(sharding)
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), self.init_state()
        )


def _non_finite(what: str, done: int, checkpoints: Checkpoints, latest_dir: Path) -> FloatingPointError:
    return FloatingPointError(
        f"{what} by step {done}; the last good checkpoint is step {checkpoints.latest.latest_step()} in "
        f"{latest_dir} (lower the learning rate or check the data)."
    )


@dataclasses.dataclass
class _Run:
    """The mutable state of one training loop: its checkpoints, metric logs, progress bar and best value."""

    config: ml_collections.ConfigDict
    workdir: Path
    task: Task
    val: HostCache
    checkpoints: Checkpoints
    log: MetricsLog
    bar: Any
    spe: int
    total_steps: int
    metric: str
    best_value: float
    is_main: bool
    tb: TensorBoardLog

    def log_train(self, done: int, acc: Any, acc_n: int, rate: float) -> None:
        """Logs the mean of the accumulated train metrics (the loop's only sync); refuses non-finite ones."""
        host = {k: float(v) / acc_n for k, v in jax.device_get(acc).items()}
        if not all(math.isfinite(v) for v in host.values()):
            bad = ", ".join(f"{k}={v}" for k, v in host.items() if not math.isfinite(v))
            raise _non_finite(f"training became non-finite ({bad})", done, self.checkpoints, self.latest_dir)
        row = dict(epoch=done / self.spe, steps_per_s=rate, **host)
        self.log.write(step=done, **row)
        self.tb.scalars(done, row)
        self.bar.set_postfix(loss=f"{host['loss']:.4f}", lr=f"{host['lr']:.3g}")
        self.bar.update(done - self.bar.n)

    @property
    def latest_dir(self) -> Path:
        return self.workdir / "checkpoints" / "latest"

    def end_of_epoch(self, state: Any, done: int) -> None:
        """Checks the weights, evaluates (keeping the best checkpoint) and saves the latest checkpoint."""
        epoch = done // self.spe
        # The loss is computed before each update: check the weights themselves before they are evaluated or
        # saved, so that no checkpoint ever holds non-finite parameters.
        if not bool(all_finite(state.params)):
            raise _non_finite("the parameters became non-finite", done, self.checkpoints, self.latest_dir)
        last = done == self.total_steps
        if epoch % self.config.eval_every_epochs == 0 or last:
            self.evaluate(state, done, epoch)
        if epoch % self.config.checkpoint_every_epochs == 0 or last:
            # The data position is the step: batches are addressed by step (TrainBatches).
            meta = {"step": done, "epoch": epoch, "data_position": done}
            meta.update(best_metric=self.metric, best_value=self.best_value)
            self.checkpoints.save_latest(state, meta)

    def evaluate(self, state: Any, done: int, epoch: int) -> None:
        val = self.task.evaluate(state, self.val)
        row = {f"val/{k}": v for k, v in val.items()}
        self.log.write(step=done, epoch=epoch, **row)
        self.tb.scalars(done, row)  # the epoch is the train row's, at the same step
        if self.tb.enabled and self.task.figure is not None:
            self.tb.image("maps", self.task.figure(state, self.val), done)
        metric = self.metric
        if val[metric] > self.best_value:
            self.best_value = val[metric]
            best_meta = {"best_metric": metric, "best_value": self.best_value, "mAP": val["mAP"]}
            self.checkpoints.save_best(state, {"step": done, "epoch": epoch, **best_meta, "val": val})
        if self.is_main:
            line = f"epoch {epoch}: val mAP {100 * val['mAP']:.2f}"
            if metric != "mAP":
                line += f", {metric} {100 * val[metric]:.2f}"
            self.bar.write(f"{line} (best {metric} {100 * self.best_value:.2f})")

    def final_rows(self, state: Any) -> tuple[dict, dict, int]:
        """(val metrics of the last state, the table rows of the last and best checkpoints, last step)."""
        final = self.task.evaluate(state, self.val)
        last_step = int(jax.device_get(state.step))
        rows = {f"val, last (step {last_step})": final}
        best = Checkpoints.restore(self.checkpoints.best, state)
        self.checkpoints.close()
        if best is not None:
            rows[f"val, best (step {best[1]['step']})"] = self.task.evaluate(best[0], self.val)
        return final, rows, last_step


def _start(config, workdir: Path, task: Task, checkpoints: Checkpoints, replicated) -> tuple[Any, float]:
    """The initial state and best value: restored from the latest checkpoint, or the task's fresh state."""
    metric = best_metric_of(config)
    # A resumed run never rebuilds its initial state (nor reads init_from's weight file again).
    restored = Checkpoints.restore(checkpoints.latest, task.abstract_state(replicated))
    if restored is None:
        return jax.device_put(task.init_state(), replicated), -1.0
    state, meta = restored
    if jax.process_index() == 0:
        print(f"Resuming {workdir} from step {int(meta['step'])} (epoch {meta['epoch']}).")
    return jax.device_put(state, replicated), resumed_best(meta, metric)


def run_training(
    config: ml_collections.ConfigDict,
    workdir: Path,
    task: Task,
    data: Mapping[str, HostCache],
    batches: TrainBatches,
    mesh: Mesh,
    desc: str | None = None,
) -> dict[str, float]:
    """The training loop of one run in a prepared ``workdir``: resume, train, evaluate, checkpoint.

    ``desc`` labels the progress bar (the task's name by default).
    """
    is_main = jax.process_index() == 0
    batches = task.batches(batches) if task.batches else batches
    spe = batches.steps_per_epoch
    total_steps = epochs_to_steps(config, spe)["total"]
    checkpoints, stack = Checkpoints(workdir), contextlib.ExitStack()  # stack: TensorBoard, batch stream
    try:
        state, best_value = _start(config, workdir, task, checkpoints, NamedSharding(mesh, PartitionSpec()))
        log = MetricsLog(workdir)
        start = int(jax.device_get(state.step))
        log.truncate_after(start)  # rows a killed run logged after its last checkpoint are logged again
        tb = TensorBoardLog(workdir, config.get("tensorboard", True) and start < total_steps, start)  # same
        stack.callback(tb.close)
        with jax.set_mesh(mesh):
            bar = tqdm(
                total=total_steps, initial=start, disable=not is_main, desc=desc or config.task, unit="step"
            )
            run = _Run(config, workdir, task, data["val"], checkpoints, log, bar, spe, total_steps,
                       best_metric_of(config), best_value, is_main, tb)  # fmt: skip
            acc, acc_n, t0, last = None, 0, time.perf_counter(), start
            stream = batches.iterate(start, total_steps)
            stack.callback(stream.close)  # stops and joins the prefetch thread, also on an error
            for step, batch in stream:
                state, m = task.train_step(state, batch)
                acc = m if acc is None else jax.tree.map(jnp.add, acc, m)  # stays on the device
                acc_n += 1
                done = step + 1
                if done % config.log_every_steps == 0 or done % spe == 0:
                    run.log_train(done, acc, acc_n, (done - last) / (time.perf_counter() - t0))
                    acc, acc_n, t0, last = None, 0, time.perf_counter(), done
                if done % spe == 0:
                    run.end_of_epoch(state, done)
            bar.close()
            final, rows, last_step = run.final_rows(state)
    except BaseException:
        # Join the checkpoint managers' background threads before the error leaves: a process that exits
        # with them still running can abort at interpreter shutdown instead of printing its one sentence.
        with contextlib.suppress(Exception):
            checkpoints.close()
        raise
    finally:
        stack.close()
    if is_main:
        extra = task.describe(state) if task.describe else {}
        summary = {"step": last_step, "val": final, "rows": rows, **extra}
        write_json_atomic(workdir / "final_metrics.json", summary)
        print(format_table(rows, percent=CLASSIFICATION_PERCENT))
    return final
