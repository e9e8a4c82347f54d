"""The sweep report's plots (Matplotlib, written as PNG): attribution numbers against parameter count."""

from __future__ import annotations

import os
from pathlib import Path

from apjax.stats import Interval, finite


def _value(v) -> tuple[float | None, float]:
    """(mean, error bar) of an :class:`~apjax.stats.Interval` (bar 0 when n = 1), or (v, 0) of a number."""
    if isinstance(v, Interval):
        return v.mean, (v.half if v.n > 1 and finite(v.half) else 0.0)
    return (v if finite(v) else None), 0.0


def plot_lines(root: Path, points: dict[str, list], teacher: tuple | None) -> list[str]:
    """``figures/auc_vs_params.png`` and ``figures/cos_vs_params.png`` under ``root``: one line per label of
    ``points`` (label -> [(non-zero parameters, AUC, Cos)]), the teacher's (parameters, AUC) as a star;
    AUC and Cos are numbers or :class:`~apjax.stats.Interval` s (a seed mean: its 95% t interval as an
    error bar when n > 1); returns the written paths relative to ``root``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    out = root / "figures"
    out.mkdir(exist_ok=True)
    for metric, col, ylabel in (("auc", 1, "Grad-CAM AUC (%)"), ("cos", 2, "Cos to the teacher's map")):
        fig, ax = plt.subplots(figsize=(6, 4))
        scale = 100 if col == 1 else 1
        for label, pts in sorted(points.items()):
            pts = sorted((p[0], *_value(p[col])) for p in pts if _value(p[col])[0] is not None)
            if pts:
                x, y, err = zip(*pts, strict=True)
                y, err = [scale * v for v in y], [scale * e for e in err]
                ax.errorbar(x, y, yerr=err if any(err) else None, marker="o", capsize=3, label=label)
        t_value, t_err = _value(teacher[1]) if teacher else (None, 0.0)
        if col == 1 and t_value is not None:
            ax.scatter([teacher[0]], [100 * t_value], marker="*", s=150, c="k", label="teacher", zorder=3)
            if t_err:
                ax.errorbar(
                    [teacher[0]], [100 * t_value], yerr=[100 * t_err], fmt="none", ecolor="k", capsize=3
                )
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
