"""Tests of the synthetic attribution benchmark (apjax.data.synthetic)."""

import colorsys
import dataclasses
import itertools
import math

import numpy as np
import pytest

from apjax.data import synthetic, synthetic_shapes
from apjax.data.synthetic import (
    CLASS_NAMES,
    MIN_INTERIOR_PIXELS,
    MIN_VISIBLE_PIXELS,
    N_FAMILIES,
    SPLITS,
    SyntheticConfig,
    generate_batch,
    generate_example,
)

CONFIGS = [
    SyntheticConfig(image_size=64),
    SyntheticConfig(image_size=48, num_classes=5, min_objects=2, max_objects=5, seed=3),
    SyntheticConfig(
        image_size=80, num_classes=N_FAMILIES, min_objects=3, max_objects=8, num_distractors=6, seed=11
    ),
    SyntheticConfig(image_size=16, min_objects=4, max_objects=4, seed=5),
]


def _expected_premask(instances, size):
    """Class of the topmost instance at each pixel (0 where none), from the regions alone."""
    premask = np.zeros((size, size), dtype=np.int64)
    for inst in instances:
        premask = np.where(inst["region"], inst["class_id"], premask)
    return premask


def _expected_void(premask):
    """Object pixels with a 4-neighbour inside the image of a different pre-void value."""
    padded = np.pad(premask, 1, mode="edge")  # edge padding: the image border is no boundary
    centre = padded[1:-1, 1:-1]
    differs = np.zeros(premask.shape, dtype=bool)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        neighbour = padded[1 + dy : 1 + dy + premask.shape[0], 1 + dx : 1 + dx + premask.shape[1]]
        differs |= neighbour != centre
    return differs & (premask > 0)


def _expected_cue(class_id, size, phase):
    theta, cycles, tint = synthetic.context_cue_params(class_id)
    c = np.arange(size, dtype=np.float64) + 0.5
    y, x = np.meshgrid(c, c, indexing="ij")
    grating = np.sin(2 * np.pi * cycles * (x * np.cos(theta) + y * np.sin(theta)) / size + phase)
    tint = tint.astype(np.float64)
    return synthetic.CUE_AMPLITUDE * grating[..., None] * tint + synthetic.CUE_TINT * (tint - tint.mean())


def test_constants():
    assert N_FAMILIES >= 20
    assert len(CLASS_NAMES) == N_FAMILIES == len(set(CLASS_NAMES))
    assert SPLITS == ("train", "val", "segmentation_val")
    assert SyntheticConfig().num_classes == 20


def test_families_fit_unit_box_and_differ():
    c = np.linspace(-1.3, 1.3, 261)
    v, u = np.meshgrid(c, c, indexing="ij")
    inside_box = (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    regions = []
    for name, inside in synthetic_shapes.FAMILIES:
        region = inside(u, v)
        # the bounding box of an instance is that of [-1, 1]^2: nothing may stick out of it
        assert not (region & ~inside_box).any(), name
        assert region.mean() > 0.05, name
        regions.append(region)
    for (a, ra), (b, rb) in itertools.combinations(zip(CLASS_NAMES, regions, strict=True), 2):
        iou = (ra & rb).sum() / (ra | rb).sum()
        assert iou < 0.9, (a, b, iou)


def test_example_types_and_values():
    cfg = SyntheticConfig(image_size=48)
    ex = generate_example(cfg, "train", 42)
    assert set(ex) == {"image", "mask", "labels", "image_id"}
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (48, 48, 3)
    assert ex["mask"].dtype == np.uint8 and ex["mask"].shape == (48, 48)
    assert ex["labels"].dtype == np.uint8 and ex["labels"].shape == (20,)
    assert ex["image_id"] == "train_000042"
    assert generate_example(cfg, "segmentation_val", 7)["image_id"] == "segmentation_val_000007"
    for i in range(20):
        ex = generate_example(cfg, "val", i)
        values = set(np.unique(ex["mask"]).tolist())
        assert values <= set(range(21)) | {255}
        assert set(np.unique(ex["labels"]).tolist()) <= {0, 1}


def test_determinism():
    cfg = SyntheticConfig(image_size=48, context_prob=0.5, context_noise=0.5)
    a = generate_example(cfg, "train", 5)
    b = generate_example(dataclasses.replace(cfg), "train", 5)
    for key in ("image", "mask", "labels"):
        assert a[key].tobytes() == b[key].tobytes()
    assert a["image_id"] == b["image_id"]
    others = [
        generate_example(cfg, "train", 6),
        generate_example(cfg, "val", 5),
        generate_example(cfg, "segmentation_val", 5),
        generate_example(dataclasses.replace(cfg, seed=1), "train", 5),
    ]
    for other in others:
        assert not np.array_equal(a["image"], other["image"])
    images = [generate_example(cfg, "train", i)["image"].tobytes() for i in range(30)]
    assert len(set(images)) == 30


def test_batch_matches_examples():
    cfg = SyntheticConfig(image_size=32, num_classes=7, max_objects=3)
    batch = generate_batch(cfg, "val", [3, 0, 9])
    assert batch["image"].shape == (3, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["mask"].shape == (3, 32, 32) and batch["labels"].shape == (3, 7)
    assert batch["image_id"] == ["val_000003", "val_000000", "val_000009"]
    for row, index in enumerate([3, 0, 9]):
        ex = generate_example(cfg, "val", index)
        for key in ("image", "mask", "labels"):
            np.testing.assert_array_equal(batch[key][row], ex[key])
    empty = generate_batch(cfg, "val", [])
    assert empty["image"].shape == (0, 32, 32, 3) and empty["image_id"] == []


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.image_size}px")
def test_mask_is_exactly_the_drawn_objects(cfg):
    size, k = cfg.image_size, cfg.num_classes
    occluded = 0
    for index in range(25):
        ex = generate_example(cfg, "train", index, return_instances=True)
        instances, mask, labels = ex["instances"], ex["mask"], ex["labels"]
        classes = [inst["class_id"] for inst in instances]
        assert len(set(classes)) == len(classes)  # distinct classes per image
        assert all(1 <= c <= k for c in classes)
        premask = _expected_premask(instances, size)
        # mask (ignoring void) is the class of the topmost instance, background elsewhere
        keep = mask != 255
        np.testing.assert_array_equal(mask[keep], premask[keep])
        # void is exactly the documented band
        np.testing.assert_array_equal(mask == 255, _expected_void(premask))
        # labels agree exactly with the classes in the mask
        present = set(np.unique(premask).tolist()) - {0}
        assert present == set(classes)
        assert set((np.flatnonzero(labels) + 1).tolist()) == present
        assert cfg.min_objects <= labels.sum() <= cfg.max_objects
        for c in present:
            assert (premask == c).sum() >= MIN_VISIBLE_PIXELS
            assert (mask == c).sum() >= MIN_INTERIOR_PIXELS  # interior, non-void pixels
        # distractors stay background
        for d in ex["distractors"]:
            assert d["region"].any()
            assert (mask[d["region"] & (premask == 0)] == 0).all()
        for i, inst in enumerate(instances):
            visible = (premask == inst["class_id"]).sum()
            occluded += visible < inst["region"].sum()
            assert i == len(instances) - 1 or visible <= inst["region"].sum()
    assert occluded > 0  # occlusion really happens


def test_regions_match_analytic_shapes():
    cfg = SyntheticConfig(image_size=64, num_classes=N_FAMILIES, max_objects=6)
    c = np.arange(64, dtype=np.float64) + 0.5
    y, x = np.meshgrid(c, c, indexing="ij")
    for index in range(15):
        for inst in generate_example(cfg, "val", index, return_instances=True)["instances"]:
            cy, cx = inst["center"]
            hx, hy = inst["half_axes"]
            rot = inst["rotation"]
            dx, dy = x - cx, y - cy
            u = (dx * math.cos(rot) + dy * math.sin(rot)) / hx
            v = (dy * math.cos(rot) - dx * math.sin(rot)) / hy
            expected = synthetic_shapes.FAMILIES[inst["class_id"] - 1][1](u, v)
            assert CLASS_NAMES[inst["class_id"] - 1] == inst["family"]
            # float32 vs float64 may flip a pixel whose centre lies on the boundary
            assert (expected != inst["region"]).sum() <= 2


def test_context_cue():
    size = 64
    base = SyntheticConfig(image_size=size, num_distractors=2, seed=2)
    cued = dataclasses.replace(base, context_prob=1.0)
    checked = 0
    for index in range(12):
        off = generate_example(base, "train", index, return_instances=True)
        on = generate_example(cued, "train", index, return_instances=True)
        assert off["context_class"] == 0
        np.testing.assert_array_equal(off["mask"], on["mask"])
        np.testing.assert_array_equal(off["labels"], on["labels"])
        cls = on["context_class"]
        assert on["labels"][cls - 1] == 1  # the cue belongs to a class in the image
        covered = off["mask"] > 0
        for d in on["distractors"]:
            covered |= d["region"]
        diff = on["image"].astype(np.int64) - off["image"].astype(np.int64)
        assert (diff[covered] == 0).all()  # objects and distractors are painted over the cue
        expected = _expected_cue(cls, size, on["context_phase"])
        bg = ~covered
        unclipped = bg[..., None] & (off["image"] > 0) & (off["image"] < 255)
        unclipped &= (on["image"] > 0) & (on["image"] < 255)
        assert unclipped.sum() > 0.2 * size * size
        assert np.abs(diff - expected)[unclipped].max() <= 1.0 + 1e-6
        # a cue of another class would not fit
        other = _expected_cue(cls % N_FAMILIES + 1, size, on["context_phase"])
        assert np.abs(diff - other)[unclipped].max() > 5.0
        checked += 1
    assert checked == 12


def test_context_noise_gives_cue_without_class():
    cfg = SyntheticConfig(image_size=32, context_noise=1.0, num_classes=10, max_objects=3)
    for index in range(10):
        ex = generate_example(cfg, "val", index, return_instances=True)
        assert ex["context_class"] > 0
        assert ex["labels"][ex["context_class"] - 1] == 0
    half = SyntheticConfig(image_size=32, context_prob=0.5)
    cues = [generate_example(half, "val", i, return_instances=True)["context_class"] for i in range(60)]
    assert 10 < sum(c > 0 for c in cues) < 50


def test_colour_does_not_identify_class():
    cfg = SyntheticConfig(image_size=48, num_distractors=0)
    hues, classes = [], []
    index = 0
    while len(hues) < 240:
        ex = generate_example(cfg, "train", index)
        index += 1
        for c in np.flatnonzero(ex["labels"]) + 1:
            rgb = ex["image"][ex["mask"] == c].mean(axis=0) / 255.0
            hues.append(colorsys.rgb_to_hsv(*rgb)[0])
            classes.append(c)
    hues, classes = np.array(hues), np.array(classes)
    angles = np.exp(2j * np.pi * hues)
    means = {c: np.angle(angles[classes == c].mean()) / (2 * np.pi) % 1.0 for c in np.unique(classes)}

    def circ_dist(a, b):
        d = np.abs(a - b) % 1.0
        return np.minimum(d, 1.0 - d)

    # a nearest-mean-hue classifier, fitted on the very same instances, still fails
    keys = np.array(sorted(means))
    dists = np.stack([circ_dist(hues, means[c]) for c in keys], axis=1)
    accuracy = (keys[dists.argmin(axis=1)] == classes).mean()
    assert accuracy < 0.4, accuracy
    # the hue spreads (+-1 circular std around the class mean) overlap for many class pairs
    spread = {c: np.sqrt(-2 * np.log(np.abs(angles[classes == c].mean()))) / (2 * np.pi) for c in keys}
    overlapping = sum(
        circ_dist(means[a], means[b]) < spread[a] + spread[b] for a, b in itertools.combinations(keys, 2)
    )
    assert overlapping >= 40, overlapping


def test_shapes_scale_with_image_size():
    fractions = []
    for size in (32, 96):
        cfg = SyntheticConfig(image_size=size, seed=4)
        masks = generate_batch(cfg, "train", range(30))["mask"]
        fractions.append((masks > 0).mean())
    assert 0.7 < fractions[0] / fractions[1] < 1.4


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"num_classes": 30}, "exceeds the 24 shape families"),
        ({"num_classes": 0}, "num_classes=0"),
        ({"image_size": 8}, "image_size=8"),
        ({"image_size": 64.0}, "must be an integer"),
        ({"min_objects": 3, "max_objects": 2}, "min_objects=3 is larger than max_objects=2"),
        ({"min_objects": 0}, "min_objects=0"),
        ({"max_objects": 6, "num_classes": 5}, "max_objects=6 exceeds num_classes=5"),
        ({"min_objects": 5, "max_objects": 5, "image_size": 16}, "image_size // 4 = 4"),
        ({"num_distractors": -1}, "num_distractors=-1"),
        ({"context_prob": 1.5}, "context_prob=1.5 is not a probability"),
        ({"context_noise": -0.1}, "context_noise=-0.1 is not a probability"),
        ({"seed": -2}, "seed=-2"),
    ],
)
def test_impossible_settings_raise(kwargs, fragment):
    cfg = SyntheticConfig(**kwargs)
    with pytest.raises(ValueError, match="^.*$") as err:
        cfg.validate()
    message = str(err.value)
    assert fragment in message
    assert message.endswith(".") and ". " not in message  # one sentence
    with pytest.raises(ValueError):
        generate_example(cfg, "train", 0)


def test_bad_split_or_index_raise():
    cfg = SyntheticConfig(image_size=32)
    with pytest.raises(ValueError, match="split='test'"):
        generate_example(cfg, "test", 0)
    with pytest.raises(ValueError, match="index=-1"):
        generate_example(cfg, "train", -1)
    with pytest.raises(ValueError, match="index=-1"):
        generate_batch(cfg, "train", [0, -1])
