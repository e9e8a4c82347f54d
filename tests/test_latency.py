"""apjax/deploy/latency.py: its statistics on synthetic numbers; benchmarks/latency.py ``--tiny`` end to end
on the tiny teacher; the sweep's deploy stage.

Speed itself is never asserted: only that the figures exist, are positive and add up."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from apjax import experiment
from apjax.deploy import latency as deploy_latency
from apjax.errors import ConfigError
from apjax.report_deploy import deployment_table
from benchmarks import latency as latency_cli
from configs import paper

latency = deploy_latency  # the statistics and find_runs


def test_percentile_by_hand():
    values = [float(v) for v in range(1, 21)]  # 1..20, shuffled below
    rng = np.random.default_rng(0)
    shuffled = list(rng.permutation(values))
    assert latency.median(shuffled) == pytest.approx(10.5)
    # rank 0.95 * 19 = 18.05: between the 19th (19.0) and 20th (20.0) values
    assert latency.percentile(shuffled, 95) == pytest.approx(19.05)
    assert latency.percentile(shuffled, 0) == 1.0 and latency.percentile(shuffled, 100) == 20.0
    assert latency.median([3.0, 1.0, 2.0]) == 2.0
    assert latency.percentile([7.0], 95) == 7.0
    for q in (5, 50, 95):
        assert latency.percentile(shuffled, q) == pytest.approx(np.percentile(values, q))
    with pytest.raises(ValueError):
        latency.percentile([], 50)


def test_latency_and_throughput_by_hand():
    seconds = [0.010, 0.012, 0.011, 0.050, 0.009]  # one slow outlier
    lat = latency.latency_ms(seconds, batch=1)
    assert lat["median"] == pytest.approx(11.0)
    # sorted 9, 10, 11, 12, 50 ms: rank 0.95 * 4 = 3.8 -> 12 + 0.8 * 38 = 42.4
    assert lat["p95"] == pytest.approx(42.4)
    assert latency.latency_ms([0.064, 0.128], batch=64)["median"] == pytest.approx(1.5)
    assert latency.images_per_s([0.5, 1.0, 2.0], batch=64) == pytest.approx(64.0)
    assert latency.speedup(10.0, 5.0, higher_is_faster=False) == pytest.approx(2.0)
    assert latency.speedup(100.0, 300.0, higher_is_faster=True) == pytest.approx(3.0)
    assert latency.speedup(None, 5.0, higher_is_faster=False) is None


def _check_rows(rows, names):
    assert [r["run"] for r in rows] == names
    for r in rows:
        for key in ("params", "weight_values", "bytes_on_disk", "image_size", "batch_size"):
            assert isinstance(r[key], int) and r[key] > 0, key
        assert r["bytes_on_disk"] == sum(r["files"].values())
        for fn in ("predict", "explain"):
            for key in (f"{fn}_b1_ms_median", f"{fn}_b1_ms_p95", f"{fn}_batch_images_per_s"):
                assert math.isfinite(r[key]) and r[key] > 0, key
            assert r[f"{fn}_b1_ms_p95"] >= r[f"{fn}_b1_ms_median"]
            assert r[f"{fn}_b1_speedup"] == pytest.approx(1.0)  # the teacher against itself
            assert r[f"{fn}_batch_speedup"] == pytest.approx(1.0)


def test_tiny_end_to_end(teacher_dir, tmp_path):
    """A fabricated sweep (the fixture as its ``teacher`` and, by symlink, as a second run) and the
    fixture's own folder as a one-run sweep; the fixture's workdir is left as it was."""
    before = sorted((p.relative_to(teacher_dir), p.stat().st_mtime_ns) for p in teacher_dir.rglob("*"))
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "teacher").symlink_to(teacher_dir, target_is_directory=True)
    (sweep / "teacher@s1").symlink_to(teacher_dir, target_is_directory=True)  # skipped: not seed 0
    out = tmp_path / "results" / "latency.json"
    exports = tmp_path / "exports"
    report = latency_cli.main(["--sweep", str(sweep), "--tiny", "--out", str(out), "--exports", str(exports)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(report["rows"]))
    for key in ("command", "date", "machine", "jax_version", "loadavg_start_end", "notes", "settings"):
        assert key in saved, key
    assert any("unstructured pruning" in n for n in saved["notes"])
    _check_rows(saved["rows"], ["teacher"])
    assert saved["rows"][0]["task"] == "teacher" and saved["rows"][0]["predict_b1_calls"] == 3
    md = out.with_suffix(".md").read_text()
    assert "| teacher |" in md and "XLA:CPU" in md
    assert (exports / "teacher" / "meta.json").is_file()

    # the run's own folder as a one-run sweep: named by its folder, so exported afresh beside the other
    one = tmp_path / "one.json"
    argv = ["--sweep", str(teacher_dir), "--tiny", "--out", str(one), "--exports", str(exports)]
    rows = latency_cli.main(argv)["rows"]
    assert rows[0]["export_s"] > 0 and (exports / teacher_dir.name / "meta.json").is_file()
    # an export already there is reused (no export time)
    assert latency_cli.main(argv)["rows"][0]["export_s"] is None
    _check_rows(rows, [teacher_dir.name])
    after = sorted((p.relative_to(teacher_dir), p.stat().st_mtime_ns) for p in teacher_dir.rglob("*"))
    assert after == before


def test_find_runs(tmp_path):
    def run(name, task="teacher"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"task": task}))
        (tmp_path / name / "final_metrics.json").write_text("{}")

    (tmp_path / "config.json").write_text(json.dumps({"task": "experiment"}))
    run("teacher")
    run("kd_x2_sswa", "distill")
    run("kd_x2_sswa@s1", "distill")
    (tmp_path / "prune_u_sswa").mkdir()  # unfinished: no final_metrics.json
    assert [n for n, _ in latency.find_runs(tmp_path, None)] == ["teacher", "kd_x2_sswa"]
    assert [n for n, _ in latency.find_runs(tmp_path, None, all_seeds=True)] == [
        "teacher",
        "kd_x2_sswa",
        "kd_x2_sswa@s1",
    ]
    assert [n for n, _ in latency.find_runs(tmp_path, ["kd_x2_sswa"])] == ["kd_x2_sswa"]
    with pytest.raises(ConfigError, match="no finished run \\['prune_u_sswa'\\]"):
        latency.find_runs(tmp_path, ["prune_u_sswa"])
    with pytest.raises(ConfigError, match="is not a folder"):
        latency.find_runs(tmp_path / "nowhere", None)


def test_the_sweeps_deploy_stage_exports_times_and_skips(teacher_dir, tmp_path, capsys):
    """``config.deploy.enabled``: a stage before the report exports and times the finished seed-0 runs
    into ``deploy/latency.json`` (read by the report's Deployment table); it skips when the file covers
    the same runs and settings, and runs again when they change; the runs' folders are left as they were."""
    before = sorted((p.relative_to(teacher_dir), p.stat().st_mtime_ns) for p in teacher_dir.rglob("*"))
    c = paper.get_config("demo")
    c.deploy.update(enabled=True, calls=2, batch_calls=1, batch_size=8)
    root = tmp_path / "sweep"
    root.mkdir()
    (root / "teacher").symlink_to(teacher_dir, target_is_directory=True)
    stages = experiment.plan(c, root)
    assert [s.name for s in stages][-2:] == ["deploy", "report"]
    assert experiment._run_deploy(root, stages, c) == (
        f"exported and timed 1 runs (exports in {root / 'deploy' / 'exports'})"
    )  # the students are not trained: the teacher alone
    found = json.loads((root / "deploy" / "latency.json").read_text())
    _check_rows(found["rows"], ["teacher"])
    assert found["settings"] == {"calls": 2, "batch_calls": 1, "batch_size": 8}
    assert found["rows"][0]["predict_b1_calls"] == 2 and found["rows"][0]["predict_batch_calls"] == 1
    assert (root / "deploy" / "exports" / "teacher" / "meta.json").is_file()
    assert (root / "deploy" / "latency.md").is_file()
    assert "| teacher |" in "\n".join(deployment_table(root))
    assert experiment._run_deploy(root, stages, c) == "skipped: already covers these runs"
    # A stage stopped after deleting the old exports (before timing them again) runs again.
    shutil.rmtree(root / "deploy" / "exports")
    assert experiment._run_deploy(root, stages, c).startswith("exported and timed 1 runs")
    assert (root / "deploy" / "exports" / "teacher" / "meta.json").is_file()
    c.deploy.calls = 3
    assert experiment._run_deploy(root, stages, c).startswith("exported and timed 1 runs")
    assert json.loads((root / "deploy" / "latency.json").read_text())["rows"][0]["predict_b1_calls"] == 3
    after = sorted((p.relative_to(teacher_dir), p.stat().st_mtime_ns) for p in teacher_dir.rglob("*"))
    assert after == before
    assert "deploy" not in [s.name for s in experiment.plan(paper.get_config("demo"), root)]
    assert "deploy" in [s.name for s in experiment.plan(paper.get_config("science"), root)]
    c.deploy.batch_size = 0
    with pytest.raises(ConfigError, match="config.deploy's {'batch_size': 0} must be positive integers"):
        experiment.validate_sweep(c, stages)
