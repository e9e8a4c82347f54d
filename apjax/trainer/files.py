"""A run's files: atomic writes, the process barrier, and the workdir (its config, resume check).

Process 0 writes; the others wait at :func:`sync_processes` where they need what it wrote.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils

from apjax.errors import ConfigError, MissingFileError, UnwritableError

# Config fields that may change when a run is resumed in the same workdir.
RESUMABLE_CHANGES = (
    "num_epochs",
    "log_every_steps",
    "eval_every_epochs",
    "checkpoint_every_epochs",
    "data.data_dir",
    "distributed",
    "tensorboard",
)
# Whole blocks that change what is measured, not the run: config.evals (extra evaluators).
RESUMABLE_BLOCKS = ("evals.",)

# Config fields added after runs were saved, with the value those runs had: a config (saved or new)
# without one is compared as if it held that value, so older workdirs still resume.
ADDED_FIELDS = {
    "best_metric": "mAP",
    "model_init": "torchvision",
    "from_scratch": False,
    "distill.kd_log_eps": 0.0,
    "distill.teacher_cache": 0,
    "distill.teacher_cache_dtype": "bfloat16",
    "distill.teacher_cache_dir": "",
    "tensorboard": True,
}


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file renamed into place (removed if that fails)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Writes JSON to ``path`` through a temporary file renamed into place."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sync_processes(name: str) -> None:
    """A barrier across processes (a no-op in a single process): e.g. after process 0 wrote a file."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _flat(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def check_resume_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume a workdir whose saved config differs in a field that changes the run."""
    path = workdir / "config.json"
    if not path.exists():
        return
    old = {**ADDED_FIELDS, **_flat(json.loads(path.read_text()))}
    new = {**ADDED_FIELDS, **_flat(json.loads(config.to_json_best_effort()))}
    changed = sorted(
        k
        for k in set(old) | set(new)
        if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES and not k.startswith(RESUMABLE_BLOCKS)
    )
    if changed:
        raise ConfigError(
            f"{workdir} holds a run with another config (differs in {', '.join(changed)}); "
            "use a new --workdir, or the same config to resume it."
        )


def prepare_workdir(workdir: Path, config: ml_collections.ConfigDict, check: bool = True) -> None:
    """Creates ``workdir`` (process 0), refuses a different run in it (unless ``check`` is False), and
    saves ``config.json``."""
    if jax.process_index() != 0:
        return
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UnwritableError(
            f"cannot create the workdir {workdir} ({e.strerror}); choose a writable --workdir."
        ) from e
    if not os.access(workdir, os.W_OK):
        raise UnwritableError(f"the workdir {workdir} is not writable; choose a writable --workdir.")
    if check:
        check_resume_config(workdir, config)
    write_json_atomic(workdir / "config.json", json.loads(config.to_json_best_effort()))


def load_workdir_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The ``config.json`` a training run saved in ``workdir``, with the model its weights have.

    A structurally pruned run records its smaller widths in ``model.json``; they replace ``model``.
    """
    workdir = Path(workdir).expanduser()
    path = workdir / "config.json"
    if not path.exists():
        raise MissingFileError(
            f"{path} does not exist; pass the --workdir of a training run (it holds config.json)."
        )
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    model_file = workdir / "model.json"
    if model_file.exists():
        config.model = json.loads(model_file.read_text())["model"]
    return config
