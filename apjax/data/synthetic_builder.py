"""The synthetic benchmark served through tfds (array_record), like PASCAL VOC.

One builder config per :class:`~apjax.data.synthetic.SyntheticConfig` and split sizes; its name encodes
them, so differently parameterised benchmarks live side by side in one ``data_dir``. Every split has
masks (the generator knows them exactly), stored as single-channel PNG index images; images are PNG.
Generation runs on a thread pool (numpy and PNG encoding release the GIL for much of their time).
Images are generated at ``generator.image_size``, which is their original resolution: the host cache's
default layout keeps them at that size, so crops and eval images are resized once from it, as for VOC.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from apjax.data.synthetic import SPLITS, SyntheticConfig, generate_example
from apjax.data.synthetic_shapes import CLASS_NAMES
from apjax.errors import ConfigError

DEFAULT_SPLIT_SIZES = {"train": 4000, "val": 1000, "segmentation_val": 500}


def _png(array: np.ndarray) -> io.BytesIO:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    buf.seek(0)
    return buf


@dataclasses.dataclass
class SyntheticBuilderConfig(tfds.core.BuilderConfig):
    """A builder config holding the generator's settings and the number of images per split."""

    generator: SyntheticConfig = SyntheticConfig()
    split_sizes: tuple[tuple[str, int], ...] = tuple(DEFAULT_SPLIT_SIZES.items())


def builder_config(
    generator: SyntheticConfig, split_sizes: dict[str, int] | None = None
) -> SyntheticBuilderConfig:
    """The config of one benchmark; its name is a readable digest of every setting."""
    generator.validate()
    sizes = {**DEFAULT_SPLIT_SIZES, **(split_sizes or {})}
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ConfigError(f"unknown synthetic splits {sorted(unknown)}; the splits are {list(SPLITS)}.")
    for split, n in sizes.items():
        if int(n) < 1:
            raise ConfigError(f"split {split!r} must have at least one image, got {n}.")
    g = generator
    name = (
        f"k{g.num_classes}_s{g.image_size}_o{g.min_objects}-{g.max_objects}_d{g.num_distractors}"
        f"_ctx{g.context_prob:g}-{g.context_noise:g}_seed{g.seed}"
        f"_n{sizes['train']}-{sizes['val']}-{sizes['segmentation_val']}"
    )
    return SyntheticBuilderConfig(
        name=name,
        description="apjax synthetic attribution benchmark",
        generator=generator,
        split_sizes=tuple((s, int(sizes[s])) for s in SPLITS),
    )


class ApjaxSynthetic(tfds.core.GeneratorBasedBuilder):
    """Multi-label shapes with exact class-index masks (0 background, 1..K, 255 void borders)."""

    name = "apjax_synthetic"
    code_path = epath.Path(__file__)  # tfds would look it up through importlib_resources
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        k = self.builder_config.generator.num_classes
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                f"Synthetic attribution benchmark with {k} shape classes ("
                + ", ".join(CLASS_NAMES[:k])
                + ") and exact masks."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                    "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                    "labels": tfds.features.Tensor(shape=(k,), dtype=np.uint8),
                    "image_id": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split, n) for split, n in self.builder_config.split_sizes}

    def _generate_examples(self, split: str, n: int) -> Iterator[tuple[str, dict]]:
        config = self.builder_config.generator

        def encode(index: int) -> tuple[str, dict]:
            ex = generate_example(config, split, index)
            return ex["image_id"], {
                "image": _png(ex["image"]),
                "mask": _png(ex["mask"]),
                "labels": ex["labels"],
                "image_id": ex["image_id"],
            }

        workers = max(1, min(8, os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            # Chunks bound the memory held by finished but not yet written examples.
            for start in range(0, n, 256):
                yield from pool.map(encode, range(start, min(n, start + 256)))


def synthetic_builder(
    data_dir: str | os.PathLike,
    generator: SyntheticConfig,
    split_sizes: dict[str, int] | None = None,
) -> ApjaxSynthetic:
    """The tfds builder of one synthetic benchmark under ``data_dir``."""
    return ApjaxSynthetic(
        config=builder_config(generator, split_sizes),
        data_dir=os.fspath(data_dir),
        file_format="array_record",
    )


def prepare_synthetic(
    data_dir: str | os.PathLike, generator: SyntheticConfig, split_sizes: dict[str, int] | None = None
) -> ApjaxSynthetic:
    """Generates and writes the benchmark once (a no-op when prepared); returns its builder."""
    builder = synthetic_builder(data_dir, generator, split_sizes)
    if not builder.is_prepared():
        builder.download_and_prepare()
    return builder
