"""Deployment latency: the exported teacher against the exported compressed runs of a sweep.

Every finished run (the teacher and each compressed stage with a ``final_metrics.json``) is exported with
:func:`apjax.deploy.export.export_run` (from a temporary copy of the run, so nothing is ever written inside
it), loaded with :func:`apjax.deploy.load` and timed, warm (each function and batch size has been called
once, which compiles it), at batch 1 (latency: median and p95 of ``calls`` calls, ms per image) and at
``batch_size`` (throughput: images/s of the median of ``batch_calls`` calls). The runs are alternated call
by call in one process, so that a drift of other load on the host hits every run alike.

Used by the sweep's ``deploy`` stage (``config.deploy.enabled``, :mod:`apjax.experiment`) and by
``benchmarks/latency.py``; both write :func:`latency_report`'s dict with :func:`write_latency` (a JSON
file and a Markdown table beside it), which the report's Deployment table reads
(:mod:`apjax.report_deploy`).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from apjax.deploy import load
from apjax.deploy.export import export_run
from apjax.errors import ConfigError, MissingFileError
from apjax.trainer.files import write_json_atomic, write_text_atomic

NOTES = [
    "Warm timings: each function and batch size was called once (compiling it) before timing; every call "
    "ends when its numpy result is on the host. Runs alternate call by call in one process.",
    "ms/image at batch 1: median and p95 (linear interpolation) of the calls; images/s at the large batch: "
    "batch size over the median call. Speed-up: the teacher's median time over the run's (>1: faster).",
    "On XLA:CPU unstructured pruning brings no speed: the pruned weights are zeros that the functions "
    "multiply densely (stored as dense float32, or unpacked to dense arrays inside the functions), at the "
    "teacher's cost. Dequantized int8 brings no speed either: a quant_* export dequantizes its weights to "
    "float32 inside the functions and runs float convolutions. Only smaller networks (distilled students, "
    "structured pruning) run faster here.",
    "bytes_on_disk: the export's predict.stablehlo + explain.stablehlo + weights.npz (meta.json's files).",
]


# ------------------------------------------------------------------------------------------------
# Statistics (pure, tested on synthetic numbers).
# ------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` by linear interpolation between the closest ranks
    (numpy's default): rank ``q / 100 * (n - 1)`` of the sorted values."""
    if not values:
        raise ValueError("no values")
    s = sorted(values)
    rank = q / 100 * (len(s) - 1)
    lo = int(rank)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (rank - lo)


def median(values: list[float]) -> float:
    return percentile(values, 50)


def latency_ms(seconds: list[float], batch: int) -> dict[str, float]:
    """Median and p95 milliseconds per image of calls that each took ``seconds`` for ``batch`` images."""
    per_image = [1000 * s / batch for s in seconds]
    return {"median": median(per_image), "p95": percentile(per_image, 95)}


def images_per_s(seconds: list[float], batch: int) -> float:
    """Images per second of the median call of ``batch`` images."""
    return batch / median(seconds)


def speedup(teacher: float | None, run: float | None, higher_is_faster: bool) -> float | None:
    """The run's speed over the teacher's: times (``higher_is_faster=False``) or rates (True)."""
    if not teacher or not run:
        return None
    return run / teacher if higher_is_faster else teacher / run


# ------------------------------------------------------------------------------------------------
# Runs, exports, timing.
# ------------------------------------------------------------------------------------------------


def _is_run(path: Path) -> bool:
    if not (path / "final_metrics.json").is_file() or not (path / "config.json").is_file():
        return False
    try:
        return json.loads((path / "config.json").read_text()).get("task") != "experiment"
    except ValueError:
        return False


def find_runs(sweep: Path, names: list[str] | None, all_seeds: bool = False) -> list[tuple[str, Path]]:
    """``(name, workdir)`` of the finished runs: ``sweep`` itself when it is a run's folder, else its
    finished stages (the teacher first; seed-0 runs only unless ``all_seeds``), filtered by ``names``.
    ``ConfigError`` (one sentence) when a named run is not finished or none is."""
    if not sweep.is_dir():
        raise MissingFileError(f"{sweep} is not a folder; give a sweep's folder or one run's folder.")
    if _is_run(sweep):
        runs = [(sweep.name, sweep)]
        if names and names != [sweep.name]:
            raise ConfigError(f"{sweep} is one run ({sweep.name}); --runs can only name it.")
        return runs
    found = sorted(p for p in sweep.iterdir() if p.is_dir() and _is_run(p))
    runs = [(p.name, p) for p in found if all_seeds or "@s" not in p.name]
    runs.sort(key=lambda r: (r[0] != "teacher", r[0]))
    if names:
        missing = [n for n in names if not _is_run(sweep / n)]
        if missing:
            raise ConfigError(
                f"no finished run {missing} in {sweep}; the finished ones are {[n for n, _ in runs]}."
            )
        runs = [(n, sweep / n) for n in names]
    if not runs:
        raise ConfigError(f"{sweep} holds no finished run (no final_metrics.json); train one first.")
    return runs


def export_copy(name: str, workdir: Path, exports: Path) -> tuple[Path, float | None]:
    """The export of ``workdir`` in ``exports/name`` (reused when there), made from a temporary copy of
    the run so that nothing is written in it. Returns (folder, export seconds or None when reused)."""
    out = exports / name
    if (out / "meta.json").is_file():
        return out, None
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="apjax_latency_run_") as tmp:
        copy = Path(tmp) / workdir.name
        shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("tensorboard", "*.tmp*"))
        export_run(copy, out)
    return out, time.perf_counter() - t0


def _timed(fn, images) -> float:
    t0 = time.perf_counter()
    out = fn(images)  # Deployed returns numpy arrays: the call has finished on the device
    jax.block_until_ready(out)
    return time.perf_counter() - t0


def measure(models: dict[str, Any], calls: int, batch_calls: int, batch_size: int, seed: int = 0) -> dict:
    """{run: {(function, batch): [seconds per call]}}: warm, alternating the runs call by call."""
    rng = np.random.default_rng(seed)
    sizes = {m.image_size for m in models.values()}
    images = {
        (size, b): rng.integers(0, 256, (b, *size, 3), dtype=np.uint8)
        for size in sizes
        for b in (1, batch_size)
    }
    times: dict[str, dict] = {n: {} for n in models}
    for b, count in ((1, calls), (batch_size, batch_calls)):
        for fn in ("predict", "explain"):
            for m in models.values():  # compile once per function and batch size
                getattr(m, fn)(images[m.image_size, b])
            for name in models:
                times[name][fn, b] = []
            for _ in range(count):
                for name, m in models.items():
                    times[name][fn, b].append(_timed(getattr(m, fn), images[m.image_size, b]))
    return times


def make_rows(metas: dict[str, dict], times: dict[str, dict], batch_size: int, exports_s: dict) -> list[dict]:
    teacher = next((n for n, m in metas.items() if m["compression"]["task"] == "teacher"), None)
    rows = []
    for name, meta in metas.items():
        t = times[name]
        row: dict[str, Any] = {
            "run": name,
            "task": meta["compression"]["task"],
            "method": meta["compression"].get("method"),
            "model": meta["model"]["config_model"],
            "image_size": meta["input"]["height"],
            "params": meta["weights"]["params"],
            "weight_values": meta["weights"]["count"],
            "bytes_on_disk": int(sum(meta["files"].values())),
            "format_version": meta.get("format_version"),
            "weights_storage": meta["weights"].get("storage", "float32"),  # format 1: dense float32
            "files": meta["files"],
            "export_s": exports_s.get(name),
            "batch_size": batch_size,
        }
        fm = meta["compression"].get("final_metrics") or {}
        for k in ("sparsity", "nonzero_params", "packed_bytes"):
            if k in fm:
                row[k] = fm[k]
        for fn in ("predict", "explain"):
            lat = latency_ms(t[fn, 1], 1)
            row[f"{fn}_b1_ms_median"] = lat["median"]
            row[f"{fn}_b1_ms_p95"] = lat["p95"]
            row[f"{fn}_b1_calls"] = len(t[fn, 1])
            row[f"{fn}_batch_images_per_s"] = images_per_s(t[fn, batch_size], batch_size)
            row[f"{fn}_batch_calls"] = len(t[fn, batch_size])
        rows.append(row)
    ref = next((r for r in rows if r["run"] == teacher), None)
    for r in rows:
        for fn in ("predict", "explain"):
            r[f"{fn}_b1_speedup"] = speedup(ref and ref[f"{fn}_b1_ms_median"], r[f"{fn}_b1_ms_median"], False)
            r[f"{fn}_batch_speedup"] = speedup(
                ref and ref[f"{fn}_batch_images_per_s"], r[f"{fn}_batch_images_per_s"], True
            )
    return rows


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def markdown_table(rows: list[dict]) -> str:
    b = rows[0]["batch_size"] if rows else 64
    lines = [
        f"| run | model | params | bytes on disk | predict b1 ms/img (median, p95) | predict b{b} img/s "
        f"| explain b1 ms/img (median, p95) | explain b{b} img/s | speed-up predict b1, b{b} "
        f"| speed-up explain b1, b{b} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | `{r['model']}` | {r['params']:,} | {r['bytes_on_disk']:,} "
            f"| {r['predict_b1_ms_median']:.2f}, {r['predict_b1_ms_p95']:.2f} "
            f"| {r['predict_batch_images_per_s']:.0f} "
            f"| {r['explain_b1_ms_median']:.2f}, {r['explain_b1_ms_p95']:.2f} "
            f"| {r['explain_batch_images_per_s']:.0f} "
            f"| {_x(r['predict_b1_speedup'])}, {_x(r['predict_batch_speedup'])} "
            f"| {_x(r['explain_b1_speedup'])}, {_x(r['explain_batch_speedup'])} |"
        )
    return "\n".join(lines)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
    }


def latency_report(
    runs: list[tuple[str, Path]],
    exports: Path | None = None,
    calls: int = 30,
    batch_calls: int = 5,
    batch_size: int = 64,
    command: str = "",
    log=print,
) -> dict[str, Any]:
    """Exports, loads and times ``runs`` (``(name, workdir)``, the teacher first); returns the report.

    ``exports`` keeps the exports in ``exports/<name>`` and reuses those already there (default: a
    temporary folder, removed afterwards). ``log`` receives a line per step.
    """
    if min(calls, batch_calls, batch_size) < 1:
        raise ConfigError(
            f"calls={calls}, batch_calls={batch_calls} and batch_size={batch_size} must each be at least 1."
        )
    started, load_start = time.perf_counter(), _loadavg()
    own = exports is None
    exports = Path(tempfile.mkdtemp(prefix="apjax_latency_exports_") if own else exports)
    exports.mkdir(parents=True, exist_ok=True)
    try:
        models, exports_s = {}, {}
        for name, workdir in runs:
            log(f"== export {name} ({workdir})")
            folder, exports_s[name] = export_copy(name, workdir, exports)
            models[name] = load(folder)
        log(f"== timing {len(models)} runs")
        times = measure(models, calls, batch_calls, batch_size)
        rows = make_rows({n: m.meta for n, m in models.items()}, times, batch_size, exports_s)
    finally:
        if own:
            shutil.rmtree(exports, ignore_errors=True)
    return {
        "benchmark": "apjax.deploy.latency",
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "jax_version": jax.__version__,
        "loadavg_start_end": [load_start, _loadavg()],  # 1, 5, 15 min: other work on the host skews timings
        "settings": {"calls": calls, "batch_calls": batch_calls, "batch_size": batch_size},
        "wall_s": round(time.perf_counter() - started, 1),
        "notes": NOTES,
        "rows": rows,
        "table_markdown": markdown_table(rows),
    }


def write_latency(report: dict[str, Any], out: Path) -> None:
    """Writes ``report`` to ``out`` (JSON) and its table beside it (suffix ``.md``), each atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, report)
    m = report["machine"]
    md = (
        f"Deployment latency, {report['date']}, {m['cpu'] or m['device_kind']} ({m['backend']}, "
        f"{m['cpus']} CPUs), jax {report['jax_version']}, load average {report['loadavg_start_end']}.\n"
        f"Command: `{report['command']}`\n\n{report['table_markdown']}\n\n"
        + "\n".join(f"- {n}" for n in NOTES)
        + "\n"
    )
    write_text_atomic(out.with_suffix(".md"), md)
