"""The localisation report: files, the table's numbers, a student identical to its teacher, a hand-built
case against independent numbers, the paper's parameter count and the best-checkpoint criterion."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apjax.attribution.methods import ATTRIBUTION_METHODS
from apjax.data.pipeline import TrainBatches, data_mesh
from apjax.evaluation import (
    checkpoint_selection,
    conv_bn_param_count,
    evaluate_localization,
    load_run,
    localization_report,
)
from apjax.localization_table import localization_table
from apjax.models import count_params, create_model, init_variables
from apjax.tasks import validate_config
from apjax.trainer.checkpoints import Checkpoints, resumed_best
from apjax.trainer.config import load_data
from apjax.trainer.files import check_resume_config, prepare_workdir
from apjax.trainer.loop import Task, run_training
from apjax.trainer.state import TrainState
from tests.test_train import tiny_config

LABELS = {name: m.label for name, m in ATTRIBUTION_METHODS.items()}


def table_cell(md: str, first_cells: list[str], column: str) -> str:
    """The cell under the header ``column`` in the Markdown table row that starts with ``first_cells``."""
    lines = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[: len(first_cells)] == first_cells:
            return cells[header.index(column)]
    raise AssertionError(f"no row {first_cells}")


def test_localization_report_of_a_teacher_and_an_identical_student(teacher_dir, tmp_path, monkeypatch):
    from apjax.evaluators import faithfulness

    twin = tmp_path / "twin"
    shutil.copytree(teacher_dir, twin)
    out = tmp_path / "report"
    built = []  # the faithfulness evaluators' method options: the localisation's own (ig_steps included)

    class Recording(faithfulness.Evaluator):
        def __init__(self, *args, method_options=None, **kwargs):
            built.append(dict(method_options))
            super().__init__(*args, method_options=method_options, **kwargs)

    monkeypatch.setattr(faithfulness, "Evaluator", Recording)
    results = localization_report(
        [teacher_dir, twin], methods=("gradcam", "gradient"), out_dir=out, batch_size=8, figure_images=2,
        faithfulness={"steps": 4, "regions": 3}, ig_steps=5, method_options={"rise_masks": 100},
    )  # fmt: skip
    assert len(built) == 2 and all(o["ig_steps"] == 5 and o["rise_masks"] == 100 for o in built)
    saved = json.loads((out / "localization.json").read_text())
    assert saved["runs"].keys() == {teacher_dir.name, "twin"}
    assert (out / "figures" / "gradcam.png").stat().st_size > 0
    assert (out / "figures" / "gradient.png").stat().st_size > 0
    teacher = saved["runs"][teacher_dir.name]
    student = saved["runs"]["twin"]
    assert teacher["pairs"] == student["pairs"] > 0
    for method in ("gradcam", "gradient"):
        m = teacher["methods"][method]
        assert 0.0 <= m["AUC"] <= 1.0 and 0.0 <= m["Point"] <= m["Point_ref_cumulative"] <= 1.0
        # The same weights give the same maps: cosine 1 and l2 distance 0, on every pair.
        s = student["methods"][method]
        np.testing.assert_allclose(s["Cos"], 1.0, atol=1e-6)
        np.testing.assert_allclose(s["l2"], 0.0, atol=1e-4)
        assert s["AUC"] == m["AUC"] and s["similarity_pairs"] == teacher["pairs"]
    md = (out / "localization.md").read_text()
    row = ["twin", LABELS["gradcam"]]
    assert table_cell(md, row, "AUC") == f"{100 * student['methods']['gradcam']['AUC']:.2f}"
    assert table_cell(md, row, "Cos") == f"{student['methods']['gradcam']['Cos']:.3f}"
    assert table_cell(md, row, "per-image AP (paper's mAP)") == f"{100 * student['val']['per_image_AP']:.2f}"
    assert (
        table_cell(md, row, "F1 (logit >= 0.5, paper's F1)") == f"{100 * student['val']['F1_logit0.5']:.2f}"
    )
    assert table_cell(md, row, "pairs with the teacher (Cos, l2)") == str(teacher["pairs"])
    # Faithfulness: each run's own maps on its own model; the same weights give the same curves.
    assert saved["faithfulness"] == {"steps": 4, "regions": 3}
    for key in ("deletion_auc", "insertion_auc", "morf_aopc"):
        value = student["methods"]["gradcam"][key]
        assert 0.0 <= value <= 1.0 and value == teacher["methods"]["gradcam"][key]
    masks_table = md[md.index("Against the class's mask") :]  # the second table: the mask metrics
    for key in ("RMA", "RRA", "AttrLoc", "TopK", "EnergyPoint"):
        value = student["methods"]["gradient"][key]
        assert 0.0 <= value <= 1.0 and value == teacher["methods"]["gradient"][key]
        assert table_cell(masks_table, ["twin", LABELS["gradient"]], key) == f"{100 * value:.2f}"
    # The teacher's config keeps the default criterion: its best checkpoint was chosen by VOC mAP, whose
    # value at training time the report's re-evaluation reproduces.
    assert student["checkpoint"]["checkpoint"] == "best" and student["checkpoint"]["best_metric"] == "mAP"
    assert student["checkpoint"]["best_value"] == pytest.approx(student["val"]["mAP"], abs=1e-6)
    assert table_cell(md, row, "checkpoint") == "best mAP"
    params = load_run(twin).variables["params"]
    assert student["params_conv_bn"] == conv_bn_param_count(params)
    assert results["runs"].keys() == saved["runs"].keys()


def test_unknown_method_and_missing_workdir(teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown attribution methods \\['gradcam\\+\\+'\\]"):
        localization_report([teacher_dir], methods=("gradcam++",))
    with pytest.raises(FileNotFoundError, match="pass the --workdir of a training run"):
        localization_report([tmp_path / "none"], methods=("gradcam",))


# --- The report's numbers on a hand-built case -------------------------------------------------------------


def _brute_auc(m, target):
    """ROC-AUC by its pairwise definition: P(positive pixel > negative pixel), ties counting 1/2."""
    pos, neg = m[target].tolist(), m[~target].tolist()
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def _first_argmax(m):
    """The first maximum in row-major order (the reference's ``np.where(h == h.max())``, first entry)."""
    best, at = -math.inf, None
    for r in range(m.shape[0]):
        for c in range(m.shape[1]):
            if m[r, c] > best:
                best, at = m[r, c], (r, c)
    return at


def _minmax64(m):
    m = m.astype(np.float64)
    span = m.max() - m.min()
    return (m - m.min()) / span if span > 0 else np.zeros_like(m)


def test_evaluate_localization_equals_independent_numbers_on_a_hand_built_case():
    # Three 8x8 masks. Image 0: class index 0 (value 1) top-left, class index 2 (value 3) bottom-right and a
    # void row; image 1: class index 1 (value 2); image 2: value 1 everywhere (its AUC is undefined).
    masks = np.zeros((3, 8, 8), np.uint8)
    masks[0, :3, :3] = 1
    masks[0, 5:, 5:] = 3
    masks[0, 4, :] = 255
    masks[1, 2:6, 1:5] = 2
    masks[2] = 1
    student_pairs = [(0, 0), (0, 2), (1, 1), (2, 0)]  # the student predicts all four
    teacher_pairs = [(0, 0), (1, 1), (2, 0)]  # the teacher misses (0, 2)
    rng = np.random.default_rng(7)
    student = {p: np.round(rng.random((8, 8)), 1).astype(np.float32) for p in student_pairs}  # many ties
    teacher = {p: np.round(rng.random((8, 8)), 1).astype(np.float32) for p in teacher_pairs}
    student[(0, 2)][0, 1] = 5.0  # class 2's map peaks on class 0's object: a miss, the reference's hit
    student[(1, 1)][:] = 0.0  # a constant map: no arg-max (a miss), AUC 1/2
    student[(0, 0)][1, 1] = 3.0  # a peak inside its own object: a hit

    # By hand: the reference's accepted mask values for each pair (present classes with index <= k).
    accepted = {(0, 0): {1}, (0, 2): {1, 3}, (1, 1): {2}, (2, 0): {1}}
    aucs, hits, ref_hits, constant = [], [], [], 0
    for i, k in student_pairs:
        m, own = student[(i, k)], masks[i] == k + 1
        if 0 < own.sum() < own.size:
            aucs.append(_brute_auc(m.astype(np.float64), own))
        if m.max() == m.min():
            constant += 1
            hits.append(False), ref_hits.append(False)
            continue
        r, c = _first_argmax(m)
        hits.append(bool(own[r, c]))
        ref_hits.append(int(masks[i, r, c]) in accepted[(i, k)])
    assert hits == [True, False, False, True] and ref_hits == [True, True, False, True]
    cos, l2 = [], []
    for p in teacher_pairs:  # the common pairs, in the teacher's order
        a, b = _minmax64(student[p]).ravel(), _minmax64(teacher[p]).ravel()
        na, nb = math.sqrt(float(a @ a)), math.sqrt(float(b @ b))
        cos.append(float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0)
        l2.append(math.sqrt(float(((a - b) ** 2).sum())))
    assert cos[1] == 0.0 and l2[1] > 0  # the constant student map normalises to zeros

    def maps_of(table):
        return lambda chunk: np.stack([table[tuple(p)] for p in chunk.tolist()])

    calls = []
    got = evaluate_localization(
        maps_of(student),
        masks,
        np.array(student_pairs),
        batch_size=3,  # two batches of pairs: 3 + 1
        teacher_maps_of=maps_of(teacher),
        teacher_pairs=np.array(teacher_pairs),
        progress=calls.append,
    )
    assert got["AUC"] == pytest.approx(np.mean(aucs), abs=1e-12) and got["auc_pairs"] == len(aucs) == 3
    assert got["Point"] == pytest.approx(2 / 4) and got["Point_ref_cumulative"] == pytest.approx(3 / 4)
    assert got["constant_maps"] == constant == 1 and got["pairs"] == 4
    assert got["Cos"] == pytest.approx(np.mean(cos), abs=1e-12) and got["similarity_pairs"] == 3
    assert got["l2"] == pytest.approx(np.mean(l2), abs=1e-12)
    assert calls == [3, 1, 3]

    # The table shows these numbers under their names.
    val = {"mAP": 0.5, "mAP_devkit": 0.55, "per_image_AP": 0.6, "F1": 0.7, "F1_logit0.5": 0.65}
    results = {
        "run_order": ["t", "s"],
        "image_size": 8,
        "runs": {
            "t": {
                "val": val,
                "checkpoint": {"checkpoint": "latest"},
                "methods": {"gradcam": {**got, "Cos": None}},
            },
            "s": {"val": val, "checkpoint": None, "methods": {"gradcam": got}},
        },
    }
    md = localization_table(results, LABELS)
    row = ["s", LABELS["gradcam"]]
    for column, want in [
        ("AUC", f"{100 * np.mean(aucs):.2f}"),
        ("Point", "50.00"),
        ("Point (ref., classes <= k)", "75.00"),
        ("Cos", f"{np.mean(cos):.3f}"),
        ("l2", f"{np.mean(l2):.2f}"),
        ("pairs (AUC, Point)", "4"),
        ("pairs with the teacher (Cos, l2)", "3"),
        ("constant maps", "1"),
        ("VOC mAP", "50.00"),
        ("VOC mAP (devkit AP)", "55.00"),
        ("per-image AP (paper's mAP)", "60.00"),
        ("F1 (p > 0.5)", "70.00"),
        ("F1 (logit >= 0.5, paper's F1)", "65.00"),
        ("checkpoint", "-"),
    ]:
        assert table_cell(md, row, column) == want, column
    assert table_cell(md, ["t", LABELS["gradcam"]], "checkpoint") == "latest"
    assert table_cell(md, ["t", LABELS["gradcam"]], "Cos") == "-"


# --- The paper's parameter count for unstructured pruning --------------------------------------------------


def test_conv_bn_param_count_by_hand_and_the_papers_530250():
    # A net "2, M, 3, M" with a 2-class head: conv1_1 kernel 3*3*3*2 = 54, bias 2, BN scale + bias 4; conv2_1
    # kernel 3*3*2*3 = 54, bias 3, BN 6. Zero 10 and 4 kernel weights and every bias: the count is
    # (54 - 10) + 2 + 4 + (54 - 4) + 3 + 6 = 109 (biases counted though zero), the head not at all.
    params = jax.device_get(init_variables(create_model((2, "M", 3, "M"), 2), jax.random.key(0), 8)["params"])
    params = jax.tree.map(np.array, params)
    params["conv1_1"]["kernel"].reshape(-1)[:10] = 0.0
    params["conv2_1"]["kernel"].reshape(-1)[5:9] = 0.0
    params["conv1_1"]["bias"][:] = 0.0
    params["conv2_1"]["bias"][:] = 0.0
    assert np.count_nonzero(params["conv1_1"]["kernel"]) == 44
    assert np.count_nonzero(params["conv2_1"]["kernel"]) == 50
    assert conv_bn_param_count(params) == 109
    # All parameters: the zeroed kernel weights (14) and the head (3 * 2 * 2 inputs x 2 classes + 2 biases).
    assert count_params(params) == 109 + 14 + 3 * 2 * 2 * 2 + 2

    # VGG16 (SPEC section 6): 517,578 non-zero conv weights + conv biases and BN (12,672) = 530,250.
    shapes = jax.eval_shape(lambda: init_variables(create_model("vgg16", 20), jax.random.key(0), 227))
    vgg = jax.tree.map(lambda s: np.ones(s.shape, np.float32), shapes["params"])
    for name in vgg:
        if "kernel" in vgg[name] and name != "head":
            vgg[name]["kernel"] = np.zeros_like(vgg[name]["kernel"])
    vgg["conv5_3"]["kernel"].reshape(-1)[:517_578] = 1.0
    assert conv_bn_param_count(vgg) == 530_250


# --- The best checkpoint: chosen by config.best_metric --------------------------------------------------


def _scripted_task(values):
    """A Task whose step only counts and whose val metrics are ``values[step]``."""
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params={"w": jnp.zeros((2,))},
        batch_stats={"s": jnp.zeros((1,))},
        opt_state={"o": jnp.zeros((1,))},
        rng=jax.random.key_data(jax.random.key(0)),
    )
    return Task(
        init_state=lambda: state,
        train_step=lambda s, batch: (
            s.replace(step=s.step + 1),
            {"loss": jnp.float32(0.1), "lr": jnp.float32(0)},
        ),
        evaluate=lambda s, cache: dict(values[int(s.step)]),
    )


def test_best_checkpoint_follows_config_best_metric_and_survives_resume(teacher_dir, tmp_path):
    c = tiny_config(teacher_dir.parent / "data", best_metric="per_image_AP")  # 48 images, 3 steps an epoch
    validate_config(c)
    mesh = data_mesh()
    data = load_data(c)
    batches = TrainBatches(data["train"], c.batch_size, seed=0, mesh=mesh)
    assert batches.steps_per_epoch == 3
    # VOC mAP would pick step 6, the per-image AP picks step 3; at step 12 (after resuming) neither improves.
    values = {
        3: {"mAP": 0.50, "per_image_AP": 0.70},
        6: {"mAP": 0.60, "per_image_AP": 0.60},
        9: {"mAP": 0.40, "per_image_AP": 0.65},
        12: {"mAP": 0.45, "per_image_AP": 0.68},
    }
    workdir = tmp_path / "run"
    prepare_workdir(workdir, c)
    run_training(c, workdir, _scripted_task(values), data, batches, mesh)

    def metas():
        checkpoints = Checkpoints(workdir)
        abstract = _scripted_task(values).init_state()
        try:
            return [Checkpoints.restore(m, abstract)[1] for m in (checkpoints.best, checkpoints.latest)]
        finally:
            checkpoints.close()

    best, latest = metas()
    assert best["step"] == 3 and best["best_metric"] == "per_image_AP" and best["best_value"] == 0.70
    assert best["val"] == values[3]
    assert latest["step"] == 9 and latest["best_metric"] == "per_image_AP" and latest["best_value"] == 0.70
    assert checkpoint_selection(best, "best") == {
        "checkpoint": "best",
        "best_metric": "per_image_AP",
        "best_value": 0.70,
    }
    # Resuming for one more epoch: the best value so far comes back from the latest checkpoint's meta, so
    # 0.68 at step 12 does not replace the best of step 3.
    c.num_epochs = 4
    check_resume_config(workdir, c)
    run_training(c, workdir, _scripted_task(values), data, batches, mesh)
    best, latest = metas()
    assert best["step"] == 3 and latest["step"] == 12 and latest["best_value"] == 0.70
    # Another criterion changes the run: the workdir refuses it.
    c.best_metric = "mAP"
    with pytest.raises(ValueError, match="differs in best_metric"):
        check_resume_config(workdir, c)


def test_best_metric_checks_and_older_runs(tmp_path):
    c = tiny_config(tmp_path / "data", best_metric="AP")
    with pytest.raises(ValueError, match=r"unknown config.best_metric 'AP'; choose one of \['mAP', "):
        validate_config(c)
    # A latest checkpoint saved before the criterion was recorded holds best_mAP (chosen by VOC mAP).
    assert resumed_best({"step": 3, "best_mAP": 0.3}, "mAP") == 0.3
    assert resumed_best({"step": 3, "best_mAP": 0.3}, "per_image_AP") == -1.0
    assert resumed_best({"best_metric": "per_image_AP", "best_value": 0.4}, "per_image_AP") == 0.4
    # A config.json written before the field existed resumes under the criterion those runs had.
    workdir = tmp_path / "old"
    workdir.mkdir()
    old = tiny_config(tmp_path / "data")
    del old["best_metric"]
    (workdir / "config.json").write_text(old.to_json_best_effort())
    check_resume_config(workdir, tiny_config(tmp_path / "data"))
    with pytest.raises(ValueError, match="differs in best_metric"):
        check_resume_config(workdir, tiny_config(tmp_path / "data", best_metric="per_image_AP"))


def test_the_report_figure_overlays_each_map_on_its_image_and_is_deterministic(tmp_path):
    from pathlib import Path
    from types import SimpleNamespace

    from PIL import Image

    from apjax.evaluation import _figure

    size, rng = 32, np.random.default_rng(0)
    seg = SimpleNamespace(images=rng.integers(0, 256, (3, 36, 36, 3), np.uint8), extents=np.full((3, 2), 36))
    masks = rng.integers(0, 3, (3, size, size)).astype(np.uint8)
    ctx = SimpleNamespace(image_size=size, cache=lambda split: seg, masks=lambda split: masks)
    ramp = np.outer(np.arange(size), np.ones(size))

    class Maps:  # a localisation evaluator's maps of the figure's pairs
        def __init__(self, sign):
            self.sign = sign

        def maps_and_scores(self, method, variables, pairs, keep):
            return {}, np.stack([self.sign * ramp + i for i, _ in pairs.tolist()])

    config = tiny_config(tmp_path / "data")
    runs = [SimpleNamespace(name=n, config=config, variables=None, workdir=tmp_path) for n in ("t", "s")]
    pairs = np.array([[0, 1], [0, 2], [2, 0]])  # the first pair of images 0 and 2
    paths = [_figure(runs, [Maps(1), Maps(-1)], ctx, pairs, 2, "gradcam", tmp_path / f"o{i}") for i in (0, 1)]
    first, second = (Path(p).read_bytes() for p in paths)
    assert first == second and len(first) < 100_000  # deterministic and small
    # Two rows (images), four columns (image, mask, one overlay per run), 2.2 inches at 80 dpi each.
    assert Image.open(paths[0]).size == (4 * 176, 2 * 176)
