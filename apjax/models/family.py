"""The model protocol: what apjax needs to know about a family of Flax models, as one record.

A model family (``apjax/models/vgg.py``, ``apjax/models/resnet.py``) is a Flax module class whose forward
pass ``model.apply(variables, x, train=...) -> logits (B, K)`` exposes its taps with
:func:`apjax.models.taps.tap` (Flax ``perturb`` + ``sow``), and whose instances name them:

- ``model.tap_names``: every tap, in forward order;
- ``model.gradcam_tap``: the layer the Grad-CAM evaluation reads (the last conv stage).

Its module then defines one :class:`ModelFamily` and the registry (:data:`apjax.models.FAMILIES`) gets one
line. The tasks, the matching maps, unstructured pruning (every 4-D conv kernel of the parameter tree) and
the localisation evaluation then work on it unchanged; structured pruning and the rule-based attribution
methods (Excitation Backprop, LRP, RAP) walk a plain conv chain and say so for a family without one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One family of models.

    Attributes:
      name: the family's name (``'vgg'``).
      module: the Flax module class of its models.
      recognizes: ``config.model`` string -> whether it names a model of this family.
      build: ``(spec, num_classes=, dtype=, dropout_rate=, init=) -> model`` (raises ``ConfigError`` for a
        malformed spec or init; ``init`` is ``'pytorch_default'`` or ``'torchvision'``).
      check_input: ``(model, image_size)``: raises ``ConfigError`` when square images of that side are too
        small for the model.
      student: ``(spec, divisor) -> spec`` of the model with every width divided (the sweep's students).
      import_weights: ``(state_dict, variables, model) -> variables`` with torchvision's weights (numpy
        arrays by torch key) copied in and a new head, or None when the family has no import.
      plain_chain: True when the net is a chain of conv -> BN -> ReLU and pools (structured pruning and
        the rule-based attribution methods need this).
      examples: config.model values shown in error messages.
    """

    name: str
    module: type[nn.Module]
    recognizes: Callable[[str], bool]
    build: Callable[..., nn.Module]
    check_input: Callable[[nn.Module, int], None]
    student: Callable[[str, int], str]
    import_weights: Callable[[Mapping[str, np.ndarray], Mapping[str, Any], nn.Module], dict] | None = None
    plain_chain: bool = False
    examples: tuple[str, ...] = ()


def init_variables(model: nn.Module, key: jax.Array, image_size: int) -> dict[str, Any]:
    """``{'params', 'batch_stats'}`` of ``model`` for square inputs of side ``image_size`` (the caller checks
    the size with its family's ``check_input``)."""
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = jax.jit(lambda k: model.init(k, x))(key)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def conv_kernels(params: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Every conv kernel (a 4-D ``kernel``) of a parameter tree, by the path of its module joined with '/'
    (``conv1_1`` in a VGG, ``layer1_0/conv1/conv`` in a ResNet): the prunable weights, in tree order."""
    flat = traverse_util.flatten_dict(dict(params))
    return {"/".join(path[:-1]): k for path, k in flat.items() if path[-1] == "kernel" and k.ndim == 4}
