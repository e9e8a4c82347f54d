"""The model protocol: a Flax model written here joins apjax by sowing its taps and one registry entry.

Its tap gradient and Grad-CAM map are checked against the closed form of its head (a global mean then a
Dense layer: d logit / d A = W seed / (h w) at every position), not against apjax's own formulas.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import apjax.models as models
from apjax.attribution.methods import attribution_fn
from apjax.models import ModelFamily, create_model, init_variables, tap_gradients, tap_shapes
from apjax.models.taps import tap


class _Stem(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
        return tap(self, "out", y)  # a tap inside a submodule: named by its path, "stem/out"


class TinyNet(nn.Module):
    """Conv -> ReLU (tap ``stem/out``) -> conv ``feat`` -> ReLU (tap ``feat``, the submodule's own name)
    -> global mean -> Dense head."""

    num_classes: int = 5
    dtype: jnp.dtype = jnp.float32

    tap_names = ("stem/out", "feat")
    gradcam_tap = "feat"

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = _Stem(name="stem")(x.astype(self.dtype))
        x = tap(self, "feat", nn.relu(nn.Conv(6, (3, 3), name="feat")(x)))
        return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


TINY = ModelFamily(
    name="tiny",
    module=TinyNet,
    recognizes=lambda spec: spec == "tiny",
    build=lambda spec, num_classes=20, dtype=jnp.float32, init=None, dropout_rate=0.0: TinyNet(
        num_classes, dtype
    ),
    check_input=lambda model, image_size: None,
    student=lambda spec, divisor: spec,
    examples=("tiny",),
)


@pytest.fixture
def tiny_family(monkeypatch):
    monkeypatch.setitem(models.FAMILIES, "tiny", TINY)  # the one registry line


def test_a_flax_model_joins_by_sowing_its_taps(tiny_family):
    model = create_model("tiny", num_classes=5)
    variables = init_variables(model, jax.random.key(0), 12)
    x = jax.random.normal(jax.random.key(1), (3, 12, 12, 3))
    shapes = tap_shapes(model, variables, x)
    assert {t: s.shape for t, s in shapes.items()} == {"stem/out": (3, 12, 12, 4), "feat": (3, 12, 12, 6)}

    seed = jax.nn.one_hot(jnp.array([0, 3, 4]), 5)
    logits, acts, grads, _ = tap_gradients(model, variables, x, seed, ["feat", "stem/out"])
    chex.assert_trees_all_close(logits, model.apply(variables, x), rtol=1e-6)
    chex.assert_shape([acts["feat"], grads["feat"]], (3, 12, 12, 6))
    # Closed form at the last tap: d sum_b <seed_b, logits_b> / d A[b, i, j, c] = (W seed_b)_c / (h w).
    w = np.asarray(variables["params"]["head"]["kernel"])  # (C, K)
    expected = np.broadcast_to((np.asarray(seed) @ w.T)[:, None, None, :] / 144.0, (3, 12, 12, 6))
    np.testing.assert_allclose(np.asarray(grads["feat"]), expected, rtol=1e-5, atol=1e-8)
    assert np.abs(np.asarray(grads["stem/out"])).max() > 0

    # Grad-CAM at model.gradcam_tap: ReLU(sum_c u_c A_c), u_c the spatial sum of the gradient = (W seed)_c.
    cam = attribution_fn("gradcam", model, variables)(x, jnp.array([0, 3, 4]))
    u = np.asarray(seed) @ w.T  # (B, C)
    ref = np.maximum(np.einsum("bhwc,bc->bhw", np.asarray(acts["feat"]), u), 0.0)
    np.testing.assert_allclose(np.asarray(cam), ref, rtol=1e-5, atol=1e-6)


def test_the_tasks_read_its_taps_and_refuse_what_it_cannot_do(tiny_family):
    from apjax.compress.distill import validate_distill_config

    c = ml_collections.ConfigDict(dict(model="tiny"))
    c.distill = ml_collections.ConfigDict(
        dict(method="sswa", taps=("stem/out",), beta=1.0, matching_form="squared_mean",
             sswa_mode="fixed_count", sswa_drop=0.3, temperature=4.0, alpha=0.9, kd_log_eps=1e-7,
             teacher_workdir="t")
    )  # fmt: skip
    validate_distill_config(c, ("kd", "sswa"))
    c.distill.taps = ("pool5",)
    with pytest.raises(ValueError, match=r"taps must be a non-empty subset of \['stem/out', 'feat'\]"):
        validate_distill_config(c, ("kd", "sswa"))
    model = create_model("tiny", num_classes=5)
    with pytest.raises(ValueError, match="LRP a1b0 walks a plain conv chain"):
        attribution_fn("lrp", model, init_variables(model, jax.random.key(0), 8))
    with pytest.raises(ValueError, match="unknown model 'tiny2'; give a model of one of the families"):
        create_model("tiny2")
