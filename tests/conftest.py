"""Test-wide settings: short compiles on the CPU."""

import jax

# Compile with few optimisations: the tests run small arrays, where compile time dominates.
jax.config.update("jax_disable_most_optimizations", True)
