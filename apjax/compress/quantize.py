"""What a quantized model stores (issue 15 part 2): the bytes of a deployed model under a scheme.

The schemes (:data:`apjax.models.quantized.QUANT_SCHEMES`) and the qwix-quantized model
(:func:`apjax.models.quantized.quantize_model`) live with the models, so that the trainer can rebuild a
quantized run's model; this module counts its size. Each quantized kernel (every conv and Dense
``kernel``) is packed at the scheme's weight bits with one float32 scale per output channel; conv biases,
BatchNorm and the head's bias stay float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from apjax.models.quantized import scheme

FLOAT_BYTES = 4  # a float32 scale per output channel of every quantized kernel


def is_quantized_kernel(path: tuple[str, ...], leaf: Any) -> bool:
    """Whether a parameter is a kernel that the scheme quantizes: every conv kernel (4-D) and Dense kernel
    (2-D) named ``kernel``; biases and BatchNorm stay float."""
    return path[-1] == "kernel" and np.ndim(leaf) in (2, 4)


def model_size_bytes(variables: Mapping[str, Any], bits: str | None) -> dict[str, int]:
    """What a model stores, in bytes: ``size_bytes`` (each quantized kernel packed at its bits, plus one
    float32 scale per output channel; every other parameter and BatchNorm statistic as stored, float32),
    ``float_size_bytes`` (everything as stored, unquantized) and ``quantized_weights`` (the number of
    quantized kernel entries). ``bits`` None: a float model (``size_bytes`` = ``float_size_bytes``).

    ``variables``: ``{'params': ..., 'batch_stats': ...}`` of the model.
    """
    wbits = scheme(bits).weight_bits if bits else None
    size = floats = quantized = 0
    for collection in ("params", "batch_stats"):
        tree = dict(variables.get(collection) or {})
        for path, leaf in traverse_util.flatten_dict(tree).items():
            n, stored = int(np.size(leaf)), int(np.size(leaf)) * jax.numpy.dtype(leaf.dtype).itemsize
            floats += stored
            if wbits and collection == "params" and is_quantized_kernel(path, leaf):
                size += math.ceil(n * wbits / 8) + FLOAT_BYTES * int(np.shape(leaf)[-1])
                quantized += n
            else:
                size += stored
    return {"size_bytes": size, "float_size_bytes": floats, "quantized_weights": quantized}
