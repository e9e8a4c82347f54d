"""Reading torchvision weight files without torch (the families' imports use it: :mod:`apjax.models.vgg`,
:mod:`apjax.models.resnet`).

Files: an ``.npz`` with the state dict's keys, or a ``.pth``/``.pt`` written by ``torch.save`` (its zip
format, the default since torch 1.6), read without torch by :func:`load_state_dict`: a restricted
unpickler that builds only tensors (as numpy arrays) and plain containers and refuses any other global,
so a weight file cannot run code. torch is never imported.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from apjax.errors import ConfigError, MissingFileError, MissingKeyError

# torch.save's storage classes (the pickle names them as globals ``torch.<Name>``) -> element dtype.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
# torch.save's legacy (< 1.6) format starts with the pickle of its magic number 0x1950a86a20f9469cfc6c.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_CONVERT_HINT = (
    "re-save it with a current torch as torch.save(state_dict, path), or convert it to .npz with "
    "np.savez(out, **{k: v.numpy() for k, v in state_dict.items()})"
)


class _Refusal(ConfigError):
    """A one-sentence refusal raised while unpickling (other errors there get wrapped into one)."""


class _StorageType:
    """What the global ``torch.FloatStorage`` (...) unpickles to: a dtype tag, nothing callable."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype


class _Storage:
    """One ``data/<key>`` record: a flat array of ``numel`` elements in native byte order."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a torch.save ``data.pkl`` into numpy arrays, accepting only what a state dict needs.

    ``find_class`` is the only way a pickle reaches Python callables, so refusing every global but
    OrderedDict, the tensor/parameter rebuild functions (replaced by numpy versions here), the storage
    type names and ``torch.Size`` means no code of the file's choosing runs.
    """

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str, path: str):
        super().__init__(io.BytesIO(data))
        self._zip, self._prefix, self._byteorder, self._path = archive, prefix, byteorder, path
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return self._rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if (module, name) == ("torch", "Size"):
            return tuple
        raise _Refusal(
            f"{self._path} was refused unread: its pickle references the global {module}.{name}, which a "
            f"state dict of tensors and plain containers does not need; {_CONVERT_HINT}."
        )

    def persistent_load(self, pid: Any) -> _Storage:
        """``('storage', storage_type, key, location, numel)`` -> the ``data/<key>`` record's elements."""
        ok = isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
        if not (ok and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and _is_int(pid[4])):
            raise _Refusal(f"{self._path} has a malformed storage reference {pid!r}; {_CONVERT_HINT}.")
        _, stype, key, _location, numel = pid  # the location (cpu, cuda:0) does not matter to numpy
        if key in self._storages:
            return self._storages[key]
        name = f"{self._prefix}/data/{key}"
        try:
            info = self._zip.getinfo(name)
        except KeyError:
            raise _Refusal(f"{self._path} lacks the storage record {name}; the file is damaged.") from None
        dtype = stype.dtype
        # Checked before reading, so a damaged or hostile file cannot make us inflate a huge record.
        if info.file_size != numel * dtype.itemsize:
            raise _Refusal(
                f"{self._path}: storage record {name} holds {info.file_size} bytes but {numel} "
                f"{stype.name} elements need {numel * dtype.itemsize}; the file is damaged."
            )
        raw = np.frombuffer(self._zip.read(name), np.dtype(f"u{dtype.itemsize}"))
        if self._byteorder != _native_byteorder() and dtype.itemsize > 1:
            raw = raw.byteswap()
        self._storages[key] = _Storage(raw.view(dtype))
        return self._storages[key]

    def _rebuild_tensor(
        self, storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None
    ) -> np.ndarray:
        """torch's ``_rebuild_tensor_v2``: the view ``(offset, size, stride)`` of a storage, copied out."""
        del requires_grad, backward_hooks  # autograd state: nothing to keep in numpy
        if metadata and any(metadata.values()):  # conj/neg bits would change the values
            raise _Refusal(
                f"{self._path} holds a tensor with lazy conj/neg bits {metadata}; {_CONVERT_HINT}."
            )
        shape, strides = tuple(size), tuple(stride)
        valid = isinstance(storage, _Storage) and _is_int(storage_offset) and storage_offset >= 0
        valid = valid and len(shape) == len(strides)
        valid = valid and all(_is_int(n) and n >= 0 for n in shape + strides)
        if not valid:
            raise _Refusal(
                f"{self._path} has a malformed tensor (offset {storage_offset!r}, size {size!r}, "
                f"stride {stride!r}); {_CONVERT_HINT}."
            )
        flat = storage.array
        if 0 in shape:
            return np.zeros(shape, flat.dtype)
        last = storage_offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        if last >= flat.size:  # as_strided does not check bounds: never read past the storage
            raise _Refusal(
                f"{self._path} has a tensor (offset {storage_offset}, size {shape}, stride {strides}) that "
                f"reaches element {last} of a {flat.size}-element storage; the file is damaged."
            )
        view = np.lib.stride_tricks.as_strided(
            flat[storage_offset:],
            shape=shape,
            strides=tuple(s * flat.dtype.itemsize for s in strides),
            writeable=False,
        )
        return np.array(view)  # a contiguous copy: the result never aliases another entry

    def _rebuild_parameter(self, data, requires_grad, backward_hooks) -> np.ndarray:
        """torch's ``_rebuild_parameter`` (an nn.Parameter): its tensor."""
        del requires_grad, backward_hooks
        if not isinstance(data, np.ndarray):
            raise _Refusal(f"{self._path} has a parameter that wraps no tensor; {_CONVERT_HINT}.")
        return data


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _native_byteorder() -> str:
    return "little" if np.little_endian else "big"


def _read_torch_zip(path: str) -> Any:
    """The object a torch.save zip archive holds, tensors as numpy arrays (see the module docstring)."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
        if head == _LEGACY_MAGIC:
            raise ConfigError(
                f"{path} is in torch's legacy format (torch < 1.6 or _use_new_zipfile_serialization=False), "
                f"which apjax cannot read without torch; {_CONVERT_HINT}."
            )
        raise ConfigError(f"{path} is not a torch.save zip archive (torch >= 1.6); {_CONVERT_HINT}.")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ConfigError(
                f"{path} is a zip file but no torch.save archive (no data.pkl); {_CONVERT_HINT}."
            )
        prefix = pickles[0].split("/")[0]
        if f"{prefix}/constants.pkl" in names or any(n.startswith(f"{prefix}/code/") for n in names):
            raise ConfigError(
                f"{path} is a TorchScript archive (torch.jit.save), not a state dict; save the weights with "
                "torch.save(model.state_dict(), path) or convert them to .npz."
            )
        byteorder = "little"  # torch wrote no byteorder record before 1.12, all on little-endian hosts
        if f"{prefix}/byteorder" in names:
            byteorder = archive.read(f"{prefix}/byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise ConfigError(
                    f"{path} has an unknown byteorder record {byteorder!r}; the file is damaged."
                )
        unpickler = _StateDictUnpickler(archive.read(pickles[0]), archive, prefix, byteorder, path)
        try:
            return unpickler.load()
        except _Refusal:
            raise  # our own one-sentence refusals
        except Exception as e:  # anything the pickle machinery raises on a malformed stream
            raise ConfigError(
                f"{path} has a malformed pickle ({type(e).__name__}: {e}); {_CONVERT_HINT}."
            ) from e


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a state dict from an ``.npz`` or a torch.save ``.pth``/``.pt`` file, without torch.

    A ``.pth`` holding a training checkpoint with the state dict under ``'state_dict'`` or ``'model'``
    is unwrapped; entries that are not tensors (e.g. an epoch count) are dropped.

    Returns:
      ``{key: array}`` with each tensor's shape and dtype (float16, ``ml_dtypes.bfloat16``, int64, ...).
    """
    if not os.path.exists(path):
        raise MissingFileError(f"weight file {path} does not exist; check the path.")
    if path.endswith(".npz"):
        with np.load(path) as f:
            return {k: np.asarray(f[k]) for k in f.files}
    if not path.endswith((".pth", ".pt", ".pth.tar")):
        raise ConfigError(f"unknown weight file type {path}; use a .pth/.pt (torch.save) or .npz file.")
    obj = _read_torch_zip(path)
    if isinstance(obj, Mapping):
        nested = [k for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)]
        obj = obj[nested[0]] if nested else obj
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{path} holds a {type(obj).__name__}, not a state dict (a dict of tensors).")
    sd = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if not sd or not all(isinstance(k, str) for k in sd):
        raise ConfigError(f"{path} holds no state dict (a dict with string keys and tensor values).")
    return sd


def take_entry(sd: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
    """``sd[key]`` as float32 of exactly ``shape``; one-sentence errors for a missing key or another shape."""
    if key not in sd:
        raise MissingKeyError(
            f"the state dict has no {key!r}; it does not match this model's widths "
            "(a torchvision state dict of the same architecture is expected)."
        )
    value = np.asarray(sd[key], np.float32)
    if value.shape != shape:
        raise ConfigError(
            f"state dict entry {key!r} has shape {value.shape} but the model expects {shape}; "
            "the weights belong to another architecture."
        )
    return value
