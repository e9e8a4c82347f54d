"""Tests for the PASCAL VOC 2012 tfds builder (apjax.data.voc) on a tiny fake VOCdevkit."""

from __future__ import annotations

import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apjax.data import voc

# id -> (width, height, PIL mode of the written JPEG)
IMAGES = {
    "2007_000001": (40, 50, "RGB"),
    "2007_000002": (48, 36, "RGB"),
    "2007_000003": (44, 40, "L"),
    "2007_000004": (50, 42, "CMYK"),
    "2007_000005": (38, 46, "RGB"),
    "2007_000006": (52, 40, "RGB"),
    "2007_000007": (40, 44, "RGB"),
}
# id -> list of (class name, difficult)
OBJECTS = {
    # "dog" is difficult and appears nowhere else in this image: it must still be labelled.
    "2007_000001": [("person", 0), ("dog", 1)],
    "2007_000002": [("car", 0), ("car", 0), ("bus", 0)],
    "2007_000003": [("cat", 0)],
    "2007_000004": [("aeroplane", 0), ("tvmonitor", 1)],
    "2007_000005": [("sheep", 0), ("cow", 0), ("horse", 0)],
    "2007_000006": [("bottle", 0)],
    "2007_000007": [("diningtable", 0), ("chair", 0), ("pottedplant", 1)],
}
TRAIN_IDS = ["2007_000001", "2007_000002", "2007_000003", "2007_000004"]
VAL_IDS = ["2007_000005", "2007_000006", "2007_000007"]
SEG_IDS = ["2007_000004", "2007_000005", "2007_000006"]


def _voc_palette() -> list[int]:
    """The standard VOC colour map (index 1 -> (128, 0, 0), ...)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def _custom_palette() -> list[int]:
    """A palette where no colour channel equals the index."""
    return [v for i in range(256) for v in ((i + 1) % 256, (i + 2) % 256, (i + 3) % 256)]


def _image_array(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth RGB image (JPEG-friendly)."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(1, 4, size=3)
    rgb = np.stack(
        [
            128 + 100 * np.sin(x / (5 * a)),
            128 + 100 * np.cos(y / (5 * b)),
            128 + 100 * np.sin((x + y) / (7 * c)),
        ],
        axis=-1,
    )
    return rgb.astype(np.uint8)


def _mask_array(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[5:30, 4:20] = rng.integers(1, 21)
    mask[12 : height - 3, 22 : width - 2] = rng.integers(1, 21)
    mask[20:25, 10:30] = 20
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 255  # void borders
    mask[5, 4:20] = 255
    return mask


def _xml(image_id: str, width: int, height: int) -> str:
    objects = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{difficult}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
        f"<xmax>{width}</xmax><ymax>{height}</ymax></bndbox></object>"
        for name, difficult in OBJECTS[image_id]
    )
    return (
        f"<annotation><folder>VOC2012</folder><filename>{image_id}.jpg</filename>"
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
        f"<segmented>0</segmented>{objects}</annotation>"
    )


def write_fake_voc(manual_dir: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Writes manual_dir/VOCdevkit/VOC2012; returns (VOC2012 path, {id: mask indices})."""
    root = manual_dir / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for k, (image_id, (w, h, mode)) in enumerate(IMAGES.items()):
        rgb = Image.fromarray(_image_array(w, h, k))
        img = rgb if mode == "RGB" else rgb.convert(mode)
        img.save(root / "JPEGImages" / f"{image_id}.jpg", format="JPEG", quality=90)
        (root / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, w, h))
    masks = {}
    for k, image_id in enumerate(SEG_IDS):
        w, h, _ = IMAGES[image_id]
        index = _mask_array(w, h, 100 + k)
        masks[image_id] = index
        path = root / "SegmentationClass" / f"{image_id}.png"
        if k == 2:
            Image.fromarray(index, mode="L").save(path)  # 'L' masks are accepted too
        else:
            png = Image.fromarray(index, mode="P")
            png.putpalette(_voc_palette() if k == 0 else _custom_palette())
            png.save(path)
    (root / "ImageSets/Main/train.txt").write_text("\n".join(TRAIN_IDS) + "\n")
    (root / "ImageSets/Main/val.txt").write_text("\n".join(VAL_IDS) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(SEG_IDS) + "\n")
    return root, masks


def _expected_labels(image_id: str) -> np.ndarray:
    labels = np.zeros(20, dtype=np.uint8)
    for name, _ in OBJECTS[image_id]:
        labels[voc.VOC_CLASSES.index(name)] = 1
    return labels


def _id(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _by_id(source) -> dict[str, dict]:
    return {_id(ex["image_id"]): ex for ex in (source[i] for i in range(len(source)))}


def _check_prepared(data_dir: Path, voc_root: Path, masks: dict[str, np.ndarray]) -> None:
    for split, ids in (("train", TRAIN_IDS), ("val", VAL_IDS), ("segmentation_val", SEG_IDS)):
        source = voc.load_voc_split(str(data_dir), split)
        assert len(source) == len(ids)
        examples = _by_id(source)
        assert sorted(examples) == sorted(ids)
        for image_id, ex in examples.items():
            w, h, mode = IMAGES[image_id]
            image = np.asarray(ex["image"])
            assert image.dtype == np.uint8 and image.shape == (h, w, 3)
            with Image.open(voc_root / "JPEGImages" / f"{image_id}.jpg") as src:
                reference = np.asarray(src.convert("RGB"))
            if mode == "RGB":
                # Bytes stored unchanged: identical to PIL's decode of the same file.
                np.testing.assert_array_equal(image, reference)
            else:
                # Converted + re-encoded: close to PIL's RGB conversion of the source.
                diff = np.abs(image.astype(np.int16) - reference.astype(np.int16))
                assert diff.mean() < 2.0, (image_id, diff.mean())
            labels = np.asarray(ex["labels"])
            assert labels.dtype == np.uint8 and labels.shape == (20,)
            np.testing.assert_array_equal(labels, _expected_labels(image_id))
            if split == "segmentation_val":
                mask = np.asarray(ex["mask"])
                assert mask.dtype == np.uint8 and mask.shape == (h, w, 1)
                np.testing.assert_array_equal(mask[..., 0], masks[image_id])
                assert (mask == 255).any()
            else:
                assert "mask" not in ex


def test_constants():
    assert len(voc.VOC_CLASSES) == 20
    assert voc.VOC_CLASSES[0] == "aeroplane" and voc.VOC_CLASSES[-1] == "tvmonitor"
    assert voc.VOC_CLASSES.index("diningtable") == 10
    assert voc.VOC_URL.endswith(voc.VOC_TAR_NAME)
    assert issubclass(voc.DatasetNotFoundError, FileNotFoundError)


def test_difficult_object_is_the_only_dog():
    # Guard on the fixture itself: the difficult "dog" is the only dog in image 1.
    names = [n for n, d in OBJECTS["2007_000001"] if not d]
    assert "dog" not in names and _expected_labels("2007_000001")[11] == 1


def test_round_trip_from_folder(tmp_path):
    data_dir = tmp_path / "data"
    voc_root, masks = write_fake_voc(data_dir / "downloads" / "manual")  # default manual dir
    voc.prepare_voc(str(data_dir))
    _check_prepared(data_dir, voc_root, masks)
    # Already prepared: a no-op, even once the source is gone.
    shutil.rmtree(data_dir / "downloads")
    voc.prepare_voc(str(data_dir))
    assert len(voc.load_voc_split(str(data_dir), "train")) == len(TRAIN_IDS)


def test_round_trip_from_tar(tmp_path):
    src = tmp_path / "src"
    voc_root, masks = write_fake_voc(src)
    manual = tmp_path / "manual"
    manual.mkdir()
    with tarfile.open(manual / voc.VOC_TAR_NAME, "w") as tar:
        tar.add(src / "VOCdevkit", arcname="VOCdevkit")
    data_dir = tmp_path / "data"
    voc.prepare_voc(str(data_dir), manual_dir=str(manual))
    _check_prepared(data_dir, voc_root, masks)
    # Nothing was extracted next to the tar.
    assert sorted(p.name for p in manual.iterdir()) == [voc.VOC_TAR_NAME]


def test_missing_manual_dir(tmp_path):
    data_dir = tmp_path / "data"
    manual = tmp_path / "nowhere"
    with pytest.raises(voc.DatasetNotFoundError) as err:
        voc.prepare_voc(str(data_dir), manual_dir=str(manual))
    msg = str(err.value)
    assert voc.VOC_URL in msg and str(manual.resolve() / voc.VOC_TAR_NAME) in msg
    # Default manual dir, existing but empty of VOC files.
    (data_dir / "downloads" / "manual").mkdir(parents=True)
    (data_dir / "downloads" / "manual" / "README").write_text("x")
    with pytest.raises(FileNotFoundError) as err:
        voc.prepare_voc(str(data_dir))
    expected = str((data_dir / "downloads" / "manual" / voc.VOC_TAR_NAME).resolve())
    assert voc.VOC_URL in str(err.value) and expected in str(err.value)
    assert not (data_dir / "apjax_voc2012").exists()


def test_load_before_prepare(tmp_path):
    with pytest.raises(voc.DatasetNotFoundError, match="prepare_voc.*data=synthetic"):
        voc.load_voc_split(str(tmp_path), "segmentation_val")
    with pytest.raises(ValueError, match="segmentation_val"):
        voc.load_voc_split(str(tmp_path), "test")


def _no_version_dir(data_dir: Path, config: str) -> bool:
    config_dir = data_dir / "apjax_voc2012" / config
    return not config_dir.exists() or not any(config_dir.iterdir())


def test_corrupt_jpeg_leaves_nothing_and_rerun_works(tmp_path):
    data_dir = tmp_path / "data"
    manual = tmp_path / "manual"
    voc_root, masks = write_fake_voc(manual)
    bad = voc_root / "JPEGImages" / "2007_000006.jpg"
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[: len(good_bytes) // 2])  # truncated JPEG
    with pytest.raises(ValueError) as err:
        voc.prepare_voc(str(data_dir), manual_dir=str(manual))
    assert str(bad) in str(err.value)
    assert _no_version_dir(data_dir, "classification")
    assert _no_version_dir(data_dir, "segmentation")
    # A second run, with the file fixed, starts over and succeeds.
    bad.write_bytes(good_bytes)
    voc.prepare_voc(str(data_dir), manual_dir=str(manual))
    _check_prepared(data_dir, voc_root, masks)


def test_mask_size_mismatch(tmp_path):
    data_dir = tmp_path / "data"
    manual = tmp_path / "manual"
    voc_root, _ = write_fake_voc(manual)
    mask_path = voc_root / "SegmentationClass" / "2007_000005.png"
    Image.fromarray(np.zeros((10, 12), np.uint8), mode="L").save(mask_path)
    with pytest.raises(ValueError) as err:
        voc.prepare_voc(str(data_dir), manual_dir=str(manual))
    msg = str(err.value)
    assert str(mask_path) in msg and str(voc_root / "JPEGImages" / "2007_000005.jpg") in msg
    assert _no_version_dir(data_dir, "segmentation")
    with pytest.raises(voc.DatasetNotFoundError):
        voc.load_voc_split(str(data_dir), "segmentation_val")


def test_bad_mask_mode_missing_xml_and_list(tmp_path):
    manual = tmp_path / "manual"
    voc_root, _ = write_fake_voc(manual)
    mask_path = voc_root / "SegmentationClass" / "2007_000004.png"
    Image.new("RGB", (50, 42)).save(mask_path)
    xml_path = voc_root / "Annotations" / "2007_000002.xml"
    xml_path.unlink()
    with pytest.raises(FileNotFoundError) as err:
        voc.prepare_voc(str(tmp_path / "d1"), manual_dir=str(manual))
    assert str(xml_path) in str(err.value)
    xml_path.write_text("<annotation><object><name>dog</name></annotation>")  # unparsable
    with pytest.raises(ValueError) as err:
        voc.prepare_voc(str(tmp_path / "d2"), manual_dir=str(manual))
    assert str(xml_path) in str(err.value)
    shutil.copy(voc_root / "Annotations" / "2007_000001.xml", xml_path)
    with pytest.raises(ValueError) as err:
        voc.prepare_voc(str(tmp_path / "d3"), manual_dir=str(manual))
    assert str(mask_path) in str(err.value) and "'RGB'" in str(err.value)
    list_path = voc_root / "ImageSets" / "Segmentation" / "val.txt"
    list_path.unlink()
    with pytest.raises(FileNotFoundError) as err:
        voc.prepare_voc(str(tmp_path / "d4"), manual_dir=str(manual))
    assert str(list_path) in str(err.value)


def test_tar_errors(tmp_path):
    src = tmp_path / "src"
    voc_root, _ = write_fake_voc(src)
    (voc_root / "ImageSets" / "Segmentation" / "val.txt").unlink()
    manual = tmp_path / "manual"
    manual.mkdir()
    tar_path = manual / voc.VOC_TAR_NAME
    with tarfile.open(tar_path, "w") as tar:
        tar.add(src / "VOCdevkit", arcname="VOCdevkit")
    with pytest.raises(voc.DatasetNotFoundError) as err:
        voc.prepare_voc(str(tmp_path / "d1"), manual_dir=str(manual))
    assert f"{tar_path}:VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt" in str(err.value)
    assert _no_version_dir(tmp_path / "d1", "segmentation")
    tar_path.write_bytes(b"not a tar" * 100)
    with pytest.raises(ValueError, match="not a readable tar archive"):
        voc.prepare_voc(str(tmp_path / "d2"), manual_dir=str(manual))


# --------------------------------------------------------------------------------------------
# Where the data may be, the command line, the host cache built from it, split_sizes.
# --------------------------------------------------------------------------------------------

FIXTURE_SIZES = {"train": len(TRAIN_IDS), "val": len(VAL_IDS), "segmentation_val": len(SEG_IDS)}


def _tar(src: Path, tar_path: Path) -> Path:
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, "w") as tar:
        tar.add(src / "VOCdevkit", arcname="VOCdevkit")
    return tar_path


@pytest.mark.parametrize("given", ["VOC2012", "VOCdevkit", "tar_file"])
def test_manual_dir_may_be_the_voc2012_folder_the_devkit_or_the_tar_itself(tmp_path, given):
    voc_root, masks = write_fake_voc(tmp_path / "src")
    manual = {
        "VOC2012": voc_root,
        "VOCdevkit": voc_root.parent,
        "tar_file": _tar(tmp_path / "src", tmp_path / "elsewhere" / "my_copy.tar"),  # any name
    }[given]
    data_dir = tmp_path / "data"
    assert voc.prepare_voc(str(data_dir), manual_dir=str(manual)) == FIXTURE_SIZES
    _check_prepared(data_dir, voc_root, masks)


def test_command_line_prepares_and_prints_the_split_sizes(tmp_path, capsys):
    from apjax.data import prepare

    write_fake_voc(tmp_path / "src")
    _tar(tmp_path / "src", tmp_path / "manual" / voc.VOC_TAR_NAME)
    data_dir = tmp_path / "data"
    argv = ["--manual_dir", str(tmp_path / "manual" / voc.VOC_TAR_NAME), "--data_dir", str(data_dir)]
    assert prepare.main(argv) == 0
    out = capsys.readouterr().out
    for split, n in FIXTURE_SIZES.items():
        assert re.search(rf"^\s+{split}\s+{n} images$", out, re.M), out
    assert len(voc.load_voc_split(str(data_dir), "segmentation_val")) == len(SEG_IDS)
    # A wrong place: exit status 1 and the one-sentence hint on stderr.
    assert prepare.main(["--manual_dir", str(tmp_path / "nowhere"), "--data_dir", str(tmp_path / "d2")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: PASCAL VOC 2012 was not found") and voc.VOC_URL in err


def test_cache_holds_the_original_pixels_and_eval_resizes_them_once(tmp_path):
    import jax.numpy as jnp
    from PIL import Image as PILImage

    from apjax.data import load_cached_split
    from apjax.data.augment import MEAN, STD, eval_preprocess
    from apjax.data.pipeline import eval_masks

    data_dir = tmp_path / "data"
    write_fake_voc(tmp_path / "manual")
    voc.prepare_voc(str(data_dir), manual_dir=str(tmp_path / "manual"))
    # val: 46x38, 40x52, 44x40 (H x W); the slot grows from 46 to 52 on the second image.
    for split in ("val", "segmentation_val"):
        source = _by_id(voc.load_voc_split(str(data_dir), split))
        cache = load_cached_split("voc", split, data_dir)
        originals = [np.asarray(source[i]["image"]) for i in cache.image_ids]
        assert cache.size == max(max(o.shape[:2]) for o in originals)
        for i, original in enumerate(originals):
            h, w = original.shape[:2]
            assert cache.sizes[i].tolist() == cache.extents[i].tolist() == [h, w]
            np.testing.assert_array_equal(cache.images[i, :h, :w], original)
            assert not cache.images[i, h:].any() and not cache.images[i, :, w:].any()
        # Eval images: the original resized once, as PIL does it.
        got = np.asarray(eval_preprocess(jnp.asarray(cache.images), jnp.asarray(cache.extents), out_size=16))
        for i, original in enumerate(originals):
            channels = [
                PILImage.fromarray(original[..., c].astype(np.float32)).resize((16, 16), PILImage.BILINEAR)
                for c in range(3)
            ]
            want = np.stack([np.asarray(c) for c in channels], -1) / 255.0
            np.testing.assert_allclose(got[i], (want - np.asarray(MEAN)) / np.asarray(STD), atol=1e-4)
    # Masks: the original mask resized once, NEAREST (even sides with out 16 never meet a PIL tie here).
    masks = eval_masks(cache, 16)
    for i, image_id in enumerate(cache.image_ids):
        original = np.asarray(source[image_id]["mask"])[..., 0]
        want = PILImage.fromarray(original).resize((16, 16), PILImage.NEAREST)
        np.testing.assert_array_equal(masks[i], np.asarray(want))


def test_cache_is_rebuilt_when_the_dataset_is_prepared_again(tmp_path, monkeypatch):
    from apjax.data import cache as cache_lib
    from apjax.data import load_cached_split

    data_dir, manual = tmp_path / "data", tmp_path / "manual"
    voc_root, _ = write_fake_voc(manual)
    voc.prepare_voc(str(data_dir), manual_dir=str(manual))
    before = load_cached_split("voc", "train", data_dir)
    row = before.image_ids.index("2007_000002")
    np.testing.assert_array_equal(before.labels[row], _expected_labels("2007_000002"))
    # The same preparation: the cache is reused.
    calls = []
    monkeypatch.setattr(cache_lib, "build_cache", lambda *a, **k: calls.append(1))
    load_cached_split("voc", "train", data_dir)
    assert calls == []
    monkeypatch.undo()
    # Prepared again from changed data: 2007_000002 is now a cat, 2007_000001 another picture.
    (voc_root / "Annotations" / "2007_000002.xml").write_text(
        "<annotation><object><name>cat</name><difficult>0</difficult></object></annotation>"
    )
    new_jpeg = voc_root / "JPEGImages" / "2007_000001.jpg"
    Image.fromarray(_image_array(30, 20, seed=99)).save(new_jpeg, quality=90)
    shutil.rmtree(data_dir / "apjax_voc2012")
    voc.prepare_voc(str(data_dir), manual_dir=str(manual))
    after = load_cached_split("voc", "train", data_dir)
    cat = np.zeros(20, np.uint8)
    cat[voc.VOC_CLASSES.index("cat")] = 1
    np.testing.assert_array_equal(after.labels[after.image_ids.index("2007_000002")], cat)
    row = after.image_ids.index("2007_000001")
    assert after.sizes[row].tolist() == [20, 30]
    with Image.open(new_jpeg) as src:
        np.testing.assert_array_equal(after.images[row, :20, :30], np.asarray(src.convert("RGB")))


def test_split_sizes_are_refused_for_voc():
    import ml_collections

    from apjax.data import check_data_config
    from apjax.tasks import validate_config
    from configs import vgg16_kd
    from configs.common import data_config

    c = data_config("voc", False, None)
    assert "split_sizes" not in c and c.cache_size == 0
    check_data_config(c)
    c.split_sizes = ml_collections.ConfigDict(dict(voc.VOC_SPLIT_SIZES))  # what older configs held
    check_data_config(c)
    c.split_sizes.train = 100
    with pytest.raises(ValueError, match="cannot apply to VOC, whose splits are the official image lists"):
        check_data_config(c)
    k = vgg16_kd.get_config("")  # apjax.tasks.validate_config checks it too
    k.data.split_sizes = ml_collections.ConfigDict(dict(train=100, val=10, segmentation_val=10))
    with pytest.raises(ValueError, match="cannot apply to VOC"):
        validate_config(k)
