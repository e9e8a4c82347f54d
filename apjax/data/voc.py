"""PASCAL VOC 2012 (classification labels + segmentation masks) as a tensorflow-datasets builder.

The data is read from the user's ``VOCtrainval_11-May-2012.tar`` (or from the already extracted
``VOCdevkit/VOC2012`` folder) given as tfds's manual directory, and written as ``array_record``
files so that it can be read back without TensorFlow through ``tfds.data_source``. From the command
line (prints the split sizes when done)::

    python -m apjax.data.prepare --manual_dir /path/to/VOCtrainval_11-May-2012.tar \
        --data_dir ~/tensorflow_datasets

or from Python, ``apjax.data.prepare_voc(data_dir, manual_dir)``. The manual directory may be the tar
itself, a folder holding it, the extracted ``VOCdevkit`` or ``VOCdevkit/VOC2012`` folder, or a folder
holding ``VOCdevkit``; by default it is ``<data_dir>/downloads/manual``.

Two builder configs:

* ``classification``: splits ``train`` (``ImageSets/Main/train.txt``) and ``val``
  (``ImageSets/Main/val.txt``); features ``image`` (H, W, 3) uint8, ``labels`` (20,) uint8
  multi-hot over :data:`VOC_CLASSES` (every ``<object>`` of ``Annotations/<id>.xml``, difficult
  ones included) and ``image_id``.
* ``segmentation``: split ``val`` (``ImageSets/Segmentation/val.txt``); the same features plus
  ``mask`` (H, W, 1) uint8 holding the palette indices of ``SegmentationClass/<id>.png``
  (0 background, 1..20 the classes, 255 void).

This module holds the builder, its preparation and loading; reading and checking the source files is
:mod:`apjax.data.voc_source`'s.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from apjax.data.voc_source import (
    MAIN_LISTS,
    SEGMENTATION_LIST,
    VOC_CLASSES,
    VOC_TAR_NAME,
    VOC_URL,
    DatasetNotFoundError,
    Source,
    VocDataError,
    find_source,
    load_image,
    load_mask,
    missing_source_error,
    parse_labels,
    read_id_list,
    source_path,
)
from apjax.errors import ConfigError

# VOC_CLASSES, VOC_TAR_NAME, VOC_URL and the two errors come from voc_source.
__all__ = [
    "VOC_CLASSES",
    "VOC_SPLIT_SIZES",
    "VOC_TAR_NAME",
    "VOC_URL",
    "ApjaxVoc2012",
    "DatasetNotFoundError",
    "VocDataError",
    "load_voc_split",
    "prepare_voc",
]

# The official split sizes (ImageSets/Main train and val, ImageSets/Segmentation val).
VOC_SPLIT_SIZES = {"train": 5717, "val": 5823, "segmentation_val": 1449}

# load_voc_split name -> (builder config, tfds split).
_SPLITS = {
    "train": ("classification", "train"),
    "val": ("classification", "val"),
    "segmentation_val": ("segmentation", "val"),
}

_CITATION = """\
@misc{pascal-voc-2012,
  author = "Everingham, M. and Van~Gool, L. and Williams, C. K. I. and Winn, J. and Zisserman, A.",
  title = "The {PASCAL} {V}isual {O}bject {C}lasses {C}hallenge 2012 {(VOC2012)} {R}esults",
  howpublished = "http://www.pascal-network.org/challenges/VOC/voc2012/workshop/index.html"}
"""

# --------------------------------------------------------------------------------------------
# The builder.
# --------------------------------------------------------------------------------------------


class ApjaxVoc2012(tfds.core.GeneratorBasedBuilder):
    """PASCAL VOC 2012 multi-label classification and segmentation masks (array_record)."""

    name = "apjax_voc2012"
    # tfds derives this from the module through `importlib_resources`, which is not installed;
    # give it directly (there is no checksums file beside it: nothing is downloaded).
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(
            name="classification",
            description="ImageSets/Main train and val with 20-class multi-hot labels.",
        ),
        tfds.core.BuilderConfig(
            name="segmentation",
            description="ImageSets/Segmentation val with labels and class-index masks.",
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download {VOC_URL} and place {VOC_TAR_NAME} (or the extracted VOCdevkit/VOC2012 "
        f"folder) in the manual directory (<data_dir>/downloads/manual by default)."
    )
    # Set by prepare_voc: the resolved tar or VOC2012 folder (tfds's manual_dir must be a folder, and the
    # user may have given the tar itself).
    voc_source: Path | None = None

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8, encoding_format="jpeg"),
            "labels": tfds.features.Tensor(shape=(len(VOC_CLASSES),), dtype=np.uint8),
            "image_id": tfds.features.Text(),
        }
        if self.builder_config.name == "segmentation":
            features["mask"] = tfds.features.Image(
                shape=(None, None, 1), dtype=np.uint8, encoding_format="png"
            )
        return tfds.core.DatasetInfo(
            builder=self,
            description="PASCAL VOC 2012 trainval with multi-hot labels"
            + (" and segmentation masks." if self.builder_config.name == "segmentation" else "."),
            features=tfds.features.FeaturesDict(features),
            homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager):
        if self.voc_source is not None:
            manual_dir = self.voc_source
        else:
            try:
                manual_dir = dl_manager.manual_dir
            except AssertionError:  # tfds: manual dir does not exist or is empty
                manual_dir = getattr(dl_manager, "_manual_dir", None) or (
                    self.data_dir_root / "downloads" / "manual"
                )
                raise missing_source_error(Path(manual_dir).expanduser().resolve()) from None
        source = find_source(manual_dir)
        try:
            if self.builder_config.name == "segmentation":
                lists = {"val": read_id_list(source, SEGMENTATION_LIST)}
            else:
                lists = {split: read_id_list(source, rel) for split, rel in MAIN_LISTS.items()}
        finally:
            source.close()
        with_mask = self.builder_config.name == "segmentation"
        return {split: self._generate_examples(source, ids, with_mask) for split, ids in lists.items()}

    def _generate_examples(
        self, source: Source, ids: list[str], with_mask: bool
    ) -> Iterator[tuple[str, dict]]:
        try:
            for image_id in ids:
                labels = parse_labels(source, image_id)
                jpeg, size = load_image(source, image_id)
                example = {
                    "image": io.BytesIO(jpeg),
                    "labels": labels,
                    "image_id": image_id,
                }
                if with_mask:
                    example["mask"] = io.BytesIO(load_mask(source, image_id, size))
                yield image_id, example
        finally:
            source.close()


# --------------------------------------------------------------------------------------------
# Public helpers.
# --------------------------------------------------------------------------------------------


def _builder(data_dir: str | os.PathLike, config: str) -> ApjaxVoc2012:
    return ApjaxVoc2012(config=config, data_dir=os.fspath(data_dir), file_format="array_record")


def prepare_voc(data_dir: str | os.PathLike, manual_dir: str | os.PathLike | None = None) -> dict[str, int]:
    """Builds both configs into data_dir (array_record); a no-op when already prepared.

    ``manual_dir`` (default ``<data_dir>/downloads/manual``) is any of: the ``VOCtrainval_11-May-2012.tar``
    file itself, a folder holding it, the extracted ``VOCdevkit`` or ``VOCdevkit/VOC2012`` folder, or a
    folder holding ``VOCdevkit``. A failed preparation leaves no prepared version directory behind (tfds
    writes into a temporary folder and renames it at the end), so running it again starts over.

    Returns:
      the number of images of each split: ``{"train": ..., "val": ..., "segmentation_val": ...}``.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    manual = Path(manual_dir) if manual_dir is not None else data_dir / "downloads" / "manual"
    manual = manual.expanduser().resolve()
    builders = [_builder(data_dir, cfg.name) for cfg in ApjaxVoc2012.BUILDER_CONFIGS]
    todo = [b for b in builders if not b.is_prepared()]
    if todo:
        source = source_path(manual)  # fail early, before tfds creates any folder
        folder = source.parent if source.is_file() else source
        config = tfds.download.DownloadConfig(manual_dir=os.fspath(folder))
        for builder in todo:
            builder.voc_source = source
            try:
                builder.download_and_prepare(download_config=config)
            except BaseException:
                _remove_empty_dirs(builder.data_path.parent, stop=data_dir)
                raise
    return {name: len(load_voc_split(data_dir, name)) for name in _SPLITS}


def _remove_empty_dirs(path: Path, stop: Path) -> None:
    """Removes ``path`` and its parents up to (excluding) ``stop`` while they are empty."""
    path = Path(path)
    while path != stop and stop in path.parents:
        try:
            path.rmdir()
        except OSError:
            return
        path = path.parent


def load_voc_split(data_dir: str | os.PathLike, split: str):
    """Returns a random-access data source (``tfds`` ``as_data_source``) of a prepared split.

    ``split`` is one of ``"train"``, ``"val"`` (ImageSets/Main) or ``"segmentation_val"``
    (ImageSets/Segmentation/val). Each element is a dict with ``image`` uint8 (H, W, 3),
    ``labels`` uint8 (20,), ``image_id`` (str or bytes) and, for ``segmentation_val``, ``mask``
    uint8 (H, W, 1) of class indices (255 = void).
    """
    if split not in _SPLITS:
        raise ConfigError(f"Unknown PASCAL VOC 2012 split {split!r}: use one of {sorted(_SPLITS)}.")
    config, tfds_split = _SPLITS[split]
    data_dir = Path(data_dir).expanduser().resolve()
    builder = ApjaxVoc2012(config=config, data_dir=os.fspath(data_dir))
    if not builder.is_prepared():
        raise DatasetNotFoundError(
            f"PASCAL VOC 2012 ({config}) is not prepared in {data_dir}: run "
            f"python -m apjax.data.prepare --manual_dir /path/to/{VOC_TAR_NAME} --data_dir {data_dir} "
            f"(or apjax.data.voc.prepare_voc({os.fspath(data_dir)!r}, manual_dir)) first, with the tar from "
            f"{VOC_URL}, or use the built-in synthetic benchmark instead (config argument data=synthetic, "
            "as in configs/vgg16_kd.py:data=synthetic)."
        )
    return builder.as_data_source(split=tfds_split)
