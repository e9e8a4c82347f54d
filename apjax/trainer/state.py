"""The train state and the update that every task's step ends with.

``TrainState`` holds the parameters, BatchNorm statistics, optimizer state, the run's key and (when
pruning) the masks; the key of step s is a function of the run's key and s alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from apjax.errors import ConfigError
from apjax.models import conv_kernels, family_of, init_variables
from apjax.models.torch_import import load_state_dict


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes.

    Attributes:
      step: int32 scalar, the number of steps taken.
      params: model parameters (float32).
      batch_stats: BatchNorm running statistics.
      opt_state: optimizer state.
      rng: uint32 key data (``jax.random.key_data``) of the run's base key; the key of step s is
        ``fold_in(key, s)``.
      masks: unstructured pruning masks, conv name -> bool array of that conv's kernel shape (True =
        kept); every update keeps the masked weights at exactly zero. Empty (``{}``) when not pruning.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    masks: Any = flax.struct.field(default_factory=dict)


def create_train_state(
    config: ml_collections.ConfigDict,
    model,
    tx: optax.GradientTransformation,
    *,
    pretrained: bool = True,
    masks: bool = False,
) -> TrainState:
    """A fresh state from ``config.seed``, with ``config.init_from``'s torchvision weights if set.

    ``pretrained=False`` never reads ``init_from``: the state a checkpoint is restored into (its shapes
    are the same), which may also be built under ``jax.eval_shape`` (see :func:`abstract_train_state`).
    ``masks=True`` gives every conv kernel an all-kept pruning mask (the state of a pruning round).
    """
    key = jax.random.key(config.seed)
    init_key, run_key = jax.random.split(key)
    variables = init_variables(model, init_key, config.data.image_size)
    if pretrained and config.get("init_from"):
        variables = import_weights(model, config.init_from, variables)
    kept = all_kept_masks(variables["params"]) if masks else {}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        rng=jax.random.key_data(run_key),
        masks=kept,
    )


def all_kept_masks(params: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Pruning masks that keep every conv weight (sparsity 0): conv name -> all-True bool array of that
    conv's kernel shape, for every 4-D conv kernel of ``params`` (:func:`apjax.models.conv_kernels`)."""
    return {name: jnp.ones(k.shape, bool) for name, k in conv_kernels(params).items()}


def import_weights(model, path: str, variables: dict[str, Any]) -> dict[str, Any]:
    """``variables`` with the torchvision weights of the file ``path`` (``.pth`` or ``.npz``) imported by
    ``model``'s family (a new head); ``ConfigError`` when the family has no weight import."""
    family = family_of(model)
    if family.import_weights is None:
        raise ConfigError(
            f"config.init_from is set but the {family.name} family has no weight import; unset init_from."
        )
    return family.import_weights(load_state_dict(os.path.expanduser(path)), variables, model)


def abstract_train_state(
    config: ml_collections.ConfigDict,
    model,
    tx: optax.GradientTransformation,
    sharding=None,
    masks: bool = False,
) -> TrainState:
    """Shapes and dtypes of the state (``jax.ShapeDtypeStruct`` leaves, with ``sharding`` if given): what a
    checkpoint is restored into. Computes nothing and reads no weight file."""
    abstract = jax.eval_shape(lambda: create_train_state(config, model, tx, pretrained=False, masks=masks))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract)


def step_keys(state: TrainState, n: int) -> jax.Array:
    """``n`` PRNG keys for the step ``state.step``: a function of the run's key and the step alone."""
    return jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step), n)


def mask_params(tree: Any, masks: Mapping[str, jax.Array]) -> Any:
    """``tree`` (params or gradients) with the conv kernels zeroed where ``masks`` is False; a mask's name
    is the path of its conv module, joined with '/' (``conv1_1``, ``layer1_0/conv1/conv``)."""
    if not masks:
        return tree
    flat = traverse_util.flatten_dict(tree, sep="/")
    for name, m in masks.items():
        flat[f"{name}/kernel"] = jnp.where(m, flat[f"{name}/kernel"], 0)
    return traverse_util.unflatten_dict(flat, sep="/")


def apply_gradients(
    state: TrainState, tx: optax.GradientTransformation, grads: Any, batch_stats: Any
) -> TrainState:
    """The state after one optimizer update with ``grads`` and the new BatchNorm statistics.

    With pruning masks, the gradient is masked before the optimizer (so weight decay and momentum of a
    pruned weight stay zero) and the new weights are masked again: pruned weights stay exactly zero.
    """
    grads = mask_params(grads, state.masks)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(
        step=state.step + 1,
        params=mask_params(optax.apply_updates(state.params, updates), state.masks),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """Whether every leaf of ``tree`` is finite: one boolean scalar."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
