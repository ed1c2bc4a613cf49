"""The `synthetic` dataset: procedurally drawn scenes (rsvl_jax.data.synthetic), no download."""
from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from rsvl_jax.data import synthetic
from rsvl_jax.data.builders.common import BuildReport, CaptionBuilder, encode_png


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    """Split sizes (images), image side and seed. Each combination needs its own ``name``."""

    num_train: int = 2000
    num_val: int = 250
    num_test: int = 250
    image_size: int = 64
    seed: int = 0


def synthetic_config(num_train: int, num_val: int, num_test: int, image_size: int = 64,
                     seed: int = 0) -> SyntheticConfig:
    """A config whose name encodes its parameters, so differently sized builds never collide."""
    return SyntheticConfig(
        name=f"n{num_train}-{num_val}-{num_test}_px{image_size}_seed{seed}",
        num_train=num_train, num_val=num_val, num_test=num_test, image_size=image_size, seed=seed,
        description="custom synthetic scenes")


class Synthetic(CaptionBuilder):
    """Synthetic top-down scenes with 5 captions each and a scene label (10 balanced classes)."""

    BUILDER_CONFIGS = [
        SyntheticConfig(name="tiny", num_train=40, num_val=20, num_test=20, image_size=32,
                        description="for unit tests"),
        SyntheticConfig(name="demo", num_train=2000, num_val=250, num_test=250, image_size=64,
                        description="the CPU demo: learns in minutes"),
        SyntheticConfig(name="caption_demo", num_train=600, num_val=60, num_test=60, image_size=64,
                        description="the BITA captioning demo on CPU: 3,000 (image, caption) "
                                    "pairs, 60-image val/test ground truth"),
        SyntheticConfig(name="large", num_train=10000, num_val=1000, num_test=1000, image_size=128,
                        description="a bigger stand-in for accelerator runs"),
    ]
    DESCRIPTION = ("Procedurally drawn remote-sensing-like scenes (farmland, river with bridges, "
                   "lake with trees, parking lot, airport, ...) with captions naming the scene, "
                   "counts, colours and positions.")

    def _info(self):
        info = super()._info()
        info.metadata["class_names"] = list(synthetic.CLASS_NAMES)
        return info

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        sizes = {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test}
        self._set_metadata(class_names=list(synthetic.CLASS_NAMES),
                           synthetic={"seed": cfg.seed, "image_size": cfg.image_size, **sizes})
        return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

    def _generate_examples(self, split: str, num_images: int):
        cfg = self.builder_config
        report = BuildReport(split)  # nothing is ever dropped, but every split has a report
        for i, ex in enumerate(synthetic.iter_examples(num_images, split, cfg.seed, cfg.image_size)):
            report.rows_in += 1
            yield i, {**ex, "image": encode_png(ex["image"])}
            report.examples_out += 1
        self._store_report(report)
