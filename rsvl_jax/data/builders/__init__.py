"""Dataset builders (TFDS, array_record, no TensorFlow needed) and small helpers to open them.

Importing this package registers the builders with TFDS under the names ``rsicd``, ``rsitmd``
and ``synthetic`` (``tfds.builder("rsitmd/pir", ...)`` then works too).
"""
from __future__ import annotations

import os

import tensorflow_datasets as tfds

from rsvl_jax.data.builders.common import UNKNOWN_LABEL, BuildReport, DatasetError, decode_image
from rsvl_jax.data.builders.karpathy import AnnotationConfig
from rsvl_jax.data.builders.rsicd import Rsicd
from rsvl_jax.data.builders.rsitmd import Rsitmd
from rsvl_jax.data.builders.synthetic import Synthetic, SyntheticConfig, synthetic_config

BUILDERS = {"rsicd": Rsicd, "rsitmd": Rsitmd, "synthetic": Synthetic}

__all__ = [
    "BUILDERS", "UNKNOWN_LABEL", "AnnotationConfig", "BuildReport", "DatasetError", "Rsicd",
    "Rsitmd", "Synthetic", "SyntheticConfig", "build", "class_names", "decode_image",
    "open_split", "synthetic_config",
]


def build(name: str, data_dir: str | os.PathLike, *, config=None, manual_dir=None,
          on_error: str = "raise") -> tfds.core.DatasetBuilder:
    """Prepare the dataset once (a no-op when already built) and return its builder.

    ``config``: a config name ("karpathy", "pir", "tiny", "demo", ...) or a config object.
    ``manual_dir``: the user's folder with the annotation file(s) and images.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(BUILDERS)}")
    builder = BUILDERS[name](data_dir=os.fspath(data_dir), config=config, on_error=on_error)
    download_config = tfds.download.DownloadConfig(
        manual_dir=os.fspath(manual_dir) if manual_dir is not None else None)
    builder.download_and_prepare(download_config=download_config)
    return builder


def open_split(builder: tfds.core.DatasetBuilder, split: str, *, decode: bool = False):
    """A random-access source of one split (grain reads it directly).

    With ``decode=False`` (default) images stay encoded bytes: cheap to scan (caption counts,
    eval texts) and decoded by the pipeline only when needed.
    """
    decoders = None if decode else {"image": tfds.decode.SkipDecoding()}
    return builder.as_data_source(split=split, decoders=decoders)


def class_names(builder: tfds.core.DatasetBuilder) -> list[str]:
    """The scene-class vocabulary stored at build time (label k -> class_names[k])."""
    return list(builder.info.metadata["class_names"])
