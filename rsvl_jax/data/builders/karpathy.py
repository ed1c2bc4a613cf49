"""The two annotation layouts of RSICD/RSITMD -- the official Karpathy-style file and PIR's own
JSON lists (DATASETS.md) -- and the builder base that reads either. Parsers only read JSON;
images are read while the examples are generated.

Every structural problem raises DatasetError naming the file, the row and the field, because
the reference code would crash much later (or silently mis-train) on the same input.
"""
from __future__ import annotations

import collections
import dataclasses
import pathlib

import tensorflow_datasets as tfds

from rsvl_jax.data.builders.common import (  # noqa: F401  (_field is used by caption_sets)
    UNKNOWN_LABEL, CaptionBuilder, DatasetError, ImageRecord, _field, manual_file, read_json,
    scene_from_filename)

KARPATHY_SPLITS = ("train", "val", "test")


def class_names_from_filenames(filenames) -> list[str]:
    """Sorted distinct file-name prefixes: the scene vocabulary when the file has no labels."""
    return sorted({s for s in (scene_from_filename(f) for f in filenames) if s is not None})


def label_from_filename(filename: str, class_index: dict[str, int]) -> int:
    return class_index.get(scene_from_filename(filename) or "", UNKNOWN_LABEL)


# ----------------------------------------------------------------------------- Karpathy
def parse_karpathy(path: pathlib.Path, encodings=("utf-8",)):
    """Returns ({split: [ImageRecord]}, class_names, encoding used).

    Scene labels come from the file-name prefix (``airport_1.jpg`` -> ``airport``), indexed
    into the sorted list of prefixes; images without one get UNKNOWN_LABEL.
    """
    data, encoding = read_json(path, encodings)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: expected a JSON object with an 'images' list (Karpathy format)")
    rows = data["images"]
    names = []
    for i, row in enumerate(rows):
        names.append(_field(row, "filename", str, f"{path} images[{i}]"))
    class_names = class_names_from_filenames(names)
    class_index = {c: k for k, c in enumerate(class_names)}
    splits: dict[str, list[ImageRecord]] = collections.defaultdict(list)
    seen_ids: dict[int, str] = {}
    for i, row in enumerate(rows):
        where = f"{path} images[{i}] ({row['filename']})"
        split = _field(row, "split", str, where)
        split = "train" if split == "restval" else split  # COCO-style extra training images
        if split not in KARPATHY_SPLITS:
            raise DatasetError(f"{where}: field 'split' is {split!r}, expected one of {KARPATHY_SPLITS}")
        sentences = _field(row, "sentences", list, where)
        captions = [_field(s, "raw", str, f"{where} sentences[{j}]") for j, s in enumerate(sentences)]
        image_id = row.get("imgid", i)
        if not isinstance(image_id, int):
            raise DatasetError(f"{where}: field 'imgid' should be int, got {type(image_id).__name__}")
        if image_id in seen_ids:
            raise DatasetError(f"{where}: field 'imgid' {image_id} is also the id of {seen_ids[image_id]}")
        seen_ids[image_id] = where
        splits[split].append(ImageRecord(
            filename=row["filename"], image_id=image_id, captions=captions,
            label=label_from_filename(row["filename"], class_index), where=where))
    return dict(splits), class_names, encoding


# ----------------------------------------------------------------------------- PIR's own lists
def parse_pir_train(path: pathlib.Path, encodings=("utf-8",)):
    """PIR train list (one row per caption) -> (records grouped per image, encoding).

    Records come in order of each ``image_id``'s first appearance, so the record index *is*
    PIR's contiguous ``idx`` (§1.1). Rows of one image_id must agree on image and label.
    """
    rows, encoding = read_json(path, encodings)
    if not isinstance(rows, list):
        raise DatasetError(f"{path}: expected a JSON list of caption rows (PIR train format)")
    by_id: dict[int, ImageRecord] = {}
    first_row: dict[int, int] = {}
    for i, row in enumerate(rows):
        where = f"{path} row {i}"
        image = _field(row, "image", str, where)
        caption = _field(row, "caption", str, where)
        image_id = _field(row, "image_id", int, where)
        label = _field(row, "label", int, where)
        if label < 0:
            raise DatasetError(f"{where}: field 'label' is negative ({label})")
        name = row.get("label_name") if isinstance(row.get("label_name"), str) else None
        rec = by_id.get(image_id)
        if rec is None:
            first_row[image_id] = i
            by_id[image_id] = ImageRecord(filename=image, image_id=image_id, captions=[caption],
                                          label=label, where=where, label_name=name)
        elif image != rec.filename or label != rec.label or name != rec.label_name:
            raise DatasetError(
                f"{where}: image_id {image_id} has image {image!r} / label {label} ({name}) but "
                f"row {first_row[image_id]} has {rec.filename!r} / label {rec.label} ({rec.label_name})")
        else:
            rec.captions.append(caption)
    return list(by_id.values()), encoding


def parse_pir_eval(path: pathlib.Path, encodings=("utf-8",)):
    """PIR val/test list (one row per image with a list of captions) -> (records, encoding).

    ``label`` (and ``label_name``) are taken from the row when present (PIR's val files have
    them); otherwise the label stays UNKNOWN_LABEL until ``assign_labels`` looks the file-name
    prefix up. Image ids are the row positions.
    """
    rows, encoding = read_json(path, encodings)
    if not isinstance(rows, list):
        raise DatasetError(f"{path}: expected a JSON list of image rows (PIR val/test format)")
    records = []
    for i, row in enumerate(rows):
        where = f"{path} row {i}"
        image = _field(row, "image", str, where)
        captions = _field(row, "caption", list, where)
        for j, c in enumerate(captions):
            if not isinstance(c, str):
                raise DatasetError(f"{where}: caption[{j}] should be str, got {type(c).__name__}")
        label = _field(row, "label", int, where) if "label" in row else UNKNOWN_LABEL
        if "label" in row and label < 0:
            raise DatasetError(f"{where}: field 'label' is negative ({label})")
        name = row.get("label_name") if isinstance(row.get("label_name"), str) else None
        records.append(ImageRecord(filename=image, image_id=i, captions=list(captions),
                                   label=label, where=where, label_name=name))
    return records, encoding


def assign_labels(record_lists) -> list[str]:
    """Class vocabulary of PIR-format records, and labels for the rows that have none.

    Names come from ``label_name`` where given (two names for one id is an error naming both
    rows), else from the file-name prefix of a row with that id, else ``class_<id>``. Records
    without a label get the id of their file-name prefix, or keep UNKNOWN_LABEL.
    """
    explicit: dict[int, tuple[str, str]] = {}
    from_prefix: dict[int, str] = {}
    for records in record_lists:
        for rec in records:
            if rec.label == UNKNOWN_LABEL:
                continue
            if rec.label_name is not None:
                prev = explicit.setdefault(rec.label, (rec.label_name, rec.where))
                if prev[0] != rec.label_name:
                    raise DatasetError(f"{rec.where}: label {rec.label} is named {rec.label_name!r} "
                                       f"but {prev[1]} names it {prev[0]!r}")
            prefix = scene_from_filename(rec.filename)
            if prefix:
                from_prefix.setdefault(rec.label, prefix)
    labels = set(explicit) | set(from_prefix)
    size = max(labels, default=-1) + 1
    names = [explicit[k][0] if k in explicit else from_prefix.get(k, f"class_{k}")
             for k in range(size)]
    index = {}
    for k, n in enumerate(names):
        index.setdefault(n, k)
    for records in record_lists:
        for rec in records:
            if rec.label == UNKNOWN_LABEL:
                rec.label = label_from_filename(rec.filename, index)
    return names


# ----------------------------------------------------------------------------- builder base
@dataclasses.dataclass(eq=False)
class AnnotationConfig(tfds.core.BuilderConfig):
    """Which annotation files to read: the official file, PIR's lists or BITA's lists."""

    annotations: str = "karpathy"  # "karpathy" | "pir" | "bita" | "nwpu"


KARPATHY_CONFIG = AnnotationConfig(
    name="karpathy", annotations="karpathy",
    description="Official Karpathy-style annotation file with its standard splits.")
PIR_CONFIG = AnnotationConfig(
    name="pir", annotations="pir",
    description="PIR's own JSON lists <name>_train/_val/_test.json (the paper's exact splits). "
                "Train examples are grouped per image in order of first appearance, so the "
                "example index equals PIR's contiguous idx.")
BITA_CONFIG = AnnotationConfig(
    name="bita", annotations="bita",
    description="BITA's own LAVIS-style lists <DS>_train/_val/_test.json with COCO ground truth "
                "<DS>_val_gt.json/<DS>_test_gt.json (the paper's exact splits).")


class KarpathyPirBuilder(CaptionBuilder, skip_registration=True):
    """Caption/retrieval builder over one of several annotation layouts, chosen by the config:
    'karpathy' (the official file), 'pir' (PIR's lists) or 'bita' (BITA's lists)."""

    BUILDER_CONFIGS = [KARPATHY_CONFIG, PIR_CONFIG]
    KARPATHY_FILE = ""  # e.g. dataset_rsicd.json
    PIR_PREFIX = ""  # e.g. rsicd -> rsicd_train.json, rsicd_val.json, rsicd_test.json
    BITA_PREFIX = ""  # e.g. RSICD -> annotations/RSICD_train.json, RSICD_val_gt.json, ...
    IMAGE_DIRS: tuple[str, ...] = ("images",)  # image folders tried under manual_dir, then manual_dir
    ENCODINGS: tuple[str, ...] = ("utf-8",)

    # -- what a build reads (also what the cache fingerprints, see builders/cache.py)
    @classmethod
    def image_roots(cls, manual: pathlib.Path) -> list[pathlib.Path]:
        return [manual / d for d in cls.IMAGE_DIRS] + [manual]

    @classmethod
    def source_files(cls, manual: pathlib.Path, config: AnnotationConfig) -> list[pathlib.Path]:
        """The annotation files a build with ``config`` reads (those that exist)."""
        kind = config.annotations
        if kind == "pir":
            paths = [manual / f"{cls.PIR_PREFIX}_{s}.json" for s in KARPATHY_SPLITS]
        elif kind == "bita":
            import rsvl_jax.data.builders.bita_lists as bita_lists

            paths = list(bita_lists.list_paths(manual, cls.BITA_PREFIX).values())
        else:
            paths = [manual / cls.KARPATHY_FILE]
        return sorted(p for p in paths if p.is_file())

    def _split_generators(self, dl_manager):
        manual = pathlib.Path(dl_manager.manual_dir)
        self._parse_notes = collections.defaultdict(list)
        kind = self.builder_config.annotations
        if kind == "karpathy":
            path = manual_file(manual, self.KARPATHY_FILE, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
            splits, class_names, enc = parse_karpathy(path, self.ENCODINGS)
            class_names = self._scene_labels(splits) or class_names
            encodings = {path.name: enc}
        elif kind == "pir":
            splits, class_names, encodings = self._read_pir(manual)
        elif kind == "bita":
            splits, class_names, encodings = self._read_bita(manual)
        else:
            splits, class_names, encodings = self._read_other(manual, kind)
        if not splits:
            raise DatasetError(f"{manual}: the annotation files list no images")
        self._set_metadata(class_names=class_names, annotations=kind, annotation_encoding=encodings)
        roots = self.image_roots(manual)
        return {split: self._generate_examples(split, records, roots)
                for split, records in splits.items()}

    def _read_other(self, manual, kind):
        raise ValueError(f"unknown annotations {kind!r}")

    def _scene_labels(self, splits: dict[str, list[ImageRecord]]) -> list[str] | None:
        """Hook: set ``rec.label`` of every record and return the class names, or return None
        to keep the labels the parser gave. Default: sorted file-name prefixes (for the
        Karpathy file that is what ``parse_karpathy`` already did)."""
        records = [r for v in splits.values() for r in v]
        names = class_names_from_filenames(r.filename for r in records)
        index = {c: k for k, c in enumerate(names)}
        for r in records:
            r.label = label_from_filename(r.filename, index)
        return names

    def _read_bita(self, manual: pathlib.Path):
        import rsvl_jax.data.builders.bita_lists as bita_lists

        def note(split, reason, msg):
            self._parse_notes[split].append((reason, msg))

        splits, encodings = bita_lists.read_lists(manual, self.BITA_PREFIX,
                                                  self.MANUAL_DOWNLOAD_INSTRUCTIONS,
                                                  self.ENCODINGS, note)
        return splits, self._scene_labels(splits), encodings

    def _read_pir(self, manual: pathlib.Path):
        paths = {s: manual / f"{self.PIR_PREFIX}_{s}.json" for s in KARPATHY_SPLITS}
        present = {s: p for s, p in paths.items() if p.is_file()}
        if "test" not in present:
            manual_file(manual, paths["test"].name, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        splits, encodings = {}, {}
        for s, p in present.items():
            parse = parse_pir_train if s == "train" else parse_pir_eval
            splits[s], encodings[p.name] = parse(p, self.ENCODINGS)
        if splits.get("train") or any(r.label != UNKNOWN_LABEL for v in splits.values() for r in v):
            class_names = assign_labels(list(splits.values()))
        else:  # no labels anywhere (evaluation only): the file-name prefixes are the classes
            class_names = class_names_from_filenames(r.filename for v in splits.values() for r in v)
            index = {c: k for k, c in enumerate(class_names)}
            for r in (r for v in splits.values() for r in v):
                r.label = label_from_filename(r.filename, index)
        return splits, class_names, encodings

    def _generate_examples(self, split, records, roots):
        yield from self._generate_from_records(split, records, roots)
