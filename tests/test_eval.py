"""The localisation report: files, the table's numbers, and a student identical to its teacher."""

import json
import shutil

import numpy as np
import pytest

from apjax import eval_lib
from apjax.attribution.methods import LABELS
from tests.test_distill import teacher_dir  # noqa: F401  (fixture)


def test_localization_report_of_a_teacher_and_an_identical_student(teacher_dir, tmp_path):  # noqa: F811
    twin = tmp_path / "twin"
    shutil.copytree(teacher_dir, twin)
    out = tmp_path / "report"
    results = eval_lib.localization_report(
        [teacher_dir, twin], methods=("gradcam", "gradient"), out_dir=out, batch_size=8, figure_images=2
    )
    saved = json.loads((out / "localization.json").read_text())
    assert saved["runs"].keys() == {teacher_dir.name, "twin"}
    assert (out / "figures" / "gradcam.png").stat().st_size > 0
    assert (out / "figures" / "gradient.png").stat().st_size > 0
    teacher = saved["runs"][teacher_dir.name]
    student = saved["runs"]["twin"]
    assert teacher["pairs"] == student["pairs"] > 0
    for method in ("gradcam", "gradient"):
        m = teacher["methods"][method]
        assert 0.0 <= m["AUC"] <= 1.0 and 0.0 <= m["Point"] <= m["Point_pooled"] <= 1.0
        # The same weights give the same maps: cosine 1 and l2 distance 0, on every pair.
        s = student["methods"][method]
        np.testing.assert_allclose(s["Cos"], 1.0, atol=1e-6)
        np.testing.assert_allclose(s["l2"], 0.0, atol=1e-4)
        assert s["AUC"] == m["AUC"] and s["similarity_pairs"] == teacher["pairs"]
    table = (out / "localization.md").read_text().splitlines()
    row = next(line for line in table if line.startswith(f"| twin | {LABELS['gradcam']} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == f"{100 * student['methods']['gradcam']['AUC']:.2f}"
    assert cells[7] == f"{student['methods']['gradcam']['Cos']:.3f}"
    assert results["runs"].keys() == saved["runs"].keys()


def test_unknown_method_and_missing_workdir(teacher_dir, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="unknown attribution methods \\['gradcam\\+\\+'\\]"):
        eval_lib.localization_report([teacher_dir], methods=("gradcam++",))
    with pytest.raises(FileNotFoundError, match="pass the --workdir of a training run"):
        eval_lib.localization_report([tmp_path / "none"], methods=("gradcam",))
