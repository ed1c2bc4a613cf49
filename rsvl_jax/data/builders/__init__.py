"""Dataset builders (TFDS, array_record, no TensorFlow needed) and small helpers to open them.

Importing this package registers the builders with TFDS under the names ``rsicd``, ``rsitmd``,
``ucm_captions``, ``sydney_captions``, ``nwpu_captions`` and ``synthetic``. Open them with
``build`` (not ``tfds.builder``): it checks every time that the build matches ``manual_dir``
(``builders.cache``).

Configs: ``karpathy`` = the official annotation file (NWPU's ``official``; "karpathy" is
accepted as its alias), ``pir`` = PIR's lists (rsicd, rsitmd), ``bita`` = BITA's lists (rsicd,
ucm_captions, nwpu_captions, sydney_captions); synthetic: tiny, demo, caption_demo, large or
``synthetic_config(...)``.
"""
from __future__ import annotations

import os

import tensorflow_datasets as tfds

import rsvl_jax.data.builders.cache as cache
from rsvl_jax.data.builders.caption_sets import NwpuCaptions, SydneyCaptions, UcmCaptions
from rsvl_jax.data.builders.common import UNKNOWN_LABEL, BuildReport, DatasetError, decode_image
from rsvl_jax.data.builders.karpathy import AnnotationConfig
from rsvl_jax.data.builders.rsicd import Rsicd
from rsvl_jax.data.builders.rsitmd import Rsitmd
from rsvl_jax.data.builders.synthetic import Synthetic, SyntheticConfig, synthetic_config

BUILDERS = {"rsicd": Rsicd, "rsitmd": Rsitmd, "synthetic": Synthetic,
            "ucm_captions": UcmCaptions, "sydney_captions": SydneyCaptions,
            "nwpu_captions": NwpuCaptions}

__all__ = [
    "BUILDERS", "UNKNOWN_LABEL", "AnnotationConfig", "BuildReport", "DatasetError",
    "NwpuCaptions", "Rsicd", "Rsitmd", "SydneyCaptions", "Synthetic", "SyntheticConfig",
    "UcmCaptions", "build", "class_names", "decode_image", "open_split", "synthetic_config",
]


def build(name: str, data_dir: str | os.PathLike, *, config=None, manual_dir=None,
          on_error: str = "raise") -> tfds.core.DatasetBuilder:
    """Prepare the dataset once (a no-op when already built from the same source) and return
    its builder.

    ``config``: a config name ("karpathy", "pir", "bita", "official", "tiny", "demo", ...),
    a config object, or None for the builder's first config.
    ``manual_dir``: the user's folder with the annotation file(s) and images. It is checked on
    every call (see ``builders.cache``): a changed source builds a new version folder; a
    missing folder is an error; None reuses the one existing build with these settings.
    ``on_error``: "raise" (stop at the first bad row, naming file, row and field) or "skip"
    (drop it and count it in ``info.metadata["build_report"]``).
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(BUILDERS)}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    cls = BUILDERS[name]
    cfg = cache.resolve_config(cls, config)
    root, source = cache.choose_root(cls, data_dir, cfg, on_error, manual_dir)
    builder = cls(data_dir=os.fspath(root), config=cfg, on_error=on_error, source=source)
    if source is not None:
        stored = builder.info.metadata.get("source") if builder.is_prepared() else None
        if stored is not None and cache.source_hash(_hashed(stored)) != cache.source_hash(_hashed(source)):
            raise DatasetError(f"{builder.data_dir} holds a build from another source "
                               f"({cache.difference(stored, source)}); delete that folder")
    download_config = tfds.download.DownloadConfig(
        manual_dir=os.fspath(manual_dir) if manual_dir is not None else None)
    builder.download_and_prepare(download_config=download_config)
    return builder


def _hashed(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "manual_dir"}


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
