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
