"""The sweep runner: a tiny two-stage sweep end to end, its report's numbers, and skipping on rerun."""

import json
import re

import pytest

from apjax import experiment, report
from configs import paper
from tests.test_train import tiny_config


def tiny_sweep(tmp_path):
    c = paper.get_config("demo")
    t = tiny_config(tmp_path / "data")
    c.data = t.data
    # Two frequent classes: even a teacher trained for one epoch predicts them, so there are pairs to score.
    c.data.synthetic.num_classes = 2
    c.teacher.model, c.teacher.batch_size = t.model, t.batch_size
    c.teacher.num_epochs, c.teacher.lr_decay_epochs, c.teacher.log_every_steps = 1, (1,), 2
    c.students, c.kd_methods = ("x2",), ("kd",)  # (matching steps are tested in test_distill.py)
    c.kd.batch_size, c.kd.num_epochs, c.kd.lr_decay_epochs, c.kd.log_every_steps = 16, 1, (1,), 2
    c.kd.distill.taps = ("conv4_3",)
    c.figure_images = 2
    return c


def cell(md: str, first_cells: list[str], column: str) -> str:
    """The cell of ``column`` in the Markdown table row that starts with ``first_cells``."""
    lines = md.splitlines()
    for i, line in enumerate(lines):
        cells = [x.strip() for x in line.strip("|").split("|")]
        if cells[: len(first_cells)] == first_cells:
            header = next(
                [x.strip() for x in h.strip("|").split("|")]
                for h in reversed(lines[:i])
                if h.startswith("|") and not h.startswith("|---") and column in h
            )
            return cells[header.index(column)]
    raise AssertionError(f"no row {first_cells} in the report")


def test_tiny_sweep_reports_its_stages_numbers_and_skips_finished_stages(tmp_path, capsys):
    c = tiny_sweep(tmp_path)
    root = tmp_path / "sweep"
    path = experiment.run_sweep(c, root)
    names = [s.name for s in experiment.plan(c, root)]
    assert names == ["teacher", "kd_x2_kd", "eval", "report"]
    md = path.read_text()
    ev = json.loads((root / "eval" / "localization.json").read_text())
    for name, first in (("teacher", ["teacher", "-"]), ("kd_x2_kd", ["x2", "KD"])):
        run = ev["runs"][name]
        final = json.loads((root / name / "final_metrics.json").read_text())
        best = next(v for k, v in final["rows"].items() if k.startswith("val, best"))
        # The eval stage re-evaluates the best checkpoint: the training stage's own JSON holds the same mAP.
        assert run["val"]["mAP"] == pytest.approx(best["mAP"], abs=1e-6)
        assert cell(md, first, "mAP") == f"{100 * best['mAP']:.2f}"
        assert cell(md, first, "F1") == report.fmt("F1", run["val"]["F1"])
        assert cell(md, first, "AUC") == f"{100 * run['methods']['gradcam']['AUC']:.2f}"
        assert cell(md, first, "Point") == f"{100 * run['methods']['gradcam']['Point']:.2f}"
        assert cell(md, first, "#Param") == report.fmt_params(run["params_nonzero"])
    student = ev["runs"]["kd_x2_kd"]["methods"]["gradcam"]
    assert cell(md, ["x2", "KD"], "Cos") == report.fmt("Cos", student["Cos"])
    assert cell(md, ["x2", "KD"], "l2") == report.fmt("l2", student["l2"])
    assert (root / "figures" / "auc_vs_params.png").stat().st_size > 0
    assert re.search(r"!\[gradcam\]\(eval/figures/gradcam\.png\)", md)
    assert "(" not in cell(md, ["x2", "KD"], "AUC")  # no paper numbers on synthetic data

    # Rerunning trains and evaluates nothing again; the report is rewritten from the same files.
    metrics_before = (root / "kd_x2_kd" / "metrics.jsonl").read_text()
    eval_before = (root / "eval" / "localization.json").stat().st_mtime_ns
    capsys.readouterr()
    experiment.run_sweep(c, root)
    out = capsys.readouterr().out
    assert out.count("finished earlier") == 2 and "skipped: already covers these runs" in out
    assert (root / "kd_x2_kd" / "metrics.jsonl").read_text() == metrics_before
    assert (root / "eval" / "localization.json").stat().st_mtime_ns == eval_before
    tables = lambda text: text[text.index("## Table 1") :]  # noqa: E731
    assert tables(path.read_text()) == tables(md)


def test_only_selects_stages_and_rejects_unknown_patterns(tmp_path):
    c = tiny_sweep(tmp_path)
    stages = experiment.plan(c, tmp_path)
    assert [s.name for s in experiment.selected(stages, "teacher, kd_*")] == ["teacher", "kd_x2_kd"]
    c.only = "kd_x9_*"
    with pytest.raises(ValueError, match="config.only pattern 'kd_x9_\\*' matches no stage; the stages are"):
        experiment.validate_sweep(c, stages)


def test_paper_variant_plans_every_table(tmp_path):
    c = paper.get_config()
    names = [s.name for s in experiment.plan(c, tmp_path)]
    assert len([n for n in names if n.startswith("kd_")]) == 12
    assert len([n for n in names if n.startswith("prune_")]) == 8
    assert names[-3:] == ["eval", "eval_methods", "report"]
    kd = next(s for s in experiment.plan(c, tmp_path) if s.name == "kd_x8_sswa").config
    assert kd.model == experiment.student_model("vgg16", "x8") and kd.data.dataset == "voc"
    assert kd.distill.beta == 100.0 and kd.num_epochs == 350
