"""Reading PASCAL VOC 2012's source files (the tar or the extracted folder) and checking each one.

A source is a :class:`FolderSource` (an extracted ``VOC2012`` folder) or a :class:`TarSource` (members of
``VOCtrainval_11-May-2012.tar`` read in place); :func:`find_source` picks it from the manual directory.
The parsers turn one image's files into the builder's features (labels, JPEG bytes, mask PNG bytes) and
raise :class:`VocDataError` (one sentence) on any invalid content.
"""

from __future__ import annotations

import io
import os
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
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
VOC_TAR_NAME = "VOCtrainval_11-May-2012.tar"
VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"

VOC_VOID_INDEX = 255
_CLASS_INDEX = {name: i for i, name in enumerate(VOC_CLASSES)}
_VALID_MASK_VALUES = np.array(list(range(len(VOC_CLASSES) + 1)) + [VOC_VOID_INDEX])
_JPEG_QUALITY = 95

# Paths inside VOC2012/.
MAIN_LISTS = {"train": "ImageSets/Main/train.txt", "val": "ImageSets/Main/val.txt"}
SEGMENTATION_LIST = "ImageSets/Segmentation/val.txt"


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


class FolderSource:
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


class TarSource:
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


# Either kind of source: both have describe(rel), read(rel) -> bytes and close().
Source = FolderSource | TarSource


def missing_source_error(manual_dir: Path) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"PASCAL VOC 2012 was not found at {manual_dir}: download {VOC_URL} and put it at "
        f"{manual_dir / VOC_TAR_NAME}, or give as the manual directory the tar file itself or the extracted "
        "VOCdevkit or VOCdevkit/VOC2012 folder."
    )


def _is_voc2012_folder(folder: Path) -> bool:
    return (folder / "ImageSets").is_dir() or (folder / "JPEGImages").is_dir()


def source_path(manual_dir: str | os.PathLike) -> Path:
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
    raise missing_source_error(manual_dir)


def find_source(manual_dir: str | os.PathLike) -> Source:
    """Returns the VOC source at ``manual_dir`` (see :func:`source_path`)."""
    path = source_path(manual_dir)
    return TarSource(path) if path.is_file() else FolderSource(path)


# --------------------------------------------------------------------------------------------
# Per-file parsing / validation.
# --------------------------------------------------------------------------------------------


def read_id_list(source: Source, rel: str) -> list[str]:
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


def parse_labels(source: Source, image_id: str) -> np.ndarray:
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


def load_image(source: Source, image_id: str) -> tuple[bytes, tuple[int, int]]:
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


def load_mask(source: Source, image_id: str, image_size: tuple[int, int]) -> bytes:
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
