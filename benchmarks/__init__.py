"""Benchmarks of apjax's jitted steps (``python -m benchmarks.step_benchmark``)."""
