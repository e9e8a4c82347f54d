"""TensorBoard event files in ``<workdir>/tensorboard/`` (process 0, ``config.tensorboard``), written with
``tensorboardX`` (no TensorFlow).

Every row of ``metrics.jsonl`` is written as scalars at its step (:func:`scalar_tag` names them), and at
each evaluation the task's maps picture (:class:`apjax.trainer.map_grid.MapGrid`) as the image ``maps``.
A resumed run opens a new event file that starts with a purge at the step after its checkpoint
(tensorboardX's ``purge_step``): TensorBoard then drops what a killed run logged after that checkpoint,
as :meth:`apjax.trainer.metrics_log.MetricsLog.truncate_after` does for ``metrics.jsonl``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np

SUBDIR = "tensorboard"
EVENT_GLOB = "events.out.tfevents.*"


def scalar_tag(key: str) -> str:
    """The TensorBoard tag of a ``metrics.jsonl`` key: ``val/...`` keys as they are, the train rows' under
    ``train/`` (``loss`` -> ``train/loss``)."""
    return key if "/" in key else f"train/{key}"


class TensorBoardLog:
    """The run's TensorBoard writer; does nothing when disabled or on processes other than 0.

    ``start`` is the step the run starts from (its checkpoint's, 0 for a fresh run). Close it with
    :meth:`close` (the training loop does, also on error).
    """

    def __init__(self, workdir: Path, enabled: bool, start: int):
        self.dir = Path(workdir) / SUBDIR
        self.writer = None
        if not enabled or jax.process_index() != 0:
            return
        from tensorboardX import SummaryWriter

        # Events of an earlier (killed) run in this workdir: purge every step after this run's start.
        earlier = self.dir.is_dir() and any(self.dir.glob(EVENT_GLOB))
        self.writer = SummaryWriter(
            str(self.dir),
            purge_step=start + 1 if earlier else None,
            flush_secs=30,
            filename_suffix=f".from_step_{start:09d}",
        )

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Writes ``values`` (``metrics.jsonl`` keys -> numbers) at ``step``."""
        if self.writer is None:
            return
        for key, value in values.items():
            self.writer.add_scalar(scalar_tag(key), float(value), global_step=step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """Writes a uint8 (H, W, 3) image at ``step``."""
        if self.writer is not None:
            self.writer.add_image(tag, np.asarray(image), global_step=step, dataformats="HWC")

    def close(self) -> None:
        """Flushes and closes the event file (idempotent)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
