"""Tests for apjax.data.augment: crop statistics, resampling exactness, batches and jit."""

from __future__ import annotations

import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from apjax.data import augment

# Jitted entry points (one compile per shape instead of op-by-op dispatch keeps the tests fast).
_sample_boxes = jax.jit(augment.sample_crop_boxes, static_argnames=("scale", "ratio", "tries"))
_crop_resize = jax.jit(augment.crop_resize, static_argnames=("out_size",))
_train = jax.jit(augment.train_augment, static_argnames=("out_size", "dtype"))
_eval = jax.jit(augment.eval_preprocess, static_argnames=("out_size", "dtype"))
_normalize = jax.jit(augment.normalize)

# ---------------------------------------------------------------------------------------------
# 1. RandomResizedCrop box statistics against an independent scalar implementation of the rule.
# ---------------------------------------------------------------------------------------------

N_BOXES = 20_000
KS_P_MIN = 1e-4  # per-statistic threshold; a correct rule passes, the broken ones fail by far
Z_MAX = 4.0  # two-proportion z-test bound for the fallback rate
STAT_SIZES = [(50, 400), (256, 256), (9, 12), (480, 360)]


def _ref_box(rng, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), rounding=round, fallback=True):
    """torchvision RandomResizedCrop.get_params, one box, plain Python."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(rounding(math.sqrt(target_area * aspect)))
        h = int(rounding(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)  # inclusive bounds: uniform in [0, H - h]
            left = rng.randint(0, width - w)
            return top, left, h, w
    if not fallback:
        return 0, 0, height, width
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _ref_boxes(n, height, width, seed, **kwargs):
    rng = random.Random(seed)
    return np.array([_ref_box(rng, height, width, **kwargs) for _ in range(n)], dtype=np.int64)


def _centre_box(height, width, ratio=(3 / 4, 4 / 3)):
    return _ref_box(random.Random(0), height, width, scale=(0.0, 0.0), ratio=ratio)


def _box_stats(boxes, height, width):
    boxes = np.asarray(boxes, dtype=np.int64)
    top, left, h, w = boxes.T.astype(np.float64)
    is_fallback = np.all(boxes == np.array(_centre_box(height, width)), axis=1)
    movable_y = h < height
    movable_x = w < width
    return {
        "area": h * w / (height * width),
        "log_aspect": np.log(w / h),
        "top": top[movable_y] / (height - h[movable_y]),
        "left": left[movable_x] / (width - w[movable_x]),
        "fallback": is_fallback.mean(),
    }


def _compare_box_stats(ref, cand, height, width):
    """Names of the statistics whose distributions differ between two box samples."""
    s_ref, s_cand = _box_stats(ref, height, width), _box_stats(cand, height, width)
    failures = []
    for name in ("area", "log_aspect", "top", "left"):
        a, b = s_ref[name], s_cand[name]
        if len(a) < 50 or len(b) < 50:  # e.g. H=50, W=400 always uses the full height
            if abs(len(a) - len(b)) > 0.05 * len(ref):
                failures.append(f"{name}: {len(a)} vs {len(b)} samples")
            continue
        p = stats.ks_2samp(a, b).pvalue
        if p < KS_P_MIN:
            failures.append(f"{name}: KS p={p:.2e}")
    p1, p2 = s_ref["fallback"], s_cand["fallback"]
    pooled = (p1 + p2) / 2
    se = math.sqrt(max(pooled * (1 - pooled), 1e-12) * 2 / len(ref))
    if abs(p1 - p2) / se > Z_MAX:
        failures.append(f"fallback rate {p1:.4f} vs {p2:.4f}")
    return failures


def _jax_boxes(n, height, width, seed, **kwargs):
    sizes = jnp.tile(jnp.array([[height, width]], jnp.int32), (n, 1))
    return np.asarray(_sample_boxes(jax.random.key(seed), sizes, **kwargs))


@pytest.mark.parametrize("height,width", STAT_SIZES)
def test_crop_statistics_match_torchvision_rule(height, width):
    ref = _ref_boxes(N_BOXES, height, width, seed=1234 + height)
    got = _jax_boxes(N_BOXES, height, width, seed=height * 1000 + width)
    assert got.dtype == np.int32 and got.shape == (N_BOXES, 4)
    assert _compare_box_stats(ref, got, height, width) == []


@pytest.mark.parametrize(
    "broken",
    [
        {"scale": (0.2, 1.0)},
        {"rounding": math.floor},  # truncation instead of rounding
        {"fallback": False},
    ],
    ids=["scale", "truncate", "no-fallback"],
)
def test_crop_statistics_detect_wrong_rules(broken):
    """The comparison above has the power to reject plausible mistakes."""
    failures = []
    for height, width in STAT_SIZES:
        ref = _ref_boxes(N_BOXES // 2, height, width, seed=1)
        wrong = _ref_boxes(N_BOXES // 2, height, width, seed=2, **broken)
        failures += _compare_box_stats(ref, wrong, height, width)
    assert failures


@pytest.mark.parametrize(
    "height,width", [(1, 1), (1, 1000), (1000, 1), (2, 3), (50, 400), (400, 50), (333, 500)]
)
def test_boxes_inside_image(height, width):
    boxes = _jax_boxes(2000, height, width, seed=7)
    top, left, h, w = boxes.T
    assert np.all(h >= 1) and np.all(w >= 1)
    assert np.all(top >= 0) and np.all(left >= 0)
    assert np.all(top + h <= height) and np.all(left + w <= width)


def test_boxes_mixed_sizes_in_one_batch():
    rng = np.random.default_rng(0)
    sizes = np.stack([rng.integers(1, 600, 4096), rng.integers(1, 600, 4096)], axis=1)
    boxes = np.asarray(_sample_boxes(jax.random.key(3), jnp.asarray(sizes, jnp.int32)))
    top, left, h, w = boxes.T
    assert np.all((h >= 1) & (w >= 1) & (top >= 0) & (left >= 0))
    assert np.all((top + h <= sizes[:, 0]) & (left + w <= sizes[:, 1]))


@pytest.mark.parametrize("height,width", [(50, 400), (400, 50), (300, 301)])
def test_fallback_is_exact_centre_crop(height, width):
    # With the whole area and an extreme aspect no try can be valid: always the fallback.
    boxes = _jax_boxes(16, height, width, seed=0, scale=(1.0, 1.0), ratio=(3 / 4, 3 / 4))
    expected = _ref_box(random.Random(0), height, width, scale=(1.0, 1.0), ratio=(3 / 4, 3 / 4))
    if (height, width) == (50, 400):
        assert expected == (0, 181, 50, 38)  # round(37.5) == 38
    np.testing.assert_array_equal(boxes, np.tile(np.array(expected), (16, 1)))
    # Default ratio on a very wide image: h = H, w = round(H * 4 / 3).
    assert _centre_box(50, 400) == (0, 166, 50, 67)


@pytest.mark.parametrize("side,expected", [(10, 2), (14, 4)])
def test_rounding_is_half_to_even(side, expected):
    # target area = side^2 / 16 -> sqrt = 2.5 (-> 2) or 3.5 (-> 4), as Python's round.
    assert round(math.sqrt(side * side / 16)) == expected
    boxes = _jax_boxes(64, side, side, seed=0, scale=(1 / 16, 1 / 16), ratio=(1.0, 1.0))
    assert np.all(boxes[:, 2] == expected) and np.all(boxes[:, 3] == expected)
    assert set(boxes[:, 0].tolist()) == set(range(side - expected + 1))  # all positions used


# ---------------------------------------------------------------------------------------------
# 2-3. crop_resize against a float64 per-pixel implementation of the filter definition.
# ---------------------------------------------------------------------------------------------


def _ref_axis_weights(start, length, in_size, out_size, i):
    """Normalised triangle weights of the source pixels for output pixel i (float64)."""
    step = length / out_size
    support = max(step, 1.0)
    centre = start + (i + 0.5) * step
    src = np.arange(in_size) + 0.5
    weights = np.maximum(0.0, 1.0 - np.abs(src - centre) / support)
    return weights / weights.sum()


def _ref_crop_resize(image, box, size, out_size, flip=False):
    s_h, s_w, chans = image.shape
    top, left, h, w = box
    big_h, big_w = size
    y0, box_h = top * s_h / big_h, h * s_h / big_h
    x0, box_w = left * s_w / big_w, w * s_w / big_w
    img = image.astype(np.float64)
    out = np.zeros((out_size, out_size, chans))
    for i in range(out_size):
        wy = _ref_axis_weights(y0, box_h, s_h, out_size, i)
        for p in range(out_size):
            q = out_size - 1 - p if flip else p
            wx = _ref_axis_weights(x0, box_w, s_w, out_size, q)
            out[i, p] = np.einsum("h,w,hwc->c", wy, wx, img)
    return out


RESAMPLE_CASES = [
    # (box (top, left, h, w) in original pixels, out_size, flip); original size (30, 45), S=16
    ((0, 0, 30, 45), 16, False),  # identity geometry
    ((0, 0, 30, 45), 11, True),  # whole image, downscale, flipped
    ((5, 7, 6, 9), 20, False),  # strong upscale
    ((2, 3, 28, 40), 5, False),  # strong downscale (antialiased)
    ((0, 10, 30, 4), 8, True),  # down in y, up in x, flipped
    ((29, 44, 1, 1), 3, False),  # one-pixel box in the corner
]


@pytest.mark.parametrize("box,out_size,flip", RESAMPLE_CASES)
def test_crop_resize_matches_float64_reference(box, out_size, flip):
    rng = np.random.default_rng(0)
    size = (30, 45)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    other = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    images = jnp.asarray(np.stack([image, other]))
    boxes = jnp.asarray([box, (0, 0, 30, 45)], jnp.int32)
    sizes = jnp.asarray([size, size], jnp.int32)
    flips = jnp.asarray([flip, False])
    got = _crop_resize(images, boxes, sizes, jnp.full((2, 2), 16, jnp.int32), out_size, flips)
    assert got.shape == (2, out_size, out_size, 3) and got.dtype == jnp.float32
    expected = _ref_crop_resize(image, box, size, out_size, flip)
    np.testing.assert_allclose(np.asarray(got[0]), expected, atol=1e-3, rtol=0)
    expected_other = _ref_crop_resize(other, (0, 0, 30, 45), size, out_size)
    np.testing.assert_allclose(np.asarray(got[1]), expected_other, atol=1e-3, rtol=0)


@pytest.mark.parametrize("box,out_size,flip", RESAMPLE_CASES)
def test_crop_resize_matches_pil_box_resize(box, out_size, flip):
    """PIL's Image.resize(box=...) on float images implements the same (antialiased) filter."""
    image_mod = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(1)
    size = (30, 45)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    got = _crop_resize(
        jnp.asarray(image[None]),
        jnp.asarray([box]),
        jnp.asarray([size]),
        jnp.asarray([(16, 16)]),
        out_size,
        jnp.asarray([flip]),
    )
    top, left, h, w = box
    pil_box = (left * 16 / 45, top * 16 / 30, (left + w) * 16 / 45, (top + h) * 16 / 30)
    channels = []
    for c in range(3):
        pil = image_mod.fromarray(image[:, :, c].astype(np.float32))
        res = pil.resize((out_size, out_size), image_mod.Resampling.BILINEAR, box=pil_box)
        channels.append(np.asarray(res, dtype=np.float64))
    expected = np.stack(channels, axis=-1)
    if flip:
        expected = expected[:, ::-1]
    np.testing.assert_allclose(np.asarray(got[0]), expected, atol=1e-3, rtol=0)


def test_identity_box_is_exact_and_flip_reverses_columns():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    sizes = jnp.asarray([(333, 500), (16, 16), (7, 1000)], jnp.int32)
    boxes = jnp.concatenate([jnp.zeros((3, 2), jnp.int32), sizes], axis=1)
    full = jnp.full((3, 2), 16, jnp.int32)
    plain = _crop_resize(jnp.asarray(images), boxes, sizes, full, 16)
    np.testing.assert_allclose(np.asarray(plain), images.astype(np.float32), atol=1e-4, rtol=0)
    flipped = _crop_resize(jnp.asarray(images), boxes, sizes, full, 16, jnp.ones(3, bool))
    np.testing.assert_allclose(np.asarray(flipped), images[:, :, ::-1].astype(np.float32), atol=1e-4, rtol=0)
    # And a flip of any box is the exact column reversal of the unflipped result.
    boxes = jnp.asarray([(10, 20, 100, 300), (1, 2, 9, 5), (0, 100, 7, 30)], jnp.int32)
    a = _crop_resize(jnp.asarray(images), boxes, sizes, full, 12)
    b = _crop_resize(jnp.asarray(images), boxes, sizes, full, 12, jnp.asarray([True, False, True]))
    np.testing.assert_array_equal(np.asarray(b[0]), np.asarray(a[0])[:, ::-1])
    np.testing.assert_array_equal(np.asarray(b[1]), np.asarray(a[1]))
    np.testing.assert_array_equal(np.asarray(b[2]), np.asarray(a[2])[:, ::-1])


def test_crop_resize_range_on_extreme_images():
    images = jnp.asarray(np.stack([np.zeros((8, 8, 3)), np.full((8, 8, 3), 255)]), jnp.uint8)
    sizes = jnp.asarray([(20, 30), (20, 30)], jnp.int32)
    boxes = jnp.asarray([(3, 4, 10, 7), (0, 0, 20, 30)], jnp.int32)
    out = np.asarray(_crop_resize(images, boxes, sizes, jnp.full((2, 2), 8, jnp.int32), 13))
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_allclose(out[1], 255.0, atol=1e-4)
    assert out.max() <= 255.0


# ---------------------------------------------------------------------------------------------
# 3b. The default layout: images at their original resolution in padded slots, resized ONCE.
# Expectations are PIL's resize of the ORIGINAL image; the slot padding holds garbage that must never
# reach an output.
# ---------------------------------------------------------------------------------------------

ORIGINALS = [(37, 53), (53, 29), (21, 21)]  # (H, W): odd sides, so NEAREST never meets a tie below
SLOT = 60
GARBAGE = 99  # mask padding value, absent from the original masks


def _padded(rng, values, channels=(3,), garbage=None):
    """Originals of ORIGINALS' sizes drawn from ``values``, and their (B, SLOT, SLOT, ...) slots whose
    padding is random (or ``garbage``)."""
    originals = [rng.choice(values, (h, w, *channels)).astype(np.uint8) for h, w in ORIGINALS]
    shape = (len(ORIGINALS), SLOT, SLOT, *channels)
    slots = (
        rng.integers(0, 256, shape, dtype=np.uint8) if garbage is None else np.full(shape, garbage, np.uint8)
    )
    for i, o in enumerate(originals):
        slots[i, : o.shape[0], : o.shape[1]] = o
    return originals, slots


def _pil_bilinear(original, out_size, box=None):
    """PIL's antialiased BILINEAR resize of each channel of ``original`` (float 'F' images: no rounding)."""
    import PIL.Image

    channels = [
        PIL.Image.fromarray(original[..., c].astype(np.float32)).resize(
            (out_size, out_size), PIL.Image.Resampling.BILINEAR, box=box
        )
        for c in range(original.shape[2])
    ]
    return np.stack([np.asarray(c, np.float64) for c in channels], axis=-1)


@pytest.mark.parametrize("out_size,flip", [(9, False), (9, True), (24, False)])
def test_original_resolution_crop_is_pil_resize_of_the_original(out_size, flip):
    rng = np.random.default_rng(4)
    originals, slots = _padded(rng, np.arange(256))
    # Boxes touching the bottom / right edges, where a downscaling filter reaches past the image into
    # the padding; (top, left, h, w) in original pixels.
    boxes = [(10, 20, 27, 33), (0, 0, 53, 29), (15, 15, 6, 6)]
    sizes = jnp.asarray(ORIGINALS, jnp.int32)
    flips = jnp.full((3,), flip)
    got = np.asarray(_crop_resize(jnp.asarray(slots), jnp.asarray(boxes), sizes, sizes, out_size, flips))
    for i, (top, left, h, w) in enumerate(boxes):
        expected = _pil_bilinear(originals[i], out_size, box=(left, top, left + w, top + h))
        expected = expected[:, ::-1] if flip else expected
        np.testing.assert_allclose(got[i], expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("out_size", [8, 24, 64])
def test_original_resolution_eval_image_is_pil_resize_of_the_original(out_size):
    rng = np.random.default_rng(5)
    originals, slots = _padded(rng, np.arange(256))
    got = np.asarray(_eval(jnp.asarray(slots), jnp.asarray(ORIGINALS), out_size=out_size))
    for i, original in enumerate(originals):
        expected = (_pil_bilinear(original, out_size) / 255.0 - MEAN) / STD
        np.testing.assert_allclose(got[i], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("out_size", [8, 24, 64])
def test_original_resolution_masks_are_pil_nearest_of_the_original(out_size):
    import PIL.Image

    rng = np.random.default_rng(6)
    originals, slots = _padded(rng, np.array([0, 1, 7, 20, 255]), channels=(), garbage=GARBAGE)
    got = np.asarray(augment.resize_masks_nearest(jnp.asarray(slots), jnp.asarray(ORIGINALS), out_size))
    assert got.shape == (3, out_size, out_size) and got.dtype == np.uint8 and GARBAGE not in got
    for i, original in enumerate(originals):
        # Odd sides and an even output: (i + 0.5) * H / out is never an integer, so PIL's float stepping
        # and the exact rule agree everywhere.
        expected = PIL.Image.fromarray(original).resize((out_size, out_size), PIL.Image.Resampling.NEAREST)
        np.testing.assert_array_equal(got[i], np.asarray(expected))


# ---------------------------------------------------------------------------------------------
# 4. Batches, dtypes, normalisation, determinism, eval and masks.
# ---------------------------------------------------------------------------------------------

MEAN = np.array(augment.MEAN)
STD = np.array(augment.STD)


def _batch(b=4, s=32, seed=0):
    """A squashed cache's batch: (images, original sizes, extents = the full slots)."""
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8))
    sizes = jnp.asarray(np.stack([rng.integers(20, 500, b), rng.integers(20, 500, b)], 1), jnp.int32)
    return images, sizes, jnp.full((b, 2), s, jnp.int32)


def test_normalize_values():
    x = jnp.asarray([[0.0, 0.0, 0.0], [255.0, 255.0, 255.0], [117.0, 111.0, 102.8]])
    got = np.asarray(augment.normalize(x))
    np.testing.assert_allclose(got[0], -MEAN / STD, rtol=1e-6)
    np.testing.assert_allclose(got[1], (1 - MEAN) / STD, rtol=1e-6)
    np.testing.assert_allclose(
        got[2], (np.array([117.0, 111.0, 102.8]) / 255 - MEAN) / STD, rtol=1e-5, atol=1e-6
    )
    assert augment.normalize(jnp.zeros((2, 5, 5, 3), jnp.uint8)).dtype == jnp.float32


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_train_augment_batch(dtype):
    images, sizes, extents = _batch()
    out = _train(jax.random.key(0), images, sizes, extents, out_size=24, dtype=dtype)
    assert out.shape == (4, 24, 24, 3) and out.dtype == dtype
    vals = np.asarray(out.astype(jnp.float32))
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert np.all(vals >= (-MEAN / STD) - tol) and np.all(vals <= (1 - MEAN) / STD + tol)
    again = _train(jax.random.key(0), images, sizes, extents, out_size=24, dtype=dtype)
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), np.asarray(again.astype(jnp.float32)))
    other = _train(jax.random.key(1), images, sizes, extents, out_size=24, dtype=dtype)
    assert not np.array_equal(np.asarray(out.astype(jnp.float32)), np.asarray(other.astype(jnp.float32)))


def test_train_augment_is_crop_resize_of_sampled_boxes_and_flips_half():
    images, sizes, extents = _batch(b=128, s=16)
    key = jax.random.key(5)
    out = np.asarray(_train(key, images, sizes, extents, out_size=8))
    k_box, _ = jax.random.split(key)
    boxes = _sample_boxes(k_box, sizes)
    plain = np.asarray(_normalize(_crop_resize(images, boxes, sizes, extents, 8)))
    is_plain = np.array([np.allclose(o, p, atol=1e-5) for o, p in zip(out, plain, strict=True)])
    is_flip = np.array([np.allclose(o, p[:, ::-1], atol=1e-5) for o, p in zip(out, plain, strict=True)])
    assert np.all(is_plain | is_flip)
    assert 64 - 23 < is_flip.sum() < 64 + 23  # binomial(128, 0.5): sd 5.7


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_eval_preprocess(dtype):
    images, _, extents = _batch(b=3, s=20)
    out = _eval(images, extents, out_size=12, dtype=dtype)
    assert out.shape == (3, 12, 12, 3) and out.dtype == dtype
    full = jnp.asarray([[0, 0, 20, 20]] * 3, jnp.int32)
    sizes = jnp.asarray([[20, 20]] * 3, jnp.int32)
    expected = _normalize(_crop_resize(images, full, sizes, sizes, 12)).astype(dtype)
    np.testing.assert_allclose(
        np.asarray(out.astype(jnp.float32)),
        np.asarray(expected.astype(jnp.float32)),
        atol=1e-5 if dtype == jnp.float32 else 1e-2,
    )
    ident = _eval(images, extents, out_size=20)
    np.testing.assert_allclose(np.asarray(ident), np.asarray(augment.normalize(images)), atol=1e-5)


@pytest.mark.parametrize("out_size", [7, 16, 29])
@pytest.mark.parametrize("trailing_channel", [False, True])
def test_resize_masks_nearest(out_size, trailing_channel):
    rng = np.random.default_rng(3)
    palette = np.array([0, 3, 7, 255], np.uint8)
    masks = palette[rng.integers(0, 4, (2, 16, 16))]
    masks[:, :4, :4] = 255
    arg = masks[..., None] if trailing_channel else masks
    out = augment.resize_masks_nearest(jnp.asarray(arg), jnp.full((2, 2), 16), out_size)
    assert out.shape == (2, out_size, out_size) and out.dtype == jnp.uint8
    out = np.asarray(out)
    assert set(np.unique(out).tolist()) <= set(np.unique(masks).tolist())
    assert 255 in out
    idx = np.floor((np.arange(out_size) + 0.5) * 16 / out_size).astype(int)
    np.testing.assert_array_equal(out, masks[:, idx][:, :, idx])
    # PIL's NEAREST steps the source position by repeated addition, so where (i + 0.5) * S / out
    # is an exact integer (a tie) it can land one pixel lower; compare everywhere else.
    image_mod = pytest.importorskip("PIL.Image")
    pos = (np.arange(out_size) + 0.5) * 16 / out_size
    keep = pos != np.round(pos)
    for b in range(2):
        pil = image_mod.fromarray(masks[b]).resize((out_size, out_size), image_mod.Resampling.NEAREST)
        np.testing.assert_array_equal(out[b][np.ix_(keep, keep)], np.asarray(pil)[np.ix_(keep, keep)])


# ---------------------------------------------------------------------------------------------
# 5. jit: one trace for many keys.
# ---------------------------------------------------------------------------------------------


def test_jit_traces_once():
    traces = []

    def counted(key, images, sizes, extents, out_size, dtype=jnp.float32):
        traces.append(out_size)
        return augment.train_augment(key, images, sizes, extents, out_size, dtype)

    images, sizes, extents = _batch(b=2, s=16)
    fn = jax.jit(counted, static_argnames=("out_size", "dtype"))
    a = fn(jax.random.key(0), images, sizes, extents, out_size=10)
    # Other sizes and extents (data, not shapes) reuse the trace too.
    fn(jax.random.key(0), images, sizes // 2 + 1, extents - 3, out_size=10)
    b = fn(jax.random.key(1), images, sizes, extents, out_size=10)
    assert len(traces) == 1
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(
        np.asarray(a),
        np.asarray(_train(jax.random.key(0), images, sizes, extents, out_size=10)),
        atol=1e-5,
    )

    # The same through a plain jax.jit of train_augment (its compilation cache is shared with the
    # other jitted wrappers of the function, so count the entries added by the second key).
    direct = jax.jit(augment.train_augment, static_argnames=("out_size", "dtype"))
    direct(jax.random.key(0), images, sizes, extents, out_size=10)
    if hasattr(direct, "_cache_size"):
        entries = direct._cache_size()
        direct(jax.random.key(1), images, sizes, extents, out_size=10)
        assert direct._cache_size() == entries
    masks = jnp.zeros((2, 16, 16), jnp.uint8)
    out = jax.jit(augment.resize_masks_nearest, static_argnames=("out_size",))(masks, extents, out_size=8)
    assert out.shape == (2, 8, 8)
