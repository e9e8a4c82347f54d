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
"""

from __future__ import annotations

import io
import os
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from apjax.errors import ConfigError, MissingFileError

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
# The official split sizes (ImageSets/Main train and val, ImageSets/Segmentation val).
VOC_SPLIT_SIZES = {"train": 5717, "val": 5823, "segmentation_val": 1449}
VOC_TAR_NAME = "VOCtrainval_11-May-2012.tar"
VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"

VOC_VOID_INDEX = 255
_CLASS_INDEX = {name: i for i, name in enumerate(VOC_CLASSES)}
_VALID_MASK_VALUES = np.array(list(range(len(VOC_CLASSES) + 1)) + [VOC_VOID_INDEX])
_JPEG_QUALITY = 95

# Paths inside VOC2012/.
_MAIN_LISTS = {"train": "ImageSets/Main/train.txt", "val": "ImageSets/Main/val.txt"}
_SEGMENTATION_LIST = "ImageSets/Segmentation/val.txt"

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


def _reason(e: BaseException) -> str:
    """The exception text on one line (tarfile and PIL messages may span several)."""
    text = " ".join(str(e).split()).rstrip(".")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class DatasetNotFoundError(MissingFileError):
    """VOC source files (or the prepared dataset) are missing."""


class VocDataError(ConfigError):
    """A VOC source file exists but its content is invalid."""


# --------------------------------------------------------------------------------------------
# Sources: the extracted folder or the tar.
# --------------------------------------------------------------------------------------------


class _FolderSource:
    """Reads files of an extracted ``VOC2012`` folder."""

    def __init__(self, root: Path):
        self.root = root

    def describe(self, rel: str) -> str:
        return str(self.root / rel)

    def read(self, rel: str) -> bytes:
        path = self.root / rel
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise DatasetNotFoundError(
                f"PASCAL VOC 2012 file {path} is missing: re-extract {VOC_TAR_NAME} "
                f"(from {VOC_URL}) so that the VOC2012 folder is complete."
            ) from None
        except OSError as e:
            raise VocDataError(f"PASCAL VOC 2012 file {path} cannot be read ({_reason(e)}).") from e

    def close(self) -> None:
        pass


class _TarSource:
    """Reads members of the (uncompressed) VOC tar with random access, without extracting it.

    The member index is built once (one pass over the tar headers); the file handle is opened
    lazily and closed by :meth:`close` (it is reopened on the next read if needed).
    """

    def __init__(self, tar_path: Path):
        self.tar_path = tar_path
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] | None = None
        self._prefix = ""

    def _open(self) -> tarfile.TarFile:
        if self._tar is None:
            try:
                self._tar = tarfile.open(self.tar_path, mode="r:*")
            except (tarfile.TarError, OSError) as e:
                raise VocDataError(
                    f"{self.tar_path} is not a readable tar archive: download it again from {VOC_URL}."
                ) from e
            if self._members is None:
                self._index(self._tar)
        return self._tar

    def _index(self, tar: tarfile.TarFile) -> None:
        try:
            members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}
        except (tarfile.TarError, OSError, EOFError) as e:
            raise VocDataError(
                f"{self.tar_path} is a truncated or corrupt tar archive ({_reason(e)}): download it again "
                f"from {VOC_URL}."
            ) from e
        for prefix in ("VOCdevkit/VOC2012/", "VOC2012/", ""):
            if any(name.startswith(prefix + "JPEGImages/") for name in members):
                self._prefix = prefix
                break
        else:
            self._prefix = "VOCdevkit/VOC2012/"
        self._members = members

    def describe(self, rel: str) -> str:
        return f"{self.tar_path}:{self._prefix}{rel}"

    def read(self, rel: str) -> bytes:
        tar = self._open()
        assert self._members is not None
        member = self._members.get(self._prefix + rel)
        if member is None:
            raise DatasetNotFoundError(
                f"PASCAL VOC 2012 file {self.describe(rel)} is missing from the tar: download "
                f"{VOC_TAR_NAME} again from {VOC_URL}."
            )
        try:
            fobj = tar.extractfile(member)
            assert fobj is not None
            with fobj:
                data = fobj.read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise VocDataError(
                f"PASCAL VOC 2012 file {self.describe(rel)} cannot be read from the tar ({_reason(e)})."
            ) from e
        if len(data) != member.size:
            raise VocDataError(
                f"PASCAL VOC 2012 file {self.describe(rel)} is truncated in the tar: download "
                f"{VOC_TAR_NAME} again from {VOC_URL}."
            )
        return data

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


def _missing_source_error(manual_dir: Path) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"PASCAL VOC 2012 was not found at {manual_dir}: download {VOC_URL} and put it at "
        f"{manual_dir / VOC_TAR_NAME}, or give as the manual directory the tar file itself or the extracted "
        "VOCdevkit or VOCdevkit/VOC2012 folder."
    )


def _is_voc2012_folder(folder: Path) -> bool:
    return (folder / "ImageSets").is_dir() or (folder / "JPEGImages").is_dir()


def _source_path(manual_dir: str | os.PathLike) -> Path:
    """Where VOC 2012 is, given a manual directory; a DatasetNotFoundError when it is not there.

    Accepted, in this order: a tar file itself; a folder holding ``VOCdevkit/VOC2012``; a ``VOCdevkit``
    folder (holding ``VOC2012``); the ``VOC2012`` folder itself (holding ``ImageSets`` / ``JPEGImages``);
    a folder holding ``VOCtrainval_11-May-2012.tar``.
    """
    manual_dir = Path(manual_dir).expanduser().resolve()
    if manual_dir.is_file():
        return manual_dir
    for folder in (manual_dir / "VOCdevkit" / "VOC2012", manual_dir / "VOC2012", manual_dir):
        if folder.is_dir() and _is_voc2012_folder(folder):
            return folder
    tar_path = manual_dir / VOC_TAR_NAME
    if tar_path.is_file():
        return tar_path
    raise _missing_source_error(manual_dir)


def _find_source(manual_dir: str | os.PathLike) -> _FolderSource | _TarSource:
    """Returns the VOC source at ``manual_dir`` (see :func:`_source_path`)."""
    path = _source_path(manual_dir)
    return _TarSource(path) if path.is_file() else _FolderSource(path)


# --------------------------------------------------------------------------------------------
# Per-file parsing / validation.
# --------------------------------------------------------------------------------------------


def _read_id_list(source: _FolderSource | _TarSource, rel: str) -> list[str]:
    raw = source.read(rel)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise VocDataError(
            f"PASCAL VOC 2012 list file {source.describe(rel)} is not a text file ({_reason(e)})."
        ) from e
    ids = [line.split()[0] for line in text.splitlines() if line.strip()]
    if not ids:
        raise VocDataError(f"PASCAL VOC 2012 list file {source.describe(rel)} lists no images.")
    if len(set(ids)) != len(ids):
        raise VocDataError(f"PASCAL VOC 2012 list file {source.describe(rel)} lists some image ids twice.")
    return ids


def _parse_labels(source: _FolderSource | _TarSource, image_id: str) -> np.ndarray:
    """Multi-hot uint8 (20,) of every ``<object><name>`` in the annotation (difficult included)."""
    rel = f"Annotations/{image_id}.xml"
    raw = source.read(rel)
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as e:
        raise VocDataError(
            f"PASCAL VOC 2012 annotation {source.describe(rel)} is not valid XML ({_reason(e)})."
        ) from e
    labels = np.zeros((len(VOC_CLASSES),), dtype=np.uint8)
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in _CLASS_INDEX:
            raise VocDataError(
                f"PASCAL VOC 2012 annotation {source.describe(rel)} has an object with unknown "
                f"class name {name!r}."
            )
        labels[_CLASS_INDEX[name]] = 1
    return labels


def _load_image(source: _FolderSource | _TarSource, image_id: str) -> tuple[bytes, tuple[int, int]]:
    """Returns (RGB JPEG bytes, (width, height)); the file is fully decoded to validate it.

    RGB JPEGs are returned byte for byte; anything else (grayscale, CMYK, ...) is converted to
    RGB and re-encoded as JPEG.
    """
    rel = f"JPEGImages/{image_id}.jpg"
    raw = source.read(rel)
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            size = img.size
            if img.format == "JPEG" and img.mode == "RGB":
                return raw, size
            rgb = img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise VocDataError(
            f"PASCAL VOC 2012 image {source.describe(rel)} is corrupt or unreadable ({_reason(e)}): "
            f"replace it with the file from {VOC_TAR_NAME}."
        ) from e
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=_JPEG_QUALITY)
    return buf.getvalue(), size


def _load_mask(source: _FolderSource | _TarSource, image_id: str, image_size: tuple[int, int]) -> bytes:
    """Returns the class-index mask as a single-channel ('L') PNG; 255 (void) is kept."""
    rel = f"SegmentationClass/{image_id}.png"
    raw = source.read(rel)
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            mode = img.mode
            # For a palette image this is the palette INDEX, never the colour.
            index = np.asarray(img) if mode in ("P", "L") else None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise VocDataError(
            f"PASCAL VOC 2012 mask {source.describe(rel)} is corrupt or unreadable ({_reason(e)})."
        ) from e
    if index is None:
        raise VocDataError(
            f"PASCAL VOC 2012 mask {source.describe(rel)} has mode {mode!r} but must be a "
            f"palette ('P') or 'L' image whose values are class indices."
        )
    height, width = index.shape
    if (width, height) != image_size:
        raise VocDataError(
            f"PASCAL VOC 2012 mask {source.describe(rel)} is {width}x{height} but its image "
            f"{source.describe(f'JPEGImages/{image_id}.jpg')} is {image_size[0]}x{image_size[1]}."
        )
    bad = np.setdiff1d(np.unique(index), _VALID_MASK_VALUES)
    if bad.size:
        raise VocDataError(
            f"PASCAL VOC 2012 mask {source.describe(rel)} holds values {bad.tolist()} that are "
            f"not class indices (0..20 or 255)."
        )
    buf = io.BytesIO()
    Image.fromarray(index.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


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
                raise _missing_source_error(Path(manual_dir).expanduser().resolve()) from None
        source = _find_source(manual_dir)
        try:
            if self.builder_config.name == "segmentation":
                lists = {"val": _read_id_list(source, _SEGMENTATION_LIST)}
            else:
                lists = {split: _read_id_list(source, rel) for split, rel in _MAIN_LISTS.items()}
        finally:
            source.close()
        with_mask = self.builder_config.name == "segmentation"
        return {split: self._generate_examples(source, ids, with_mask) for split, ids in lists.items()}

    def _generate_examples(
        self, source: _FolderSource | _TarSource, ids: list[str], with_mask: bool
    ) -> Iterator[tuple[str, dict]]:
        try:
            for image_id in ids:
                labels = _parse_labels(source, image_id)
                jpeg, size = _load_image(source, image_id)
                example = {
                    "image": io.BytesIO(jpeg),
                    "labels": labels,
                    "image_id": image_id,
                }
                if with_mask:
                    example["mask"] = io.BytesIO(_load_mask(source, image_id, size))
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
        source = _source_path(manual)  # fail early, before tfds creates any folder
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
