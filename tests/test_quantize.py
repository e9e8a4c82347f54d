"""The quantize task: qwix's quantized forward against references, the second-order matching gradient
against finite differences, one-sentence refusals, and a tiny run that eval restores as quantized."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import qwix
from flax import traverse_util

from apjax import experiment, report
from apjax.compress import distill
from apjax.compress.quantize import model_size_bytes
from apjax.errors import ConfigError
from apjax.evaluation import evaluate_workdir, load_run
from apjax.models import create_model, init_variables
from apjax.models.quantized import quantize_model
from apjax.tasks import train_and_evaluate, validate_config
from configs import paper
from configs import quantize as quantize_config
from tests.test_experiment import cell
from tests.test_prune import small_prune_config

WIDTHS = (4, "M", 8, "M")


def _numpy_round_trip(w: np.ndarray, bits: int) -> np.ndarray:
    """Symmetric per-output-channel absmax quantization as qwix documents it, computed independently:
    scale = max|w| / (qmax + 0.5), q = clip(round(w / scale), -2^(b-1), qmax), back to q * scale."""
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(w).max(axis=tuple(range(w.ndim - 1)), keepdims=True) / (qmax + 0.5)
    return np.clip(np.round(w / scale), -qmax - 1, qmax) * scale


def _largest_sign(w: np.ndarray) -> np.ndarray:
    """Per output channel (last axis), the sign of the entry of largest magnitude."""
    flat = w.reshape(-1, w.shape[-1])
    return np.sign(flat[np.argmax(np.abs(flat), axis=0), np.arange(w.shape[-1])])


def test_quantized_forward_equals_qwix_ptq_and_a_numpy_round_trip():
    model = create_model(WIDTHS, num_classes=3, dropout_rate=0.0)
    v = init_variables(model, jax.random.key(0), 16)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    # int8 weights and activations: qwix's own post-training quantization of the same weights.
    ptq = qwix.quantize_model(
        model,
        qwix.PtqProvider([qwix.QuantizationRule(module_path=".*", weight_qtype="int8", act_qtype="int8")]),
    )
    abstract = jax.eval_shape(ptq.init, jax.random.key(0), x)["params"]
    qparams = qwix.quantize_params(v["params"], abstract)
    qat = quantize_model(model, "int8")
    assert qat.tap_names == model.tap_names and isinstance(qat, type(model))
    expected = ptq.apply({"params": qparams, "batch_stats": v["batch_stats"]}, x)
    np.testing.assert_allclose(qat.apply(v, x), expected, rtol=0, atol=1e-6)
    assert not np.allclose(qat.apply(v, x), model.apply(v, x), atol=1e-4)  # it does quantize
    # The stored size: the PTQ tree's int8 values and float32 scales, and every float leaf as stored.
    ptq_bytes = sum(
        int(np.size(a)) * (1 if a.dtype == jnp.int8 else a.dtype.itemsize)
        for a in jax.tree.leaves({"params": qparams, "batch_stats": v["batch_stats"]})
    )
    assert model_size_bytes(v, "int8")["size_bytes"] == ptq_bytes
    # int4 weights only (qwix's PTQ refuses a conv with float activations): a numpy round trip. Each
    # channel's largest magnitude sits on the rounding tie (qmax + 0.5) up to the last bit of the scale
    # (XLA divides by a reciprocal): made positive, it maps to qmax whichever way that bit falls.
    flat = {
        k: np.asarray(a) * (_largest_sign(np.asarray(a)) if k[-1] == "kernel" else 1)
        for k, a in traverse_util.flatten_dict(jax.device_get(v["params"])).items()
    }
    v = {
        "params": jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat)),
        "batch_stats": v["batch_stats"],
    }
    rounded = {k: _numpy_round_trip(np.asarray(a), 4) if k[-1] == "kernel" else a for k, a in flat.items()}
    ref = model.apply({"params": traverse_util.unflatten_dict(rounded), "batch_stats": v["batch_stats"]}, x)
    np.testing.assert_allclose(quantize_model(model, "int4w").apply(v, x), ref, rtol=0, atol=1e-5)
    sizes = model_size_bytes(v, "int4w")
    n_kernel = sum(a.size for k, a in flat.items() if k[-1] == "kernel")
    assert sizes["quantized_weights"] == n_kernel
    assert sizes["float_size_bytes"] - sizes["size_bytes"] == 4 * n_kernel - (n_kernel // 2 + 4 * (4 + 8 + 3))


def test_second_order_matching_gradient_through_int4_weights_matches_finite_differences():
    """The SWA matching loss of the quantized (int4 weights) student differentiated through its tap
    gradients (second order, through qwix's custom VJPs) against central differences, float64, along a
    direction over every float parameter (biases, BatchNorm). The quantized kernels are left out: their
    forward is piecewise constant (rounding), so finite differences see 0 where straight-through training
    uses the identity; with int8 activations the whole loss is piecewise constant in every parameter, so
    the check is made on weight-only quantization."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        teacher = create_model((6, "M", 10, 10, "M", 8, "M"), num_classes=5, dtype=jnp.float64)
        student = create_model(
            (3, "M", 5, 10, "M", 4, "M"), num_classes=5, dtype=jnp.float64, dropout_rate=0.0
        )
        q = quantize_model(student, "int4w")
        tv = jax.tree.map(
            lambda a: jnp.asarray(a, jnp.float64), init_variables(teacher, jax.random.key(1), 16)
        )
        sv = jax.tree.map(
            lambda a: jnp.asarray(a, jnp.float64), init_variables(student, jax.random.key(2), 16)
        )
        x = jnp.asarray(rng.normal(size=(3, 16, 16, 3)))
        labels = jnp.asarray((rng.random((3, 5)) < 0.4).astype(np.float64))
        d = ml_collections.ConfigDict(dict(method="swa", taps=("conv2_2",), beta=1.0, matching_form="l2"))

        def loss(params):
            return distill.distill_loss(
                params, q, sv["batch_stats"], teacher, tv, x, labels, d,
                jax.random.key(0), jax.random.key(1), base_loss="bce",
            )[1]["parts"]["match"]  # fmt: skip

        loss = jax.jit(loss)  # one compile for the loss, one for its gradient
        grads = jax.jit(jax.grad(loss))(sv["params"])
        direction = jax.tree_util.tree_map_with_path(
            lambda p, a: (
                jnp.zeros_like(a) if p[-1].key == "kernel" else jnp.asarray(rng.normal(size=a.shape))
            ),
            sv["params"],
        )
        eps = 1e-5

        def at(sign):
            return loss(jax.tree.map(lambda a, u: a + sign * eps * u, sv["params"], direction))

        fd = float((at(1) - at(-1)) / (2 * eps))
        analytic = sum(
            float(jnp.vdot(g, u))
            for g, u in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
        )
        assert abs(fd) > 1e-6  # a direction the matching term depends on
        np.testing.assert_allclose(analytic, fd, rtol=1e-6)
        # The second-order term is there: conv3_1's BatchNorm sits between the tap and the logits.
        assert float(jnp.abs(grads["conv3_1_bn"]["scale"]).sum()) > 0
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def _quant_config(teacher_dir, bits, method, **quant):
    c = small_prune_config(quantize_config, teacher_dir, method)
    c.quant.bits = bits
    c.quant.update(quant)
    return c


def test_quantize_config_errors(teacher_dir, tmp_path):
    def one_sentence(e):
        msg = str(e.value)
        assert "\n" not in msg and msg.endswith(".") and msg.count(". ") == 0, msg

    c = _quant_config(teacher_dir, "int3", "naive")
    with pytest.raises(ConfigError, match="unknown config.quant.bits 'int3'") as e:
        validate_config(c)
    one_sentence(e)
    c = _quant_config(teacher_dir, "int8", "kd")
    with pytest.raises(ConfigError, match="unknown method 'kd'"):
        validate_config(c)
    c = _quant_config(teacher_dir, "int8", "naive", source_workdir=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="no trained run in .*nowhere") as e:
        train_and_evaluate(c, tmp_path / "q")
    one_sentence(e)


def test_quantize_task_trains_and_eval_restores_the_quantized_net(teacher_dir, tmp_path):
    c = _quant_config(teacher_dir, "int8", "sswa")
    workdir = tmp_path / "quant_int8_sswa"
    final = train_and_evaluate(c, workdir)
    summary = json.loads((workdir / "final_metrics.json").read_text())
    assert summary["quant_bits"] == "int8"
    assert summary["size_bytes"] < summary["float_size_bytes"] / 3
    assert json.loads((workdir / "config.json").read_text())["quant"]["bits"] == "int8"
    run = load_run(workdir, "latest")  # eval.py's path: config.json rebuilds the quantized model
    assert hasattr(type(run.model), "_unquantized_type")
    m = evaluate_workdir(workdir, "latest")
    assert m["mAP"] == pytest.approx(final["mAP"], abs=1e-6)
    # A quantized run is no source for another quantization.
    again = _quant_config(teacher_dir, "int4w", "naive", source_workdir=str(workdir))
    with pytest.raises(ConfigError, match="holds a quantized run"):
        train_and_evaluate(again, tmp_path / "q2")


def test_sweep_plans_quantization_stages_and_the_report_shows_them(tmp_path):
    c = paper.get_config("small")
    stages = experiment.plan(c, tmp_path)
    quant = [s for s in stages if s.kind == "quantize"]
    assert [s.name for s in quant][:2] == ["quant_int8_naive", "quant_int8_ewa"] and len(quant) == 8
    s = next(s for s in quant if s.name == "quant_int4w_sswa")
    assert (s.bits, s.config.quant.bits, s.config.distill.method) == ("int4w", "int4w", "sswa")
    assert s.config.model == c.teacher.model and s.config.quant.source_workdir == ""
    assert s.config.distill.teacher_workdir == str(tmp_path / "teacher")
    experiment.validate_sweep(c, stages)
    assert not [s for s in experiment.plan(paper.get_config("demo"), tmp_path) if s.kind == "quantize"]

    gradcam = {"AUC": 0.85, "Point": 0.75, "Cos": 0.8, "l2": 12.5}
    sizes = {"teacher": 4_000_000, "quant_int8_naive": 1_010_000, "quant_int4w_sswa": 510_000}
    ev = {
        "run_order": list(sizes),
        "runs": {
            n: {"val": {"mAP": 0.5}, "methods": {"gradcam": gradcam}, "size_bytes": b, "params_nonzero": 10}
            for n, b in sizes.items()
        },
    }
    md = "\n".join(report.tables(c, stages, {"eval": ev, "eval_methods": None}, voc=False))
    assert "## Quantization" in md
    assert cell(md, ["float32 (teacher)", "-"], "size (bytes)") == "4,000,000"
    row = ["int4 weights (float activations)", "SSWA"]
    assert cell(md, row, "size (bytes)") == "510,000" and cell(md, row, "of the teacher's") == "12.8%"
    assert cell(md, ["int8 weights + int8 activations", "Naive"], "AUC") == "85.00"
