"""How an export stores its weights: float32, int8 values, packed int4 values, or a sparse bitmask.

Imported by the loader, so numpy and jax.numpy only. The four storage forms (``meta.json``'s
``weights.storage``):

- ``float32``: every array as it is, 4 bytes a value;
- ``int8``: each conv kernel of a quantized run as its int8 values (1 byte a value, the kernel's shape)
  beside one float32 scale per output channel; the functions dequantize inside;
- ``int4_packed``: each conv kernel of an ``int4w`` run as its int4 values, two per byte (:func:`pack_int4`,
  ``ceil(n / 2)`` bytes) beside one float32 scale per output channel; the functions unpack and dequantize
  inside (:func:`unpack_int4` with ``jax.numpy``);
- ``sparse_bitmask``: each conv kernel of an unstructured pruning run as a bitmask of its non-zero values
  (one bit a value, ``ceil(n / 8)`` bytes, :func:`sparse_encode`) and those values in float32, row-major
  order (4 bytes each); the loader rebuilds the dense kernel exactly (:func:`sparse_decode`) and the
  functions take it dense.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

STORAGES = ("float32", "int8", "int4_packed", "sparse_bitmask")
INT4_MIN, INT4_MAX = -8, 7


def pack_int4(values) -> np.ndarray:
    """Integer ``values`` in [-8, 7] (any shape, read row-major) as uint8 bytes, two 4-bit two's-complement
    values a byte: value ``2i`` in the low nibble of byte ``i``, value ``2i + 1`` in its high nibble (an odd
    count leaves the last high nibble 0). ``ceil(n / 2)`` bytes."""
    flat = np.asarray(values).ravel()
    if flat.size and (flat.min() < INT4_MIN or flat.max() > INT4_MAX):
        raise ValueError(f"int4 values lie in [{INT4_MIN}, {INT4_MAX}], got [{flat.min()}, {flat.max()}].")
    nibbles = (flat.astype(np.int16) & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed, count: int, xp=np):
    """The ``count`` int8 values in [-8, 7] that :func:`pack_int4` packed into ``packed``, with the array
    module ``xp`` (numpy, or jax.numpy inside a traced function)."""
    packed = xp.asarray(packed, dtype=xp.uint8)
    nibbles = xp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(-1)[:count].astype(xp.int8)
    return xp.where(nibbles >= 8, nibbles - 16, nibbles).astype(xp.int8)


def int4_packed_bytes(count: int) -> int:
    return math.ceil(count / 2)


def sparse_encode(dense) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, values)`` of a float32 array: ``mask`` the bits (little bit order, row-major, uint8
    ``ceil(n / 8)`` bytes) of the entries that are not +0.0, ``values`` those entries, float32, row-major.
    A -0.0 counts as a value, so that :func:`sparse_decode` gives back the same bits."""
    flat = np.ascontiguousarray(dense, dtype=np.float32).ravel()
    kept = flat.view(np.uint32) != 0
    return np.packbits(kept, bitorder="little"), flat[kept]


def sparse_decode(mask, values, shape: Sequence[int]) -> np.ndarray:
    """The dense float32 array of ``shape`` that :func:`sparse_encode` stored as ``(mask, values)``;
    ``ValueError`` when they do not fit the shape."""
    count = math.prod(shape)
    mask, values = np.asarray(mask, np.uint8), np.asarray(values, np.float32)
    if mask.shape != (math.ceil(count / 8),):
        raise ValueError(f"a bitmask of {count} values has {math.ceil(count / 8)} bytes, not {mask.shape}")
    kept = np.unpackbits(mask, count=count, bitorder="little").astype(bool)
    if int(kept.sum()) != values.size:
        raise ValueError(f"the bitmask marks {int(kept.sum())} values but {values.size} are stored")
    dense = np.zeros(count, np.float32)
    dense[kept] = values
    return dense.reshape(tuple(shape))


def sparse_bytes(count: int, nonzero: int) -> int:
    """Bytes of the sparse form of ``count`` values of which ``nonzero`` are stored: the bitmask plus 4
    bytes a stored value."""
    return math.ceil(count / 8) + 4 * nonzero
