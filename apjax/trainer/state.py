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

from apjax.compress.unstructured import all_kept_masks
from apjax.models import init_variables


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
        from apjax.models.torch_import import import_torchvision_vgg_bn, load_state_dict

        variables = import_torchvision_vgg_bn(
            load_state_dict(os.path.expanduser(config.init_from)), variables, model.widths
        )
    kept = all_kept_masks(variables["params"]) if masks else {}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        rng=jax.random.key_data(run_key),
        masks=kept,
    )


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
    """``tree`` (params or gradients) with the conv kernels zeroed where ``masks`` is False."""
    if not masks:
        return tree
    out = dict(tree)
    for name, m in masks.items():
        out[name] = {**tree[name], "kernel": jnp.where(m, tree[name]["kernel"], 0)}
    return out


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
