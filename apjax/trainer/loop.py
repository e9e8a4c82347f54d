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
    """

    init_state: Callable[[], TrainState]
    train_step: Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]
    evaluate: Callable[[TrainState, HostCache], dict[str, float]]
    describe: Callable[[TrainState], dict[str, Any]] | None = None
    abstract_init: Callable[[Any], TrainState] | None = None

    def abstract_state(self, sharding) -> TrainState:
        """What a checkpoint of this task is restored into (see ``abstract_init``)."""
        if self.abstract_init is not None:
            return self.abstract_init(sharding)
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), self.init_state()
        )


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
    spe = batches.steps_per_epoch
    total_steps = epochs_to_steps(config, spe)["total"]
    replicated = NamedSharding(mesh, PartitionSpec())
    checkpoints = Checkpoints(workdir)
    latest_dir = workdir / "checkpoints" / "latest"
    try:
        metric = best_metric_of(config)  # picks the best checkpoint
        best_value = -1.0
        # A resumed run never rebuilds its initial state (nor reads init_from's weight file again).
        restored = Checkpoints.restore(checkpoints.latest, task.abstract_state(replicated))
        if restored is None:
            state = jax.device_put(task.init_state(), replicated)
        else:
            state, meta = restored
            state = jax.device_put(state, replicated)
            best_value = resumed_best(meta, metric)
            if is_main:
                print(f"Resuming {workdir} from step {int(meta['step'])} (epoch {meta['epoch']}).")

        log = MetricsLog(workdir)
        start = int(jax.device_get(state.step))
        log.truncate_after(start)  # rows a killed run logged after its last checkpoint are logged again
        with jax.set_mesh(mesh):
            label = desc or config.task
            bar = tqdm(total=total_steps, initial=start, disable=not is_main, desc=label, unit="step")
            acc, acc_n, t0, last = None, 0, time.perf_counter(), start
            for step, batch in batches.iterate(start, total_steps):
                state, m = task.train_step(state, batch)
                acc = m if acc is None else jax.tree.map(jnp.add, acc, m)  # stays on the device
                acc_n += 1
                done = step + 1
                if done % config.log_every_steps == 0 or done % spe == 0:
                    host = {
                        k: float(v) / acc_n for k, v in jax.device_get(acc).items()
                    }  # the loop's only sync
                    if not all(math.isfinite(v) for v in host.values()):
                        bad = ", ".join(f"{k}={v}" for k, v in host.items() if not math.isfinite(v))
                        raise FloatingPointError(
                            f"training became non-finite ({bad}) by step {done}; the last good checkpoint is "
                            f"step {checkpoints.latest.latest_step()} in {latest_dir} "
                            "(lower the learning rate or check the data)."
                        )
                    rate = (done - last) / (time.perf_counter() - t0)
                    log.write(step=done, epoch=done / spe, steps_per_s=rate, **host)
                    bar.set_postfix(loss=f"{host['loss']:.4f}", lr=f"{host['lr']:.3g}")
                    bar.update(done - bar.n)
                    acc, acc_n, t0, last = None, 0, time.perf_counter(), done
                if done % spe == 0:
                    epoch = done // spe
                    # The loss is computed before each update: check the weights themselves before they are
                    # evaluated or saved, so that no checkpoint ever holds non-finite parameters.
                    if not bool(all_finite(state.params)):
                        raise FloatingPointError(
                            f"the parameters became non-finite by step {done}; the last good checkpoint is "
                            f"step {checkpoints.latest.latest_step()} in {latest_dir} "
                            "(lower the learning rate or check the data)."
                        )
                    if epoch % config.eval_every_epochs == 0 or done == total_steps:
                        val = task.evaluate(state, data["val"])
                        log.write(step=done, epoch=epoch, **{f"val/{k}": v for k, v in val.items()})
                        if val[metric] > best_value:
                            best_value = val[metric]
                            best_meta = {"best_metric": metric, "best_value": best_value, "mAP": val["mAP"]}
                            checkpoints.save_best(
                                state, {"step": done, "epoch": epoch, **best_meta, "val": val}
                            )
                        if is_main:
                            line = f"epoch {epoch}: val mAP {100 * val['mAP']:.2f}"
                            if metric != "mAP":
                                line += f", {metric} {100 * val[metric]:.2f}"
                            bar.write(f"{line} (best {metric} {100 * best_value:.2f})")
                    if epoch % config.checkpoint_every_epochs == 0 or done == total_steps:
                        # The data position is the step: batches are addressed by step (TrainBatches).
                        meta = {"step": done, "epoch": epoch, "data_position": done}
                        meta.update(best_metric=metric, best_value=best_value)
                        checkpoints.save_latest(state, meta)
            bar.close()

            final = task.evaluate(state, data["val"])
            last_step = int(jax.device_get(state.step))
            rows = {f"val, last (step {last_step})": final}
            best = Checkpoints.restore(checkpoints.best, state)
            checkpoints.close()
            if best is not None:
                rows[f"val, best (step {best[1]['step']})"] = task.evaluate(best[0], data["val"])
    except BaseException:
        # Join the checkpoint managers' background threads before the error leaves: a process that exits
        # with them still running can abort at interpreter shutdown instead of printing its one sentence.
        with contextlib.suppress(Exception):
            checkpoints.close()
        raise
    if is_main:
        extra = task.describe(state) if task.describe else {}
        summary = {"step": last_step, "val": final, "rows": rows, **extra}
        write_json_atomic(workdir / "final_metrics.json", summary)
        print(format_table(rows, percent=CLASSIFICATION_PERCENT))
    return final
