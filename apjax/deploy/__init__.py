"""Deployment: a finished run exported as ``jax.export`` functions, and loaded without apjax's training code.

- :mod:`apjax.deploy.export`: :func:`~apjax.deploy.export.export_run` (``export.py`` at the repository root)
  writes ``predict.stablehlo``, ``explain.stablehlo``, ``weights.npz`` and ``meta.json``;
- :mod:`apjax.deploy.load`: :func:`load` ``(dir) -> Deployed`` with ``predict``, ``explain`` and ``meta``,
  importing only jax, numpy and :mod:`apjax.errors`;
- :mod:`apjax.deploy.predict`: ``python -m apjax.deploy.predict DIR IMAGE...``, each image's top classes.

This package imports only the loader, so that ``from apjax.deploy import load`` on a device never imports
the exporter (which restores checkpoints through the trainer and Orbax).
"""

from apjax.deploy.load import Deployed, load

__all__ = ["Deployed", "load"]
