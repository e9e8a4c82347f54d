"""The weights an export stores and the functions take (the exporter's side of :mod:`apjax.deploy.storage`).

:func:`stored_weights` chooses a run's storage form: ``sparse_bitmask`` for unstructured pruning,
``int8`` or ``int4_packed`` for quantization (the scheme's weight type), else ``float32``.

Quantized runs. Each conv kernel is stored as the integer values and per-output-channel float32 scales
that qwix's quantized forward computes from the float latent kernel (:func:`quantize_kernel`, through
``qwix.quantize`` with the conv's channelwise axis, the output channels: absmax calibration, scale
``max |w| / (qmax + 0.5)``). Inside the functions the kernel is dequantized (``q * scale``, qwix's
``dequantize``) and the model runs as qwix's ``QtProvider`` with one change (:class:`StoredScaleProvider`):
each conv's weight calibration is the stored scale times ``qmax + 0.5`` instead of the absmax of the
dequantized kernel, so that qwix derives the stored scale again and re-quantizes the dequantized kernel
to the stored integers (both checked for every channel at export, :func:`quantize_kernel`). The
activations (``int8``) are quantized on the fly as in the evaluation. So the functions compute qwix's
quantized forward and its straight-through backward pass of the run's weights.

The Dense head's kernel stays float32 latent (qwix quantizes it on the fly, as in the evaluation): qwix's
backward pass through a Dense layer uses its FLOAT latent kernel (:mod:`apjax.models.quantized`), so a
stored int kernel could not give the evaluation's Grad-CAM gradients. It is one small matrix (64 x K in
the tests' tiny VGG).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from qwix._src.core import numerics  # qwix's own bound (qmax + 0.5), so the scale is derived as qwix does
from qwix._src.utils import flax_util  # the module path and parameter name of an intercepted conv

from apjax.deploy.storage import int4_packed_bytes, pack_int4, sparse_bytes, sparse_encode, unpack_int4
from apjax.errors import ConfigError
from apjax.models.quantized import qt_rules, scheme

# The storage form of a quantization scheme's weight type.
QUANT_STORAGE = {"int8": "int8", "int4": "int4_packed"}


def is_conv_kernel(name: str, array: np.ndarray) -> bool:
    """A conv kernel (``params/.../kernel``, 4-D): what quantization packs and pruning zeroes."""
    return name.startswith("params/") and name.endswith("/kernel") and np.ndim(array) == 4


def quantize_kernel(kernel: np.ndarray, weight_qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """``(values int8 of the kernel's shape, scales float32 (C_out,))``: qwix's quantization of a conv
    kernel (HWIO, one scale per output channel), as its quantized forward computes it. Checks that the
    functions' reconstruction is exact: the scale times qwix's bound divided by it again is the scale,
    and ``round(values * scale / scale)`` are the values."""
    kernel = jnp.asarray(kernel, jnp.float32)
    quantized = qwix.quantize(kernel, weight_qtype, channelwise_axes=[kernel.ndim - 1])
    values = np.asarray(quantized.qvalue.astype(jnp.int8))
    scale = np.asarray(quantized.scale, np.float32).reshape(-1)
    bound = numerics.get_symmetric_bound(weight_qtype)
    # As XLA compiles them (it may divide by a constant as a multiplication by its reciprocal).
    rescaled, requantized = _round_trip(jnp.asarray(values), jnp.asarray(scale), bound)
    if not (np.array_equal(rescaled, scale) and np.array_equal(requantized, values)):
        raise ConfigError(
            f"a {weight_qtype} kernel's scales do not survive the round trip through qwix's bound, so the "
            "exported functions could not reproduce qwix's forward exactly; report this kernel."
        )
    return values, scale


@functools.partial(jax.jit, static_argnums=2)
def _round_trip(values: jax.Array, scale: jax.Array, bound: float) -> tuple[jax.Array, jax.Array]:
    """What the functions derive again from stored ``(values, scale)``: qwix's scale of the calibration
    ``scale * bound``, and qwix's rounding of the dequantized kernel by it."""
    rescaled = (scale * bound) / bound
    return rescaled, jnp.round(values.astype(jnp.float32) * scale / rescaled).astype(jnp.int8)


class StoredScaleProvider(qwix.QtProvider):
    """qwix's ``QtProvider`` whose conv weights are calibrated to the stored scales: ``scales`` maps a
    kernel's name (``params/conv1_1/kernel``) to its float32 scales (C_out,), ``bound`` is qwix's bound of
    the weight type (``qmax + 0.5``)."""

    def __init__(self, rules, scales: Mapping[str, jax.Array], bound: float):
        super().__init__(rules)
        self._stored_scales, self._bound = dict(scales), bound

    def _create_conv_general_qt_config(self, rule, op_id, lhs, rhs):
        config = super()._create_conv_general_qt_config(rule, op_id, lhs, rhs)
        path = (*map(str, flax_util.get_current_module_path()), flax_util.find_param(rhs))
        absmax = self._stored_scales["/".join(("params", *path))] * self._bound

        def calibration(measured):
            return {"absmax": absmax.reshape(measured["absmax"].shape)}

        return dataclasses.replace(config, rhs_collect_quant_stat=calibration)


@dataclasses.dataclass
class StoredWeights:
    """A run's weights as stored and as the functions take them.

    ``names``/``arrays``: the eval-mode variables (float32, jax's flattening order, ``treedef``);
    ``arguments``: the functions' arguments in order, ``(name, array, stored_as)`` with ``stored_as``
    'dense' (the array is in the file under ``name``) or 'sparse_bitmask' (``name/mask`` and
    ``name/values``; the loader rebuilds it); ``files``: the arrays of ``weights.npz``; ``rows``: per
    variable, its storage and bytes for ``meta.json``; ``prepare``: None (the arguments are the variables)
    or ``(model, arguments) -> (model, variable leaves)``, traced inside the functions."""

    storage: str
    names: list[str]
    arrays: list[np.ndarray]
    treedef: Any
    arguments: list[tuple[str, np.ndarray, str]]
    files: dict[str, np.ndarray]
    rows: list[dict[str, Any]]
    prepare: Callable | None = None


def _row(name: str, array: np.ndarray, storage: str, stored: int) -> dict[str, Any]:
    return {"name": name, "shape": list(array.shape), "storage": storage, "dense_bytes": int(array.nbytes),
            "stored_bytes": int(stored)}  # fmt: skip


def _add_float(out: StoredWeights, name: str, array: np.ndarray) -> None:
    """Stores ``array`` as it is, float32 under ``name``, a dense argument of the functions."""
    out.files[name] = array
    out.rows.append(_row(name, array, "float32", array.nbytes))
    out.arguments.append((name, array, "dense"))


def _empty(storage: str, names, arrays, treedef) -> StoredWeights:
    return StoredWeights(storage, names, arrays, treedef, arguments=[], files={}, rows=[])


def _float(names, arrays, treedef) -> StoredWeights:
    out = _empty("float32", names, arrays, treedef)
    for name, array in zip(names, arrays, strict=True):
        _add_float(out, name, array)
    return out


def _sparse(names, arrays, treedef) -> StoredWeights:
    out = _empty("sparse_bitmask", names, arrays, treedef)
    for name, array in zip(names, arrays, strict=True):
        if not is_conv_kernel(name, array):
            _add_float(out, name, array)
            continue
        mask, values = sparse_encode(array)
        out.files.update({f"{name}/mask": mask, f"{name}/values": values})
        out.rows.append(_row(name, array, "sparse_bitmask", sparse_bytes(array.size, values.size)))
        out.rows[-1]["nonzero"] = int(values.size)
        out.arguments.append((name, array, "sparse_bitmask"))
    return out


def _quantized(names, arrays, treedef, bits: str) -> StoredWeights:
    qtype = scheme(bits).weight_qtype
    storage = QUANT_STORAGE[qtype]
    out = _empty(storage, names, arrays, treedef)
    kinds = []  # per variable: (name, shape) of a quantized kernel, or None
    for name, array in zip(names, arrays, strict=True):
        if not is_conv_kernel(name, array):
            _add_float(out, name, array)
            kinds.append(None)
            continue
        values, scale = quantize_kernel(array, qtype)
        stored = pack_int4(values) if storage == "int4_packed" else values
        for key, a in ((f"{name}/{storage}", stored), (f"{name}/scale", scale)):
            out.files[key] = a
            out.arguments.append((key, a, "dense"))
        size = (int4_packed_bytes(values.size) if storage == "int4_packed" else values.size) + scale.nbytes
        out.rows.append(_row(name, array, storage, size))
        kinds.append((name, array.shape))
    bound = float(numerics.get_symmetric_bound(qtype))

    def prepare(model, weights):
        leaves, scales, i = [], {}, 0
        for kind in kinds:
            if kind is None:
                leaves.append(weights[i])
                i += 1
                continue
            name, shape = kind
            stored, scale = weights[i], weights[i + 1]
            i += 2
            if storage == "int4_packed":
                stored = unpack_int4(stored, int(np.prod(shape)), jnp).reshape(shape)
            leaves.append(stored.astype(jnp.float32) * scale)  # qwix's dequantize: q * per-channel scale
            scales[name] = scale
        return qwix.quantize_model(model, StoredScaleProvider(qt_rules(bits), scales, bound)), leaves

    out.prepare = prepare
    return out


def stored_weights(variables: Mapping[str, Any], task: str, bits: str | None) -> StoredWeights:
    """The storage of ``{'params', 'batch_stats'}`` for a run of ``task`` quantized at ``bits`` (or None)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(jax.device_get(dict(variables)))
    names = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]
    arrays = [np.asarray(leaf, np.float32) for _, leaf in flat]
    if bits:
        return _quantized(names, arrays, treedef, bits)
    if task == "prune_unstructured":
        return _sparse(names, arrays, treedef)
    return _float(names, arrays, treedef)
