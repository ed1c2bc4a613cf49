"""Shared pieces of the caption-dataset builders: JSON/image reading with clear errors, a build
report, and a TFDS base class.

Why TFDS without TensorFlow works here: with ``file_format="array_record"``, ``disable_shuffling``
and images handed to TFDS as already-encoded bytes (we encode with PIL), tensorflow-datasets
4.9 writes and reads datasets in pure NumPy mode; ``builder.as_data_source(split)`` is a
random-access source that grain reads directly. TFDS only imports TensorFlow to *encode*
NumPy images or to write tfrecord, and we do neither.
"""
from __future__ import annotations

import collections
import dataclasses
import inspect
import io
import json
import logging
import os
import pathlib
import re
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from rsvl_jax.errors import UserError
from rsvl_jax.data.text import pre_caption  # text.py owns the normalisation rules

log = logging.getLogger(__name__)

UNKNOWN_LABEL = -1  # a scene class could not be determined (e.g. RSICD's "00017.jpg")
ON_ERROR = ("raise", "skip")


class DatasetError(UserError, ValueError):
    """Bad input data (or a stale/missing build). The message names the file, row and field."""


# ----------------------------------------------------------------------------- reading files
def read_json(path: os.PathLike | str, encodings: Sequence[str] = ("utf-8",)) -> tuple[Any, str]:
    """Parse a JSON file, trying ``encodings`` in order; returns (data, encoding used).

    RSICD's annotation file is not valid UTF-8 in places, so its builders pass
    ("utf-8", "gb18030"); a fallback is logged and recorded in the build report by the caller.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    raw = path.read_bytes()
    errors = []
    for enc in encodings:
        try:
            text = raw.decode(enc)
        except UnicodeDecodeError as e:
            errors.append(f"{enc}: {e}")
            continue
        if enc != encodings[0]:
            log.warning("%s is not valid %s; read it as %s instead", path, encodings[0], enc)
        try:
            return json.loads(text), enc
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: malformed JSON ({e})") from e
    raise DatasetError(f"{path}: cannot decode the file with any of {list(encodings)}: {errors}")


def _field(row: Any, key: str, types, where: str):
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if key not in row:
        raise DatasetError(f"{where}: missing field {key!r}")
    value = row[key]
    is_bad_bool = isinstance(value, bool) and bool not in _as_tuple(types)  # True is an int
    if not isinstance(value, types) or is_bad_bool:
        names = "/".join(t.__name__ for t in _as_tuple(types))
        raise DatasetError(f"{where}: field {key!r} should be {names}, got {type(value).__name__}")
    return value


def _as_tuple(types):
    return types if isinstance(types, tuple) else (types,)


_SCENE_RE = re.compile(r"([a-z]+(?:[ _-][a-z]+)*)[ _-]*\(?\d+\)?")


def scene_from_filename(name: str) -> str | None:
    """'train/storagetanks_12.tif' -> 'storagetanks'; '00017.jpg' -> None (no class prefix)."""
    stem = pathlib.PurePosixPath(str(name).replace("\\", "/")).stem.lower()
    m = _SCENE_RE.fullmatch(stem)
    return m.group(1) if m else None


def find_image(name: str, roots: Sequence[pathlib.Path], by_scene: bool = False) -> pathlib.Path | None:
    """Look for ``name`` under each root as given, then by its base name (flat image folders),
    then (``by_scene``) under a folder named by its scene prefix (NWPU's ``<category>/``)."""
    rel = pathlib.PurePosixPath(str(name).replace("\\", "/"))
    candidates = [root / rel for root in roots] + [root / rel.name for root in roots]
    scene = scene_from_filename(name) if by_scene else None
    if scene:
        candidates += [root / scene / rel.name for root in roots]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def encode_image_file(path: pathlib.Path, where: str) -> bytes:
    """Read and check an image; return JPEG bytes as they are (RGB JPEG) or lossless RGB PNG.

    Keeping JPEGs untouched means decoding gives the same pixels PIL gives the reference;
    everything else (TIFF, palette, grey) is converted to RGB like PIR's ``.convert('RGB')``.
    """
    try:
        raw = path.read_bytes()
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            if im.format == "JPEG" and im.mode == "RGB":
                return raw
            rgb = im.convert("RGB")
    except FileNotFoundError as e:
        raise DatasetError(f"{where}: image file {path} not found") from e
    except Exception as e:  # PIL raises many types for broken files
        raise DatasetError(f"{where}: cannot decode image {path} ({type(e).__name__}: {e})") from e
    return encode_png(np.asarray(rgb))


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes | np.ndarray) -> np.ndarray:
    """Encoded bytes (or an already decoded array) -> uint8 HxWx3."""
    if isinstance(data, np.ndarray):
        return data
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


# ----------------------------------------------------------------------------- records, report
@dataclasses.dataclass
class ImageRecord:
    """One image with all its captions, before the image file has been read."""

    filename: str  # as written in the annotation file
    image_id: int
    captions: list[str]
    label: int  # UNKNOWN_LABEL where the scene class is unknown
    where: str  # "file row N" for error messages
    label_name: str | None = None  # as given by the annotation file, if it names classes


class BuildReport:
    """Counts what a split lost or had to guess, so nothing is dropped silently."""

    def __init__(self, split: str):
        self.split = split
        self.rows_in = 0
        self.examples_out = 0
        self.dropped_rows: collections.Counter = collections.Counter()
        self.dropped_captions: collections.Counter = collections.Counter()
        self.notes: collections.Counter = collections.Counter()
        self.messages: list[str] = []

    def _say(self, msg: str) -> None:
        if len(self.messages) < 20:  # keep the metadata small; counts are complete
            self.messages.append(msg)
        log.warning("[%s] %s", self.split, msg)

    def drop_row(self, reason: str, msg: str) -> None:
        self.dropped_rows[reason] += 1
        self._say(f"dropped row: {msg}")

    def drop_caption(self, reason: str, msg: str) -> None:
        self.dropped_captions[reason] += 1
        self._say(f"dropped caption: {msg}")

    def note(self, reason: str, msg: str | None = None) -> None:
        self.notes[reason] += 1
        if msg:
            self._say(msg)

    def as_dict(self) -> dict:
        return {
            "rows_in": self.rows_in,
            "examples_out": self.examples_out,
            "dropped_rows": dict(self.dropped_rows),
            "dropped_captions": dict(self.dropped_captions),
            "notes": dict(self.notes),
            "messages": list(self.messages),
        }

    def summary(self) -> str:
        return (f"split {self.split!r}: {self.rows_in} rows in, {self.examples_out} examples out, "
                f"dropped rows {dict(self.dropped_rows)}, dropped captions "
                f"{dict(self.dropped_captions)}, notes {dict(self.notes)}")


# ----------------------------------------------------------------------------- TFDS base
def caption_features() -> tfds.features.FeaturesDict:
    """Every caption dataset example: one image with all its (raw) captions and its scene label.

    ``label`` is a plain int64 (not ClassLabel) because some images have no scene class
    (UNKNOWN_LABEL = -1); the class names live in ``builder.info.metadata["class_names"]``.
    """
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
        "image_id": np.int64,
        "filename": tfds.features.Text(),
        "captions": tfds.features.Sequence(tfds.features.Text()),
        "label": np.int64,
    })


class CaptionBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base builder: array_record output, file order kept, a build report in the metadata.

    ``on_error="raise"`` (default) stops at the first bad row with a message naming the file,
    row and field; ``"skip"`` drops it, logs it and counts it in
    ``info.metadata["build_report"][split]``.
    """

    VERSION = tfds.core.Version("1.0.0")
    IMAGES_BY_SCENE = False  # see find_image
    HOMEPAGE = ""
    CITATION = ""
    DESCRIPTION = ""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """Our module file. (TFDS's own lookup needs the optional `importlib_resources`.)"""
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, file_format: str = "array_record", on_error: str = "raise",
                 source: dict | None = None, **kwargs):
        """``source``: what the build is made from (``builders.cache.source_record``), kept in
        ``info.metadata["source"]`` so a later open can tell whether the build is stale."""
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self._on_error = on_error
        self._source = source
        self._parse_notes: dict[str, list[tuple[str, str]]] = {}
        super().__init__(file_format=file_format, **kwargs)

    def _download_and_prepare(self, dl_manager, download_config=None):
        if self._source is not None:
            self.info.metadata["source"] = self._source
        return super()._download_and_prepare(dl_manager, download_config=download_config)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=caption_features(),
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
            disable_shuffling=True,  # keep file order: eval relies on it; training shuffles itself
            metadata=tfds.core.MetadataDict(),
        )

    # -- helpers for subclasses
    def _set_metadata(self, **items) -> None:
        self.info.metadata.update(items)

    def _fail_or_drop(self, report: BuildReport, reason: str, err: DatasetError) -> None:
        if self._on_error == "raise":
            raise err
        report.drop_row(reason, str(err))

    def _generate_from_records(
        self, split: str, records: Iterable[ImageRecord], roots: Sequence[pathlib.Path]
    ) -> Iterator[tuple[int, dict]]:
        """Read each record's image, check its captions, yield examples in file order."""
        report = BuildReport(split)
        for reason, msg in self._parse_notes.get(split, ()):  # found while parsing the files
            report.note(reason, msg)
        ids: dict[int, str] = {}
        for rec in records:
            report.rows_in += 1
            if int(rec.image_id) in ids:
                self._fail_or_drop(report, "duplicate_image_id", DatasetError(
                    f"{rec.where}: image id {rec.image_id} of {rec.filename!r} is also the id of "
                    f"{ids[int(rec.image_id)]}"))
                continue
            path = find_image(rec.filename, roots, self.IMAGES_BY_SCENE)
            if path is None:
                looked = ", ".join(str(r) for r in roots)
                self._fail_or_drop(report, "missing_image", DatasetError(
                    f"{rec.where}: image {rec.filename!r} not found (looked under {looked})"))
                continue
            try:
                image = encode_image_file(path, rec.where)
            except DatasetError as e:
                self._fail_or_drop(report, "bad_image", e)
                continue
            captions = []
            for j, cap in enumerate(rec.captions):
                try:
                    pre_caption(cap)
                except ValueError as e:
                    err = DatasetError(f"{rec.where}: caption {j} {cap!r} of {rec.filename!r} is empty "
                                       f"after normalisation ({e})")
                    if self._on_error == "raise":
                        raise err from e
                    report.drop_caption("empty_caption", str(err))
                    continue
                captions.append(cap)
            if not captions:
                report.drop_row("no_captions", f"{rec.where}: {rec.filename!r} has no usable caption")
                continue
            ids[int(rec.image_id)] = f"{rec.filename!r} ({rec.where})"
            if rec.label == UNKNOWN_LABEL:
                report.note("unknown_label")
            yield report.examples_out, {
                "image": image,
                "image_id": int(rec.image_id),
                "filename": rec.filename,
                "captions": captions,
                "label": int(rec.label),
            }
            report.examples_out += 1
        self._store_report(report)

    def _store_report(self, report: BuildReport) -> None:
        """Log the split's summary and keep it in info.metadata["build_report"][split]."""
        lost = report.dropped_rows or report.dropped_captions
        (log.warning if lost else log.info)("%s: %s", self.name, report.summary())
        reports = dict(self.info.metadata.get("build_report", {}))
        reports[report.split] = report.as_dict()
        self.info.metadata["build_report"] = reports


def manual_file(manual_dir: pathlib.Path, name: str, instructions: str) -> pathlib.Path:
    """The path of a required file in manual_dir, or an error naming it."""
    path = pathlib.Path(manual_dir) / name
    if not path.is_file():
        raise DatasetError(f"missing {path}. {instructions.strip()}")
    return path
