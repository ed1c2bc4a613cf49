"""Dataset builders (TFDS, array_record, no TensorFlow needed) and small helpers to open them.

Importing this package registers the builders with TFDS under the names ``rsicd``, ``rsitmd``,
``ucm_captions``, ``sydney_captions``, ``nwpu_captions`` and ``synthetic``. Open them with
``build`` (not ``tfds.builder``): it checks every time that the build matches ``manual_dir``
(``builders.cache``).

Configs: ``karpathy`` = the official annotation file (NWPU's ``official``; "karpathy" is
accepted as its alias), ``pir`` = PIR's lists (rsicd, rsitmd), ``bita`` = BITA's lists (rsicd,
ucm_captions, nwpu_captions, sydney_captions); synthetic: tiny, demo, caption_demo, large or
``synthetic_config(...)``.

A corpus of RS5M size (5 million image-text pairs), on paper. One machine cannot build it in
reasonable time, and the builders here generate examples in one Python process; TFDS's Apache
Beam support spreads the same builder over many workers:

* Build. ``_generate_examples`` returns a Beam ``PTransform`` instead of yielding examples:
  ``beam = tfds.core.lazy_imports.apache_beam``; ``beam.Create(list_of_parquet_or_tar_shards)
  | beam.FlatMap(read_shard) | beam.Map(to_example)``, each element a ``(unique_key, example)``
  pair as in the generator builders (the key fixes the order, so the build is deterministic).
  TFDS shuffles by key and writes the split as numbered shard files itself (sharded writing;
  no shard count to choose), one per output file of the pipeline's final write stage.
* Run. ``tfds build rs5m --data_dir=gs://bucket/tensorflow_datasets --file_format=array_record
  --beam_pipeline_options="runner=DataflowRunner,project=P,region=R,job_name=rs5m-build,
  staging_location=gs://bucket/binaries,temp_location=gs://bucket/temp,
  requirements_file=/tmp/beam_requirements.txt"`` (the requirements file names this package
  for the workers); ``runner=FlinkRunner,flink_master=host:8081`` (or ``SparkRunner``) for an
  own cluster; the default ``DirectRunner`` runs locally. From Python, the same options go
  into ``download_and_prepare(download_config=tfds.download.DownloadConfig(beam_options=
  beam.options.pipeline_options.PipelineOptions(flags=[...])), file_format="array_record")``.
* Format. ``array_record`` (what ``build`` here writes too) stores records with an index, so a
  reader can fetch record *i* of the split without scanning: random access is what grain's
  global shuffle needs. (TFRecord only streams.) Images stay encoded (JPEG/PNG bytes) in the
  records; decoding happens in the input pipeline.
* Read, on every host. ``builder.as_data_source("train")`` (or
  ``grain.python.ArrayRecordDataSource(paths of the split's shard files)``) is one random-access
  source over all shards; every host opens the same files. ``grain.python.IndexSampler(
  num_records=len(source), shard_options=grain.python.ShardByJaxProcess(drop_remainder=True),
  shuffle=True, num_epochs=1, seed=seed)`` gives each host a disjoint 1/process_count of a
  global permutation (``ShardOptions(shard_index, shard_count, drop_remainder)`` for a layout
  of one's own); ``grain.python.DataLoader(data_source=..., sampler=..., operations=[decode,
  augment, tokenize, Batch(per_host_batch, drop_remainder=True)], worker_count=N,
  read_options=grain.python.ReadOptions(num_threads=..., prefetch_buffer_size=...))`` runs the
  transforms in N worker processes per host (about the host's cores minus those feeding the
  accelerators). The loader's state (``get_state``) is a few integers per host, saved with each
  checkpoint as ``rsvl_jax/data/pipeline.py`` does; each host then builds its global-batch
  slice with ``jax.make_array_from_process_local_data``.
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
