"""The sweep report's plots (Matplotlib, written as PNG): attribution numbers against parameter count."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _finite(v) -> bool:
    return v is not None and isinstance(v, int | float) and np.isfinite(v)


def plot_lines(root: Path, points: dict[str, list], teacher: tuple | None) -> list[str]:
    """``figures/auc_vs_params.png`` and ``figures/cos_vs_params.png`` under ``root``: one line per label of
    ``points`` (label -> [(non-zero parameters, AUC, Cos)]), the teacher's (parameters, AUC) as a star;
    returns the written paths relative to ``root``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    out = root / "figures"
    out.mkdir(exist_ok=True)
    for metric, col, ylabel in (("auc", 1, "Grad-CAM AUC (%)"), ("cos", 2, "Cos to the teacher's map")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, pts in sorted(points.items()):
            pts = sorted(p for p in pts if _finite(p[col]))
            if pts:
                x = [p[0] for p in pts]
                y = [p[col] * (100 if col == 1 else 1) for p in pts]
                ax.plot(x, y, marker="o", label=label)
        if teacher and col == 1 and _finite(teacher[1]):
            ax.scatter([teacher[0]], [100 * teacher[1]], marker="*", s=150, c="k", label="teacher")
        ax.set_xscale("log")
        ax.set_xlabel("non-zero parameters (head included)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a plot without a finite point has nothing to label
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{metric}_vs_params.png"
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, path)
        plt.close(fig)
        written.append(str(path.relative_to(root)))
    return written
