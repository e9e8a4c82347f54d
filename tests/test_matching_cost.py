"""benchmarks/matching_cost.py: its commands and its paired summary, on hand-made run files (no training)."""

import json
import math

import pytest

from benchmarks import matching_cost


def _write_run(root, name, map_, cos):
    (root / name).mkdir(parents=True)
    val = {"mAP": map_ / 100, "F1": 0.1, "map_cos": cos, "logit_present": -1.0, "logit_absent": -2.0}
    (root / name / "final_metrics.json").write_text(json.dumps({"val": val}))
    return {"val": val, "methods": {"gradcam": {"AUC": 0.8, "Cos": cos, "pairs": 10}}}


def test_summary_pairs_each_matching_run_with_the_kd_run_of_its_seed(tmp_path):
    numbers = {"kd": {"": (40.0, 0.3), "@s1": (44.0, 0.2)}, "sswa_b10": {"": (41.0, 0.6), "@s1": (42.0, 0.5)}}
    for variant, seeds in numbers.items():
        method = matching_cost.VARIANTS[variant][0][0]
        root = tmp_path / variant
        runs = {f"kd_x2_{method}{s}": _write_run(root, f"kd_x2_{method}{s}", *v) for s, v in seeds.items()}
        (root / "eval").mkdir()
        (root / "eval" / "localization.json").write_text(json.dumps({"runs": runs}))
    out = matching_cost.summarize(tmp_path, ["kd", "sswa_b10"])
    row = out["sswa_b10/sswa"]
    assert row["n"] == 2 and row["mAP"][0] == pytest.approx(41.5)
    # differences 41 - 40 = 1 and 42 - 44 = -2: mean -0.5, sd 2.1213; t(0.975, 1) = 12.7062 -> half 19.06
    assert row["d_mAP"][0] == pytest.approx(-0.5)
    assert row["d_mAP"][1] == pytest.approx(12.7062 * math.sqrt(4.5) / math.sqrt(2), rel=1e-4)
    assert row["d_map_cos"][0] == pytest.approx(0.3)
    assert "d_mAP" not in out["kd/kd"]


def test_a_variant_becomes_one_sweep_command_with_its_overrides(tmp_path):
    cmd = matching_cost._command("demo", tmp_path, "sswa_b10_clip1", "0,1", "kd_*,eval")
    assert cmd[2:4] == ["--config", "configs/paper.py:demo"]
    assert "--config.kd_methods=('sswa',)" in cmd and "--config.seeds=(0,1,)" in cmd
    assert "--config.kd.optimizer.clip_norm=1.0" in cmd and "--config.kd.distill.beta=10.0" in cmd
