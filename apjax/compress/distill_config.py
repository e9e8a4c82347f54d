"""The ``config.distill`` block's checks (SPEC sections 4 and 5): the method, the matching settings, the
teacher cache and the teacher's access (full, or black-box: :mod:`apjax.compress.blackbox`). Used by
distillation, pruning and quantization, each with its own list of methods."""

from __future__ import annotations

import ml_collections

from apjax.attribution.methods import occlusion_patch
from apjax.attribution.perturbation import occlusion_corners
from apjax.compress.blackbox import TEACHER_ACCESS, TEACHER_MAPS, blackbox_options
from apjax.compress.losses import MATCHING_FORMS
from apjax.compress.matching import MATCHING_MAPS, SSWA_MODES, matching_methods
from apjax.compress.teacher_cache import CACHE_DTYPES
from apjax.errors import ConfigError
from apjax.models import create_model


def methods() -> tuple[str, ...]:
    """Distillation's methods: ``kd`` (no matching term) and every registered matching map, those of a
    black-box teacher included."""
    return ("kd", *matching_methods(access=None))


def validate_distill_config(
    config: ml_collections.ConfigDict, choices: tuple[str, ...] | None = None
) -> None:
    """Raises ``ConfigError`` (one sentence) for a bad ``config.distill`` value (teacher and matching);
    ``choices`` are the allowed methods (distillation's by default)."""
    d = config.distill
    choices = methods() if choices is None else choices
    if d.method not in choices:
        raise ConfigError(f"unknown method {d.method!r}; choose one of {list(choices)}.")
    if d.matching_form not in MATCHING_FORMS:
        raise ConfigError(f"unknown matching_form {d.matching_form!r}; choose one of {list(MATCHING_FORMS)}.")
    if d.sswa_mode not in SSWA_MODES:
        raise ConfigError(f"unknown sswa_mode {d.sswa_mode!r}; choose one of {list(SSWA_MODES)}.")
    if not 0 <= d.sswa_drop < 1:
        raise ConfigError(f"config.distill.sswa_drop must be in [0, 1), got {d.sswa_drop!r}.")
    if not d.beta >= 0:
        raise ConfigError(f"config.distill.beta must be >= 0, got {d.beta!r}.")
    if not d.temperature > 0:
        raise ConfigError(f"config.distill.temperature must be > 0, got {d.temperature!r}.")
    if not 0 <= d.alpha <= 1:
        raise ConfigError(f"config.distill.alpha must be in [0, 1], got {d.alpha!r}.")
    if not 0 <= d.get("kd_log_eps", 0.0) < 1e-3:
        raise ConfigError(
            f"config.distill.kd_log_eps must be in [0, 1e-3) (the reference's 1e-7, or 0 for the exact "
            f"log-sigmoid), got {d.kd_log_eps!r}."
        )
    taps = list(d.taps)
    known = create_model(config.model).tap_names
    if d.method in MATCHING_MAPS and (not taps or any(t not in known for t in taps)):
        raise ConfigError(f"config.distill.taps must be a non-empty subset of {list(known)}, got {taps}.")
    cache = d.get("teacher_cache", 0)
    if not isinstance(cache, int) or cache < 0:
        raise ConfigError(
            f"config.distill.teacher_cache must be an integer >= 0 (0: the live teacher), got {cache!r}."
        )
    _validate_teacher_access(config, choices)
    if d.get("teacher_cache_dtype", "bfloat16") not in CACHE_DTYPES:
        raise ConfigError(
            f"unknown config.distill.teacher_cache_dtype {d.teacher_cache_dtype!r}; "
            f"choose one of {list(CACHE_DTYPES)}."
        )
    if not d.teacher_workdir:
        raise ConfigError(
            "config.distill.teacher_workdir is empty; set it to the --workdir of a trained teacher."
        )


def _validate_teacher_access(config: ml_collections.ConfigDict, choices: tuple[str, ...]) -> None:
    """``distill.teacher_access`` against the method (a black-box teacher has no taps to read, a tap method
    needs them) and the black-box map's settings (``distill.blackbox``)."""
    d = config.distill
    access = d.get("teacher_access", "full")
    if access not in TEACHER_ACCESS:
        raise ConfigError(
            f"unknown config.distill.teacher_access {access!r}; choose one of {list(TEACHER_ACCESS)}."
        )
    spec = MATCHING_MAPS.get(d.method)
    if spec is None:
        return  # kd / naive read the teacher's logits only: either access works
    if spec.teacher_access != access:
        fitting = [m for m in choices if m not in MATCHING_MAPS or MATCHING_MAPS[m].teacher_access == access]
        if access == "blackbox":
            raise ConfigError(
                f"method {d.method!r} reads the teacher's intermediate activations and gradients, which a "
                f"black-box teacher (config.distill.teacher_access='blackbox') does not give; choose one of "
                f"{fitting}."
            )
        raise ConfigError(
            f"method {d.method!r} matches a black-box teacher's RISE or occlusion map; set "
            f"config.distill.teacher_access='blackbox', or choose one of {fitting}."
        )
    if access != "blackbox":
        return
    if not d.get("teacher_cache", 0):
        raise ConfigError(
            f"method {d.method!r} reads the black-box teacher's maps from the teacher cache, computed once "
            "before training; set config.distill.teacher_cache to the number of augmentation draws (e.g. 1)."
        )
    b = d.get("blackbox")
    if b is None:
        raise ConfigError(
            "a black-box teacher needs a config.distill.blackbox block; start from configs/vgg16_kd.py."
        )
    if b.map not in TEACHER_MAPS:
        raise ConfigError(
            f"unknown config.distill.blackbox.map {b.map!r}; choose one of {list(TEACHER_MAPS)}."
        )
    size = b.size
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= config.data.image_size:
        raise ConfigError(
            f"config.distill.blackbox.size must be an integer in [1, {config.data.image_size}] (the image "
            f"size), got {size!r}."
        )
    options = blackbox_options(d)
    if b.map == "occlusion":
        occlusion_corners(config.data.image_size, *occlusion_patch(options, *(config.data.image_size,) * 2))
