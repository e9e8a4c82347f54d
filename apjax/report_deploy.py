"""The report's "Deployment" table: each run's export measured by :mod:`apjax.deploy.latency`.

The sweep's ``deploy`` stage writes ``<root>/deploy/latency.json`` (``config.deploy.enabled``; on in the
science variant). Timings want a quiet machine: to time a finished sweep again, alone, run the benchmark
into the sweep's folder and write the report again:

    python -m benchmarks.latency --sweep W --out W/deploy/latency.json
    python train.py --config configs/paper.py:VARIANT --workdir W --config.only=report

The table gives, per exported run: parameters, bytes on disk (the export's functions and weights, with
the weights' storage form), milliseconds per image at batch 1 (median and p95), images/s at the large
batch, and the speed-up over the teacher (its median time over the run's).
"""

from __future__ import annotations

import json
from pathlib import Path

from apjax.report_seeds import table

LATENCY_FILE = Path("deploy") / "latency.json"


def deployment_table(root: Path) -> list[str]:
    """The Markdown section from ``<root>/deploy/latency.json``; none when the file is absent."""
    path = Path(root) / LATENCY_FILE
    if not path.is_file():
        return []
    found = json.loads(path.read_text())
    rows = []
    for r in found.get("rows", []):
        storage = f" ({r['weights_storage']})" if r.get("weights_storage") else ""
        rows.append([
            r["run"],
            f"{r['params']:,}",
            f"{r['bytes_on_disk']:,}{storage}",
            f"{r['predict_b1_ms_median']:.2f} / {r['predict_b1_ms_p95']:.2f}",
            f"{r['predict_batch_images_per_s']:,.0f}",
            f"{r['predict_b1_speedup']:.2f}x, {r['predict_batch_speedup']:.2f}x",
            f"{r['explain_b1_ms_median']:.2f} / {r['explain_b1_ms_p95']:.2f}",
            f"{r['explain_batch_speedup']:.2f}x",
        ])  # fmt: skip
    if not rows:
        return []
    batch = found.get("settings", {}).get("batch_size", 64)
    machine = found.get("machine", {})
    header = ["run", "#params", "bytes on disk", "predict ms/image at batch 1 (median / p95)",
              f"predict images/s at batch {batch}", f"predict speed-up (batch 1, {batch})",
              "explain ms/image at batch 1 (median / p95)", f"explain speed-up (batch {batch})"]  # fmt: skip
    where = ", ".join(str(machine[k]) for k in ("cpu", "device_kind") if machine.get(k))
    return [
        "## Deployment: the exported runs' size and latency",
        "",
        *table(header, rows),
        "",
        f"Measured by `apjax.deploy.latency` ({found.get('date', '?')}, {where or 'unknown device'}, jax "
        f"{found.get('jax_version', '?')}): each run exported (`export.py`) and loaded "
        "(`apjax.deploy.load`), its `predict` and `explain` timed warm, the runs alternating call by call. "
        "On XLA:CPU a network with zeros in dense kernels (unstructured pruning) or dequantized weights "
        "(quantization) runs at the float network's cost: only a smaller network is faster.",
        "",
    ]
