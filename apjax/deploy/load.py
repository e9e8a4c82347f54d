"""An exported model loaded for use: ``load(dir) -> Deployed`` with ``predict``, ``explain`` and ``meta``.

This module is what an edge device runs, so it imports jax, numpy, json and :mod:`apjax.errors` only:
no config, no Orbax, no model code, no task or trainer. The folder written by
:func:`apjax.deploy.export.export_run` holds

- ``predict.stablehlo``: ``(weights, images uint8 (B, H, W, 3)) -> logits float32 (B, K)``;
- ``explain.stablehlo``: ``(weights, images) -> (logits (B, K), Grad-CAM map float32 (B, H, W))``;
- ``weights.npz``: the weights both functions take, named as in ``meta.json``: float32 arrays, a quantized
  run's conv kernels as int8 or packed int4 values with float32 scales (the functions dequantize them), or
  an unstructured pruning run's conv kernels as a bitmask and their non-zero values, which the loader
  rebuilds into dense kernels (:mod:`apjax.deploy.storage`);
- ``meta.json``: the format version, classes, input size, normalisation, model, compression, source run.

Both functions are ``jax.export`` artifacts (serialized StableHLO) with a symbolic batch dimension: any
batch size runs, each new size compiling once. A missing file, a format newer than this loader, weights
that do not match ``meta.json`` or images of the wrong size or dtype end in one sentence
(:class:`apjax.errors.ConfigError` and its variants).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax import export

from apjax.deploy.storage import sparse_decode
from apjax.errors import ConfigError, MissingFileError, UnreadableError

FORMAT = "apjax-deploy"
# 2: weights.arguments, packed and sparse storage (this loader reads 1 too).
FORMAT_VERSION = 2  # bumped when a loader of this version could not read what the exporter writes
META_FILE = "meta.json"
PREDICT_FILE = "predict.stablehlo"
EXPLAIN_FILE = "explain.stablehlo"
WEIGHTS_FILE = "weights.npz"
FILES = (PREDICT_FILE, EXPLAIN_FILE, WEIGHTS_FILE)

# jax.default_backend() names every GPU 'gpu'; jax.export names the platform it lowered for.
_EXPORT_PLATFORMS = {"gpu": ("cuda", "rocm")}


def check_serialization() -> None:
    """:class:`ConfigError` when jax.export cannot read or write its files here: it needs the flatbuffers
    package, which jax does not install with itself."""
    try:
        import flatbuffers  # noqa: F401
    except ImportError:
        raise ConfigError(
            "jax.export reads and writes its files with the flatbuffers package, which is not installed; "
            "pip install flatbuffers."
        ) from None


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` of an export, checked: a folder without one, a file that is not an apjax export
    or one written by a newer format than :data:`FORMAT_VERSION` ends in one sentence."""
    directory = Path(directory).expanduser()
    path = directory / META_FILE
    if not path.is_file():
        raise MissingFileError(
            f"{path} does not exist; pass the --out folder of export.py (it holds {META_FILE} and "
            f"{', '.join(FILES)})."
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UnreadableError(f"cannot read {path} ({e}); export the run again.") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"{path} is not the meta file of an apjax export (no format {FORMAT!r}).")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ConfigError(
            f"{directory} holds an export of format version {version!r}, newer than this apjax reads "
            f"({FORMAT_VERSION}); update apjax, or export the run again with this version."
        )
    return meta


def _read_exported(path: Path) -> export.Exported:
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist; the export is incomplete, so export the run again.")
    try:
        return export.deserialize(bytearray(path.read_bytes()))
    except Exception as e:  # a damaged file, or one serialized by a jax this one cannot read
        raise UnreadableError(
            f"cannot read {path} as a jax.export artifact ({type(e).__name__}); export the run again with "
            f"this jax ({jax.__version__})."
        ) from e


def _arguments(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The functions' arguments in order (``meta['weights']['arguments']``; a version 1 export lists its
    float32 ``arrays`` only, stored as they are)."""
    weights = meta["weights"]
    if "arguments" in weights:
        return weights["arguments"]
    return [
        {"name": a["name"], "shape": a["shape"], "dtype": "float32", "stored_as": "dense"}
        for a in weights["arrays"]
    ]


def _read_argument(stored, argument: dict[str, Any]) -> np.ndarray:
    name = argument["name"]
    if argument["stored_as"] == "sparse_bitmask":
        return sparse_decode(stored[f"{name}/mask"], stored[f"{name}/values"], argument["shape"])
    return np.asarray(stored[name])


def _read_weights(directory: Path, meta: dict[str, Any]) -> tuple[np.ndarray, ...]:
    """The functions' weight arguments in the order ``meta.json`` lists them, sparse ones rebuilt dense."""
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist; the export is incomplete, so export the run again.")
    arguments = _arguments(meta)
    try:
        with np.load(path, allow_pickle=False) as stored:
            weights = tuple(_read_argument(stored, a) for a in arguments)
    except (OSError, ValueError, KeyError) as e:
        message = str(e).rstrip(".").replace("\n", " ")
        raise UnreadableError(f"cannot read the weights of {path} ({message}); export the run again.") from e
    bad = [
        a["name"]
        for a, w in zip(arguments, weights, strict=True)
        if list(w.shape) != list(a["shape"]) or str(w.dtype) != a["dtype"]
    ]
    if bad:
        raise ConfigError(
            f"{path} does not match {META_FILE} (shapes or dtypes of {bad[:3]}); export the run again."
        )
    return weights


class Deployed:
    """An exported model: :meth:`predict`, :meth:`explain` and its :attr:`meta` (the ``meta.json``).

    Images are uint8 pixels (B, H, W, 3), RGB, already resized to the model's input size
    (:attr:`image_size`); normalisation happens inside. Outputs are numpy arrays.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).expanduser()
        self.meta = read_meta(self.directory)
        check_serialization()
        backend = jax.default_backend()
        platforms = tuple(self.meta.get("platforms", ()))
        if not set(_EXPORT_PLATFORMS.get(backend, (backend,))) & set(platforms):
            raise ConfigError(
                f"{self.directory} was exported for {', '.join(platforms)} and jax here runs on {backend}; "
                "export the run again for this platform."
            )
        self._predict_exported = _read_exported(self.directory / PREDICT_FILE)
        self._explain_exported = _read_exported(self.directory / EXPLAIN_FILE)
        self._weights = jax.device_put(_read_weights(self.directory, self.meta))
        # One compilation per batch size, kept by jit's cache.
        self._predict = jax.jit(self._predict_exported.call)
        self._explain = jax.jit(self._explain_exported.call)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images the functions take."""
        return int(self.meta["input"]["height"]), int(self.meta["input"]["width"])

    @property
    def classes(self) -> list[str]:
        """The class names, in logit order."""
        return list(self.meta["classes"])

    def check_images(self, images: Any) -> Any:
        """``images`` if they are a uint8 batch (B, H, W, 3) of the input size (B >= 1); else
        :class:`ConfigError` in one sentence."""
        if not hasattr(images, "dtype") or not hasattr(images, "shape"):
            images = np.asarray(images)
        height, width = self.image_size
        if images.dtype != np.uint8:
            raise ConfigError(
                f"the images are {images.dtype}, but the model takes uint8 pixels (0 to 255); give the "
                "decoded image itself, not a normalised copy."
            )
        shape = tuple(images.shape)
        if len(shape) != 4 or shape[1:] != (height, width, 3) or shape[0] < 1:
            raise ConfigError(
                f"the images have shape {shape}, but the model takes a batch (B, {height}, {width}, 3) "
                f"of RGB images; resize them to {height}x{width} first (python -m apjax.deploy.predict does)."
            )
        return images

    def predict(self, images: Any) -> np.ndarray:
        """Logits float32 (B, K) of uint8 images (B, H, W, 3) (sigmoid: per-class probabilities)."""
        return np.asarray(self._predict(self._weights, self.check_images(images)))

    def explain(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(logits (B, K), maps (B, H, W))``, float32: each image's Grad-CAM map for its top-1 class at
        the model's Grad-CAM layer, resized bilinearly to the input (one forward and one backward pass)."""
        logits, maps = self._explain(self._weights, self.check_images(images))
        return np.asarray(logits), np.asarray(maps)


def load(directory: str | os.PathLike) -> Deployed:
    """The export in ``directory`` (the ``--out`` of ``export.py``), ready to run."""
    return Deployed(directory)
