"""The optimizer and its schedule: SGD as torch does it, and the one place where epochs become steps."""

from __future__ import annotations

from typing import Any

import ml_collections
import optax


def epochs_to_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> dict[str, Any]:
    """Every epoch-based duration of ``config`` in steps: the one place where epochs become steps.

    Returns ``{'total': num_epochs * steps_per_epoch, 'lr_decay': [e * steps_per_epoch, ...]}``; the
    learning rate drops at the first step of each decay epoch, as torch's MultiStepLR stepped once per
    epoch does.
    """
    return {
        "total": int(config.num_epochs) * steps_per_epoch,
        "lr_decay": [int(e) * steps_per_epoch for e in config.lr_decay_epochs],
    }


def create_learning_rate_fn(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Piecewise-constant learning rate: ``lr * factor**(number of decay epochs <= epoch of step)``."""
    steps = epochs_to_steps(config, steps_per_epoch)["lr_decay"]
    boundaries = {b: config.lr_decay_factor for b in steps}
    return optax.piecewise_constant_schedule(config.optimizer.learning_rate, boundaries)


def create_optimizer(
    config: ml_collections.ConfigDict, lr_fn: optax.Schedule
) -> optax.GradientTransformation:
    """SGD as torch does it: the loss gradient clipped to global norm ``clip_norm`` (0: no clipping, the
    default; torch's ``clip_grad_norm_`` before the step), weight decay added, then (optional) momentum."""
    o = config.optimizer
    clip = float(o.get("clip_norm", 0.0))
    return optax.chain(
        *([optax.clip_by_global_norm(clip)] if clip > 0 else []),
        optax.add_decayed_weights(o.weight_decay),
        optax.sgd(lr_fn, momentum=o.momentum or None, nesterov=o.nesterov),
    )
