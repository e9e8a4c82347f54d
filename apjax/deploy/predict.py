r"""Each image's top classes from an exported model: ``python -m apjax.deploy.predict DIR IMAGE...``.

  python -m apjax.deploy.predict exports/teacher photo.jpg street.png
  python -m apjax.deploy.predict exports/teacher photos/*.jpg --top 5

Reads each image with PIL (as RGB), resizes it whole to the model's input size as the eval does (bilinear,
antialiased when shrinking: PIL's BILINEAR on each channel in float32, which is the eval's filter, then
rounded to uint8 pixels, where the eval keeps floats: at most half a pixel value apart), runs the
export's ``predict`` and prints the ``--top`` classes of each image with their probabilities (the sigmoid
of each logit: the classifiers are multi-label, so the probabilities do not sum to one). Imports only the
loader (:mod:`apjax.deploy.load`), PIL, jax and numpy. A missing export, an unreadable image or a format
this apjax cannot read ends in one sentence.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image

from apjax.deploy.load import Deployed, load
from apjax.errors import ConfigError, MissingFileError, UnreadableError

BATCH = 32  # images per call of predict


def resize_image(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 RGB (h, w, 3) resized whole to (height, width, 3) as the eval resizes: PIL's BILINEAR on each
    channel in float32 (the eval's antialiased triangle filter, :func:`apjax.data.augment.crop_resize`, to
    float32 rounding), rounded once to uint8. (PIL's BILINEAR on a uint8 image rounds after each of its two
    passes, up to a whole pixel value from the eval's.)"""
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(rgb[..., c], np.float32), mode="F").resize(
                (width, height), Image.Resampling.BILINEAR
            )
        )
        for c in range(3)
    ]
    return np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)


def read_image(path: str | os.PathLike, height: int, width: int) -> np.ndarray:
    """The image at ``path`` as uint8 RGB (height, width, 3), resized whole (:func:`resize_image`)."""
    if not os.path.isfile(path):
        raise MissingFileError(f"the image {path} does not exist; give the path of an image file.")
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))  # decodes every pixel: a truncated file fails here
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableError(
            f"cannot read the image {path} ({e}); give a PNG, JPEG or other image PIL reads."
        ) from e
    return resize_image(rgb, height, width)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Per-class probabilities of logits, in float64 (``0.5 * (1 + tanh(z / 2))``: no overflow)."""
    return 0.5 * (1.0 + np.tanh(np.asarray(logits, np.float64) / 2.0))


def top_classes(deployed: Deployed, paths: Sequence[str], top: int = 3) -> list[list[tuple[str, float]]]:
    """For each image of ``paths``, its ``top`` classes as (name, probability), most probable first."""
    height, width = deployed.image_size
    names = deployed.classes
    out = []
    for start in range(0, len(paths), BATCH):
        images = np.stack([read_image(p, height, width) for p in paths[start : start + BATCH]])
        for p in sigmoid(deployed.predict(images)):
            order = np.argsort(-p, kind="stable")[:top]
            out.append([(names[k], float(p[k])) for k in order])
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m apjax.deploy.predict", description="Each image's top classes from an exported model."
    )
    parser.add_argument("export_dir", help="the folder export.py wrote (its --out)")
    parser.add_argument("images", nargs="+", help="image files (any size; resized to the model's input)")
    parser.add_argument("--top", type=int, default=3, help="classes printed per image (default 3)")
    args = parser.parse_args(argv)
    try:
        if args.top < 1:
            raise ConfigError(f"--top must be at least 1, got {args.top}.")
        results = top_classes(load(args.export_dir), args.images, args.top)
    except ConfigError as e:
        if os.environ.get("APJAX_DEBUG"):
            raise
        sys.exit(f"error: {e}\n(set APJAX_DEBUG=1 to see the traceback)")
    for path, classes in zip(args.images, results, strict=True):
        print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in classes))


if __name__ == "__main__":
    main()
