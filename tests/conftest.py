"""Test-wide settings: eight host devices (for sharding tests) and short compiles on the CPU."""

import os

# Must be set before jax initialises its backends: lets tests build a 'data' mesh of 8 CPU devices.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402

# Compile with few optimisations: the tests run small arrays, where compile time dominates.
jax.config.update("jax_disable_most_optimizations", True)


import numpy as np  # noqa: E402
import pytest  # noqa: E402


def write_torchvision_npz(path, widths, seed: int = 0) -> None:
    """A torchvision ``vgg16_bn``-layout state dict of these widths (conv and BN, no classifier: the head
    is new, as for the paper's teacher) written as ``.npz``: what ``config.init_from`` reads."""
    from apjax.models.torch_import import torchvision_conv_indices

    rng = np.random.default_rng(seed)
    sd, in_c = {}, 3
    convs = [w for w in widths if w != "M"]
    for idx, w in zip(torchvision_conv_indices(widths), convs, strict=True):
        sd[f"features.{idx}.weight"] = rng.normal(0, (2 / (9 * in_c)) ** 0.5, (w, in_c, 3, 3)).astype(
            np.float32
        )
        sd[f"features.{idx}.bias"] = rng.normal(0, 0.1, w).astype(np.float32)
        sd[f"features.{idx + 1}.weight"] = rng.uniform(0.5, 1.5, w).astype(np.float32)
        sd[f"features.{idx + 1}.bias"] = rng.normal(0, 0.1, w).astype(np.float32)
        sd[f"features.{idx + 1}.running_mean"] = rng.normal(0, 0.1, w).astype(np.float32)
        sd[f"features.{idx + 1}.running_var"] = rng.uniform(0.5, 2.0, w).astype(np.float32)
        sd[f"features.{idx + 1}.num_batches_tracked"] = np.array(7)
        in_c = w
    np.savez(path, **sd)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A teacher workdir trained as the paper's is: one epoch from torchvision-layout weights
    (``init_from``, an ``.npz``), which are deleted afterwards, so that any consumer of the teacher that
    read ``init_from`` again (restoring, distillation, pruning, eval) fails."""
    from apjax.models import variant_widths
    from apjax.tasks import train_and_evaluate
    from tests.test_train import tiny_config

    root = tmp_path_factory.mktemp("teacher")
    weights = root / "vgg16_bn_tiny.npz"
    c = tiny_config(root / "data", num_epochs=1, lr_decay_epochs=(), init_from=str(weights))
    write_torchvision_npz(weights, variant_widths(c.model))
    workdir = root / "run"
    train_and_evaluate(c, workdir)
    weights.unlink()
    return workdir
