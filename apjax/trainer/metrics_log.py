"""Metric logging: JSON lines in the workdir (process 0), and the small Markdown tables printed at the end."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

from apjax.trainer.files import write_text_atomic


class MetricsLog:
    """Metrics as JSON lines in ``<workdir>/metrics.jsonl`` (process 0 only)."""

    def __init__(self, workdir: Path):
        self.path = workdir / "metrics.jsonl"
        self.enabled = jax.process_index() == 0

    def write(self, **row: Any) -> None:
        """Appends one row (a JSON object with sorted keys) to the log."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")

    def truncate_after(self, step: int) -> None:
        """Keeps the rows up to ``step`` (and drops a line a crash cut short): called on resume."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", 0) <= step:
                kept.append(line)
        write_text_atomic(self.path, "".join(k + "\n" for k in kept))


def format_table(rows: Mapping[str, Mapping[str, float]], percent: tuple[str, ...] = ()) -> str:
    """A small Markdown table: one row per entry, one column per metric."""
    cols = list(next(iter(rows.values())).keys())
    head = "| split | " + " | ".join(cols) + " |"
    sep = "|---|" + "---|" * len(cols)
    lines = [head, sep]
    for name, r in rows.items():
        cells = [f"{100 * r[c]:.2f}" if c in percent else f"{r[c]:.4g}" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
