"""The one error a user fixes: a bad config value, argument, dataset, weight file or workdir.

Command lines (``train.py``, ``eval.py``, ``python -m apjax.data.prepare``) print a :class:`ConfigError`
as its one sentence (what is wrong and what to do) instead of a traceback; every other exception is a
bug (or a failure of the machine) and keeps its traceback. ``ConfigError`` is a ``ValueError``; the
variants below are also the ``OSError`` or ``KeyError`` that the same mistake raised before, so callers
that catch those keep working.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A mistake in what the user gave (config, flags, files, workdir), said in one sentence."""


class MissingFileError(ConfigError, FileNotFoundError):
    """A file or folder the run needs (a dataset, a trained run, a checkpoint, a weight file) is missing."""


class UnwritableError(ConfigError, PermissionError):
    """A folder the run must write into cannot be created or written."""


class UnreadableError(ConfigError, OSError):
    """A file the run reads exists but cannot be read (a damaged dataset)."""


class MissingKeyError(ConfigError, KeyError):
    """A file (e.g. a state dict) lacks an entry the config's model needs."""
