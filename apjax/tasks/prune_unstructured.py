"""The ``prune_unstructured`` task: rounds of global magnitude pruning, each fine-tuned as its own run."""

from __future__ import annotations

from pathlib import Path

import ml_collections
from jax.sharding import Mesh

from apjax.compress.prune import train_unstructured, validate_prune_config
from apjax.data import HostCache

CONFIG_FILE = "configs/prune_unstructured.py"
BLOCKS = ("distill", "prune")  # the config blocks this task reads beyond the common ones


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`apjax.errors.ConfigError` for a bad ``config.prune`` or ``config.distill`` value."""
    validate_prune_config(config, structured=False)


def run(
    config: ml_collections.ConfigDict, workdir: Path, data: dict[str, HostCache], mesh: Mesh
) -> dict[str, float]:
    """Runs (or continues) the rounds in ``<workdir>/round_XX``; returns the last round's val metrics."""
    return train_unstructured(config, workdir, data, mesh)
