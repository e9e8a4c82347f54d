"""The sweep runner: a tiny two-stage sweep end to end, its report's numbers, and skipping on rerun."""

import json
import re

import pytest

from apjax import experiment, report
from apjax.errors import ConfigError
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
    c.kd.best_metric = "per_image_AP"  # the reference's criterion (the teacher keeps VOC mAP)
    c.figure_images = 2
    # The eval stage's batch equals the training's (16): on XLA:CPU a convolution's rounding depends on the
    # batch, and on 16 val images one flipped near-tie moves the mAP.
    c.eval_batch_size = 16
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


@pytest.mark.default_xla
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
        assert cell(md, first, "VOC mAP") == f"{100 * best['mAP']:.2f}"
        assert cell(md, first, "per-image AP (paper's mAP)") == f"{100 * best['per_image_AP']:.2f}"
        assert cell(md, first, "F1 (p > 0.5)") == report.fmt("F1", run["val"]["F1"])
        assert cell(md, first, "F1 (logit >= 0.5, paper's F1)") == f"{100 * run['val']['F1_logit0.5']:.2f}"
        assert cell(md, first, "AUC") == report.fmt("AUC", run["methods"]["gradcam"]["AUC"])
        assert cell(md, first, "Point") == report.fmt("Point", run["methods"]["gradcam"]["Point"])
        assert cell(md, first, report.PARAMS_ALL) == report.fmt_params(run["params_nonzero"])
        # The checkpoints table names the criterion that chose each run's checkpoint, and its value.
        metric = "mAP" if name == "teacher" else "per_image_AP"
        assert run["checkpoint"]["best_metric"] == metric
        assert cell(md, [name, str(run["step"])], "chosen by") == f"best val {metric}"
        assert cell(md, [name, str(run["step"])], "its val value") == f"{100 * best[metric]:.2f}"
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
    # The reference's criterion picks every stage's best checkpoint in the paper's sweep; the demo keeps
    # VOC mAP.
    assert {s.config.best_metric for s in experiment.plan(c, tmp_path) if s.config} == {"per_image_AP"}
    demo = paper.get_config("demo")
    assert {s.config.best_metric for s in experiment.plan(demo, tmp_path) if s.config} == {"mAP"}
    # The paper's teacher starts from ImageNet weights: the sweep refuses to plan a scratch VOC teacher.
    with pytest.raises(ValueError, match="stage teacher: .*--config.teacher.init_from"):
        experiment.validate_sweep(c, experiment.plan(c, tmp_path))
    c.teacher.init_from = "vgg16_bn.pth"
    experiment.validate_sweep(c, experiment.plan(c, tmp_path))


def test_science_variant_plans_table_2_and_both_prunings_on_three_seeds(tmp_path):
    c = paper.get_config("science")
    names = [s.name for s in experiment.plan(c, tmp_path)]
    runs = [f"kd_x2_{m}" for m in ("kd", "ewa", "swa", "sswa")] + [
        f"prune_{k}_{m}" for k in ("u", "s") for m in ("naive", "ewa", "swa", "sswa")
    ]
    seeded = [r + s for s in ("", "@s1", "@s2") for r in runs]
    assert names == ["teacher", *seeded, "eval", "deploy", "report"]
    demo = paper.get_config("demo")
    for stage in ("teacher", "kd"):  # the demo's teacher and students, so the demo is its KD/SSWA subset
        assert c[stage].to_dict() == demo[stage].to_dict()
    assert c.kd.optimizer.clip_norm == 1.0 and c.kd.distill.beta == c.prune_structured.distill.beta == 10.0


def test_voc_tables_put_each_paper_number_beside_the_same_quantity(tmp_path):
    c = paper.get_config()
    stages = experiment.plan(c, tmp_path)
    val = {"mAP": 0.801, "mAP_devkit": 0.812, "per_image_AP": 0.823, "F1": 0.634, "F1_logit0.5": 0.605}
    gradcam = {"AUC": 0.85, "Point": 0.75, "Cos": 0.8, "l2": 12.5}

    def run(params_nonzero, params_conv_bn):
        return {
            "val": val,
            "methods": {"gradcam": gradcam},
            "params_nonzero": params_nonzero,
            "params_conv_bn": params_conv_bn,
            "step": 10,
            "checkpoint": {"checkpoint": "best", "best_metric": "per_image_AP", "best_value": 0.823},
        }

    names = ["teacher", "kd_x8_kd", "kd_x8_sswa", "prune_u_naive", "prune_s_naive"]
    counts = {
        "teacher": (15_224_916, 14_723_136),
        "kd_x8_kd": (294_364, 233_644),
        "kd_x8_sswa": (294_364, 233_644),
        "prune_u_naive": (928_515, 530_250),  # SPEC section 6: with the head, and the paper's count
        "prune_s_naive": (3_269_153, 3_000_000),
    }
    ev = {"run_order": names, "runs": {n: run(*counts[n]) for n in names}}
    md = "\n".join(report.tables(c, stages, {"eval": ev, "eval_methods": None}, voc=True))

    # Table 2: the paper's mAP (80.86) beside the per-image AP, its F1 (61.43) beside F1 at logit >= 0.5;
    # VOC mAP and F1 at probability 0.5 stand alone.
    row = ["x8", "SSWA"]
    assert cell(md, row, "per-image AP (paper's mAP)") == "82.30 (80.86)"
    assert cell(md, row, "F1 (logit >= 0.5, paper's F1)") == "60.50 (61.43)"
    assert cell(md, row, "VOC mAP") == "80.10" and cell(md, row, "F1 (p > 0.5)") == "63.40"
    assert cell(md, row, "AUC") == "85.00 (88.06)" and cell(md, row, "l2") == "12.50 (19.49)"
    assert cell(md, row, report.PARAMS_ALL) == "0.29M (0.29M)"
    assert cell(md, ["teacher", "-"], "per-image AP (paper's mAP)") == "82.30 (91.83)"
    # Table 1: the paper's 0.53M counts non-zero conv weights, conv biases and BN without the head: it stands
    # in that column; its other counts (all parameters) in the other.
    assert cell(md, ["Unstructured pruning"], report.PARAMS_CONV_BN) == "0.53M (0.53M)"
    assert cell(md, ["Unstructured pruning"], report.PARAMS_ALL) == "0.93M"
    assert cell(md, ["Full (teacher)"], report.PARAMS_ALL) == "15.22M (15.22M)"
    assert cell(md, ["Structured pruning"], report.PARAMS_ALL) == "3.27M (3.27M)"
    assert cell(md, ["Structured pruning"], report.PARAMS_CONV_BN) == "3.00M"
    # Tables 4-5 (the first "Naive" row) and 6-7.
    assert cell(md, ["Naive"], report.PARAMS_CONV_BN) == "0.53M (0.53M)"
    assert cell(md, ["Naive"], "per-image AP (paper's mAP)") == "82.30 (87.42)"
    assert cell(md, ["Naive"], "Cos") == "0.800 (0.790)"
    assert md.count("| Naive | 1 | 3.27M (3.27M) |") == 1
    assert cell(md, ["prune_s_naive", "10"], "chosen by") == "best val per_image_AP"


def test_seeds_repeat_every_training_stage_and_keep_the_first_seeds_workdirs(tmp_path):
    c = paper.get_config("demo")
    c.seeds = (0, 1)
    stages = experiment.plan(c, tmp_path)
    train = [
        (s.name, s.seed, s.config.seed, s.config.get("distill", {}).get("teacher_workdir"))
        for s in stages
        if s.config
    ]
    teacher = str(tmp_path / "teacher")
    assert train == [
        ("teacher", 0, 3, None),  # one teacher (offset 0) for every seed's students
        ("kd_x2_kd", 0, 42, teacher),
        ("kd_x2_sswa", 0, 42, teacher),
        ("kd_x2_kd@s1", 1, 43, teacher),
        ("kd_x2_sswa@s1", 1, 43, teacher),
    ]
    assert [s.base for s in stages if s.config][-1] == "kd_x2_sswa"
    assert [s.name for s in stages if not s.config] == ["eval", "report"]
    assert [s.name for s in experiment.selected(stages, "kd_x2_sswa*")] == ["kd_x2_sswa", "kd_x2_sswa@s1"]
    c.teacher_per_seed = True
    names = [
        (s.name, s.config.get("distill", {}).get("teacher_workdir"))
        for s in experiment.plan(c, tmp_path)
        if s.config
    ]
    assert names[3] == ("teacher@s1", None)
    assert names[4] == ("kd_x2_kd@s1", str(tmp_path / "teacher@s1"))
    c.seeds = (0, 0)
    with pytest.raises(ValueError, match="config.seeds must be distinct non-negative integers"):
        experiment.plan(c, tmp_path)


def fake_run(auc, cos, ap=0.8, params=1000):
    val = {"mAP": ap, "mAP_devkit": ap, "per_image_AP": ap, "F1": 0.6, "F1_logit0.5": 0.6}
    gradcam = {"AUC": auc, "Point": auc - 0.1, "Cos": cos, "l2": 10 * (1 - cos)}
    return {
        "val": val,
        "methods": {"gradcam": gradcam},
        "params_nonzero": params,
        "params_conv_bn": params,
        "step": 5,
        "checkpoint": {"checkpoint": "best", "best_metric": "mAP", "best_value": ap},
    }


def test_seeded_report_shows_means_with_t_intervals_and_paired_differences(tmp_path):
    import numpy as np
    from scipy import stats as sps

    c = paper.get_config("demo")
    c.seeds, c.prune_kinds, c.prune_methods = (0, 1, 2), ("unstructured",), ("naive", "sswa")
    stages = experiment.plan(c, tmp_path)
    auc = {"kd": [0.70, 0.74, 0.69], "sswa": [0.80, 0.81, 0.83]}
    cos = {"kd": [0.60, 0.65, 0.58], "sswa": [0.85, 0.88, 0.84]}
    runs = {"teacher": fake_run(0.85, float("nan"), params=4000)}
    for k, suffix in enumerate(("", "@s1", "@s2")):
        for m in ("kd", "sswa"):
            runs[f"kd_x2_{m}{suffix}"] = fake_run(auc[m][k], cos[m][k], ap=0.7 + 0.01 * k)
        runs[f"prune_u_naive{suffix}"] = fake_run(0.75, 0.7 + 0.01 * k)
        if k < 2:  # one seed of pruning with SSWA is missing: its row and pairs have n = 2
            runs[f"prune_u_sswa{suffix}"] = fake_run(0.80, 0.9 - 0.03 * k)
    ev = {"run_order": list(runs), "runs": runs}
    md = "\n".join(report.tables(c, stages, {"eval": ev, "eval_methods": None}, voc=False))

    def interval(xs, scale):
        xs = np.asarray(xs) * scale
        half = sps.t.ppf(0.975, len(xs) - 1) * xs.std(ddof=1) / np.sqrt(len(xs))
        return xs.mean(), half

    mean, half = interval(auc["sswa"], 100)
    assert cell(md, ["x2", "SSWA"], "AUC") == f"{mean:.2f} ± {half:.2f}"
    assert cell(md, ["x2", "SSWA"], "n") == "3"
    mean, half = interval(cos["kd"], 1)
    assert cell(md, ["x2", "KD"], "Cos") == f"{mean:.3f} ± {half:.3f}"
    # The shared teacher is one run: its value alone, n = 1.
    assert cell(md, ["teacher", "-"], "AUC") == "85.00" and cell(md, ["teacher", "-"], "n") == "1"
    assert (
        "## Table 2: knowledge distillation (Grad-CAM at the last conv; Cos and l2 to the teacher) (mean ± "
        in md
    )
    assert cell(md, ["Naive"], "n") == "3" and cell(md, ["SSWA"], "n") == "2"

    # Paired differences, computed here from the per-seed numbers.
    assert "## Paired differences (matching minus KD, same seed) (mean ± 95% t interval over n seeds)" in md
    mean, half = interval(np.subtract(auc["sswa"], auc["kd"]), 100)
    assert cell(md, ["x2", "SSWA - KD"], "AUC") == f"{mean:+.2f} ± {half:.2f}"
    mean, half = interval(np.subtract(cos["sswa"], cos["kd"]), 1)
    assert cell(md, ["x2", "SSWA - KD"], "Cos") == f"{mean:+.3f} ± {half:.3f}"
    mean, half = interval(10 * (1 - np.array(cos["sswa"])) - 10 * (1 - np.array(cos["kd"])), 1)
    assert cell(md, ["x2", "SSWA - KD"], "l2") == f"{mean:+.2f} ± {half:.2f}"
    assert cell(md, ["x2", "SSWA - KD"], "VOC mAP") == "+0.00 ± 0.00"  # the same AP on each seed
    row = ["unstructured pruning", "SSWA - Naive"]
    mean, half = interval([0.9 - 0.7, 0.87 - 0.71], 1)  # seeds 0 and 1 only
    assert cell(md, row, "n") == "2" and cell(md, row, "Cos") == f"{mean:+.3f} ± {half:.3f}"
    assert report.plot_against_params(tmp_path, stages, {"eval": ev}) == [
        "figures/auc_vs_params.png",
        "figures/cos_vs_params.png",
    ]

    # One seed: the values alone and (n = 1) in the titles, no interval anywhere.
    c.seeds = (0,)
    stages = experiment.plan(c, tmp_path)
    md = "\n".join(report.tables(c, stages, {"eval": ev, "eval_methods": None}, voc=False))
    assert cell(md, ["x2", "SSWA"], "AUC") == "80.00"
    assert not [line for line in md.splitlines() if line.startswith("|") and "±" in line]
    assert "## Paired differences (matching minus KD, same seed) (n = 1)" in md
    assert cell(md, ["x2", "SSWA - KD"], "AUC") == "+10.00"


def test_eval_covers_every_seed_with_a_report_per_teacher(tmp_path, monkeypatch):
    from apjax import evaluation
    from apjax import stages as stages_mod

    c = paper.get_config("demo")
    c.seeds, c.teacher_per_seed = (0, 1), True
    root = tmp_path / "sweep"
    plan = experiment.plan(c, root)
    for name in (
        "teacher",
        "kd_x2_kd",
        "kd_x2_sswa",
        "teacher@s1",
        "kd_x2_kd@s1",
    ):  # kd_x2_sswa@s1 unfinished
        (root / name).mkdir(parents=True)
        (root / name / "final_metrics.json").write_text("{}")
    calls = []

    def fake_report(workdirs, methods, out_dir, **_):
        names = [w.name for w in workdirs]
        calls.append((out_dir.relative_to(root).as_posix(), names))
        runs = {n: fake_run(0.8, 0.9) for n in names}
        out_dir.mkdir(parents=True, exist_ok=True)
        report = {
            "runs": runs,
            "run_order": names,
            "methods": list(methods),
            "format": evaluation.REPORT_FORMAT,
        }
        (out_dir / "localization.json").write_text(json.dumps(report))

    monkeypatch.setattr(evaluation, "localization_report", fake_report)
    eval_stage = next(s for s in plan if s.name == "eval")
    assert experiment._run_eval(root, eval_stage, plan, c) == "evaluated 5 runs"
    # Each seed's students are compared with their own seed's teacher.
    assert calls == [
        ("eval", ["teacher", "kd_x2_kd", "kd_x2_sswa"]),
        ("eval/s1", ["teacher@s1", "kd_x2_kd@s1"]),
    ]
    merged = stages_mod.stage_results(root, plan)["eval"]
    assert merged["run_order"] == ["teacher", "kd_x2_kd", "kd_x2_sswa", "teacher@s1", "kd_x2_kd@s1"]
    assert experiment._run_eval(root, eval_stage, plan, c) == "skipped: already covers these runs"
    md = "\n".join(report.tables(c, plan, {"eval": merged, "eval_methods": None}, voc=False))
    assert cell(md, ["teacher", "-"], "n") == "2" and cell(md, ["x2", "SSWA"], "n") == "1"
    # One shared teacher: one report of every seed's runs.
    c.teacher_per_seed = False
    plan = experiment.plan(c, root)
    groups = experiment._eval_groups(root, plan, "eval", c)
    assert [(seed, [s.name for s in runs]) for seed, runs in groups] == [
        (0, ["teacher", "kd_x2_kd", "kd_x2_sswa", "kd_x2_kd@s1"])
    ]
    c.kd.distill.teacher_cache_dir = "/tmp/cache"
    with pytest.raises(ValueError, match="one teacher_cache_dir cannot hold the caches of several seeds"):
        experiment.validate_sweep(c, experiment.plan(c, root))


def test_map_cos_in_the_report_is_the_best_checkpoint_s(tmp_path):
    from apjax.report_seeds import best_map_cos

    rows = {"val, last (step 9)": {"map_cos": 0.5}, "val, best (step 6)": {"map_cos": 0.7}}
    (tmp_path / "final_metrics.json").write_text(json.dumps({"rows": rows, "val": {"map_cos": 0.5}}))
    assert best_map_cos(str(tmp_path)) == 0.7
    (tmp_path / "final_metrics.json").write_text(json.dumps({"round": 4, "val": {"map_cos": 0.4}}))
    assert best_map_cos(str(tmp_path)) == 0.4  # unstructured pruning: the last round's
    assert best_map_cos(str(tmp_path / "missing")) is None and best_map_cos(None) is None


def test_faithfulness_table_shows_each_runs_aucs_with_intervals_and_paired_differences(tmp_path):
    import numpy as np
    from scipy import stats as sps

    c = paper.get_config("science")
    c.kd_methods, c.prune_kinds = ("kd", "sswa"), ()
    stages = experiment.plan(c, tmp_path)
    deletion = {"kd": [0.30, 0.34, 0.29], "sswa": [0.25, 0.27, 0.22]}
    insertion = {"kd": [0.60, 0.62, 0.61], "sswa": [0.66, 0.63, 0.65]}
    runs = {"teacher": fake_run(0.85, float("nan"))}
    runs["teacher"]["methods"]["gradcam"].update(deletion_auc=0.2, insertion_auc=0.7)
    for k, suffix in enumerate(("", "@s1", "@s2")):
        for m in ("kd", "sswa"):
            run = fake_run(0.8, 0.9)
            run["methods"]["gradcam"].update(deletion_auc=deletion[m][k], insertion_auc=insertion[m][k])
            runs[f"kd_x2_{m}{suffix}"] = run
    ev = {"run_order": list(runs), "runs": runs}
    md = "\n".join(report.tables(c, stages, {"eval": ev, "eval_methods": None}, voc=False))
    section = md[md.index("## Faithfulness") :]

    def interval(xs):
        xs = 100 * np.asarray(xs)
        return xs.mean(), sps.t.ppf(0.975, len(xs) - 1) * xs.std(ddof=1) / np.sqrt(len(xs))

    mean, half = interval(deletion["sswa"])
    assert cell(section, ["kd_x2_sswa", "SSWA"], "deletion AUC") == f"{mean:.2f} ± {half:.2f}"
    assert cell(section, ["kd_x2_sswa", "SSWA"], "n") == "3"
    assert cell(section, ["teacher", "-"], "insertion AUC") == "70.00"
    mean, half = interval(np.subtract(insertion["sswa"], insertion["kd"]))
    assert cell(section, ["x2", "SSWA - KD"], "insertion AUC") == f"{mean:+.2f} ± {half:.2f}"
    # An evaluation without MoRF (written before it existed) has no AOPC column; one with it shows it.
    assert "MoRF AOPC |" not in section and "AUC of each run's own maps" in section
    aopc = {"kd": [0.05, 0.07, 0.06], "sswa": [0.09, 0.08, 0.12]}
    for k, suffix in enumerate(("", "@s1", "@s2")):
        for m in ("kd", "sswa"):
            runs[f"kd_x2_{m}{suffix}"]["methods"]["gradcam"]["morf_aopc"] = aopc[m][k]
    md = "\n".join(report.tables(c, stages, {"eval": ev, "eval_methods": None}, voc=False))
    section = md[md.index("## Faithfulness") :]
    mean, half = interval(np.subtract(aopc["sswa"], aopc["kd"]))
    assert cell(section, ["x2", "SSWA - KD"], "MoRF AOPC") == f"{mean:+.2f} ± {half:.2f}"
    assert cell(section, ["teacher", "-"], "MoRF AOPC") == "-"
    # Without the numbers (faithfulness off, as in the demo) there is no such table.
    for run in runs.values():
        for key in ("deletion_auc", "insertion_auc"):
            run["methods"]["gradcam"].pop(key, None)
    md = "\n".join(report.tables(c, stages, {"eval": ev, "eval_methods": None}, voc=False))
    assert "Faithfulness" not in md
    # The science variant scores faithfulness in its eval stage; a bad baseline is refused before training.
    assert experiment.faithfulness_settings(c)["insertion_baseline"] == "blur"
    assert experiment.faithfulness_settings(paper.get_config("demo")) is None
    c.faithfulness.deletion_baseline = "noise"
    with pytest.raises(ConfigError, match="faithfulness deletion_baseline='noise'"):
        experiment.validate_sweep(c, experiment.plan(c, tmp_path))


def test_blackbox_report_tables_of_rise_maps_and_pairs_against_kd_and_sswa(tmp_path):
    """The blackbox variant's report: a table of every run's RISE numbers over seeds, and paired differences
    of each black-box method against KD and against SSWA (Grad-CAM and RISE), intervals computed here."""
    import numpy as np
    from scipy import stats as sps

    c = paper.get_config("blackbox")
    stages = experiment.plan(c, tmp_path)
    methods = ("kd", "sswa", "bb_gradcam", "bb_input_grad")
    rise_cos = {"kd": [0.50, 0.55, 0.52], "sswa": [0.60, 0.58, 0.66], "bb_gradcam": [0.70, 0.72, 0.69],
                "bb_input_grad": [0.61, 0.64, 0.60]}  # fmt: skip
    cam_cos = {"kd": [0.40, 0.45, 0.41], "sswa": [0.80, 0.82, 0.79], "bb_gradcam": [0.55, 0.50, 0.57],
               "bb_input_grad": [0.42, 0.47, 0.40]}  # fmt: skip
    runs = {"teacher": fake_run(0.85, float("nan"))}
    runs["teacher"]["methods"]["rise"] = {"AUC": 0.8, "Point": 0.7, "Cos": float("nan"), "l2": float("nan")}
    for k, suffix in enumerate(("", "@s1", "@s2")):
        for m in methods:
            run = fake_run(0.8, cam_cos[m][k])
            cos = rise_cos[m][k]
            run["methods"]["rise"] = {"AUC": 0.7, "Point": 0.6, "Cos": cos, "l2": 1 - cos}
            runs[f"kd_x2_{m}{suffix}"] = run
    ev = {"run_order": list(runs), "runs": runs, "methods": ["gradcam", "rise"]}
    md = "\n".join(report.tables(c, stages, {"eval": ev, "eval_methods": None}, voc=False))

    def interval(xs):
        xs = np.asarray(xs)
        return xs.mean(), sps.t.ppf(0.975, len(xs) - 1) * xs.std(ddof=1) / np.sqrt(len(xs))

    section = md[md.index("## RISE maps of every run") :]
    mean, half = interval(rise_cos["bb_gradcam"])
    assert cell(section, ["kd_x2_bb_gradcam", "BB Grad-CAM"], "Cos") == f"{mean:.3f} ± {half:.3f}"
    assert cell(section, ["teacher", "-"], "AUC") == "80.00"
    mean, half = interval(np.subtract(rise_cos["bb_gradcam"], rise_cos["kd"]))
    assert cell(section, ["x2", "BB Grad-CAM - KD"], "Cos") == f"{mean:+.3f} ± {half:.3f}"
    mean, half = interval(np.subtract(rise_cos["bb_input_grad"], rise_cos["sswa"]))
    assert cell(section, ["x2", "BB input grad - SSWA"], "Cos") == f"{mean:+.3f} ± {half:.3f}"
    # The Grad-CAM paired table (the paper's maps) has the comparison with SSWA too.
    mean, half = interval(np.subtract(cam_cos["bb_gradcam"], cam_cos["sswa"]))
    assert cell(md, ["x2", "BB Grad-CAM - SSWA"], "Cos") == f"{mean:+.3f} ± {half:.3f}"
    assert "SSWA - SSWA" not in md and "KD - SSWA" not in md
    # A sweep evaluated with Grad-CAM alone has no such section.
    ev["methods"] = ["gradcam"]
    for run in runs.values():
        run["methods"].pop("rise")
    md = "\n".join(report.tables(c, stages, {"eval": ev, "eval_methods": None}, voc=False))
    assert "RISE maps" not in md


def test_deployment_table_from_the_latency_benchmark_file(tmp_path):
    """The report's Deployment table shows each run of ``<root>/deploy/latency.json`` with its cells formatted
    from the file's numbers; without the file there is no such section."""
    from apjax.report_deploy import deployment_table

    assert deployment_table(tmp_path) == []
    row = dict(run="kd_x2_sswa", params=59646, bytes_on_disk=317750, weights_storage="float32",
               predict_b1_ms_median=1.094, predict_b1_ms_p95=1.181, predict_batch_images_per_s=2146.2,
               predict_b1_speedup=1.126, predict_batch_speedup=1.569, explain_b1_ms_median=1.21,
               explain_b1_ms_p95=1.51, explain_batch_speedup=1.197)  # fmt: skip
    (tmp_path / "deploy").mkdir()
    found = {"rows": [row], "settings": {"batch_size": 64}, "date": "2026-12-06", "jax_version": "0.10.2",
             "machine": {"cpu": "AMD EPYC", "device_kind": "cpu"}}  # fmt: skip
    (tmp_path / "deploy" / "latency.json").write_text(json.dumps(found))
    md = "\n".join(deployment_table(tmp_path))
    assert cell(md, ["kd_x2_sswa"], "#params") == "59,646"
    assert cell(md, ["kd_x2_sswa"], "bytes on disk") == "317,750 (float32)"
    assert cell(md, ["kd_x2_sswa"], "predict ms/image at batch 1 (median / p95)") == "1.09 / 1.18"
    assert cell(md, ["kd_x2_sswa"], "predict images/s at batch 64") == "2,146"
    assert cell(md, ["kd_x2_sswa"], "predict speed-up (batch 1, 64)") == "1.13x, 1.57x"
    assert "2026-12-06, AMD EPYC, cpu, jax 0.10.2" in md
