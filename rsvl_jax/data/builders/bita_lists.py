"""BITA's own annotation lists (LAVIS style, spec BITA §6.1-6.2, DATASETS.md), read so users
can reproduce the paper's exact splits:

* ``<DS>_train.json``: a list of ``{"image", "caption", "image_id"}``, one row per (image,
  caption) pair. Rows are grouped per image in order of first appearance.
* ``<DS>_val.json`` / ``<DS>_test.json``: a list of rows with ``image`` (``image_id`` and
  ``caption`` optional), plus the COCO-format ground truth ``<DS>_val_gt.json`` /
  ``<DS>_test_gt.json`` (``{"images": [{"id"}], "annotations": [{"image_id", "caption", "id"}]}``)
  that holds the reference captions.

Image ids of val/test rows (Q9 fixed): an integer ``image_id`` field when the row has one;
otherwise the reference's rule -- the number after the last ``_`` of the file stem -- but
applied to the stem (so ``.tif`` names work), and two different images with one id is an
error naming both rows instead of a silent de-duplication. The references of an image are
the ground truth's annotations with that id, so the ids we build the ground truth from later
are the same ids (Q10: no hard-coded ground-truth path; each dataset reads its own).
"""
from __future__ import annotations

import collections
import pathlib

from rsvl_jax.data.builders.common import UNKNOWN_LABEL, DatasetError, ImageRecord, _field, read_json

EVAL_SPLITS = ("val", "test")


def list_paths(manual: pathlib.Path, prefix: str) -> dict[str, pathlib.Path]:
    """``{split: list file}`` plus ``{split + "_gt": gt file}`` for the files that exist.

    Looked up in ``<manual>/annotations/`` (BITA's layout) first, then ``<manual>/``.
    """
    found = {}
    for key, name in [(s, f"{prefix}_{s}.json") for s in ("train",) + EVAL_SPLITS] + \
                     [(f"{s}_gt", f"{prefix}_{s}_gt.json") for s in EVAL_SPLITS]:
        for folder in (manual / "annotations", manual):
            if (folder / name).is_file():
                found[key] = folder / name
                break
    return found


def parse_train(path: pathlib.Path, encodings=("utf-8",)) -> tuple[list[ImageRecord], str]:
    """Train list -> one record per image (captions in row order), records in order of
    first appearance. ``image_id`` may be any int or string (LAVIS remaps it); the example id
    is the integer itself, or the record's position when the ids are strings."""
    rows, encoding = read_json(path, encodings)
    if not isinstance(rows, list):
        raise DatasetError(f"{path}: expected a JSON list of caption rows (BITA/LAVIS train format)")
    by_key: dict = {}
    for i, row in enumerate(rows):
        where = f"{path} row {i}"
        image = _field(row, "image", str, where)
        caption = _field(row, "caption", str, where)
        key = _field(row, "image_id", (int, str), where)
        rec = by_key.get(key)
        if rec is None:
            by_key[key] = ImageRecord(filename=image, image_id=key, captions=[caption],
                                      label=UNKNOWN_LABEL, where=where)
        elif image != rec.filename:
            raise DatasetError(f"{where}: image_id {key!r} has image {image!r} but {rec.where} "
                               f"has {rec.filename!r}")
        else:
            rec.captions.append(caption)
    records = list(by_key.values())
    if not all(isinstance(r.image_id, int) for r in records):
        for k, r in enumerate(records):
            r.image_id = k
    return records, encoding


def parse_gt(path: pathlib.Path, encodings=("utf-8",)) -> dict[int, list[str]]:
    """COCO caption ground truth -> ``{image id: [references]}`` in the file's image order."""
    data, _ = read_json(path, encodings)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DatasetError(f"{path}: expected a JSON object with an 'annotations' list (COCO format)")
    refs: dict[int, list[str]] = {}
    for i, img in enumerate(data.get("images") or []):
        refs.setdefault(_field(img, "id", int, f"{path} images[{i}]"), [])
    for i, ann in enumerate(data["annotations"]):
        where = f"{path} annotations[{i}]"
        refs.setdefault(_field(ann, "image_id", int, where), []).append(
            _field(ann, "caption", str, where))
    return refs


def reference_image_id(filename: str) -> int | None:
    """The number after the last '_' of the file stem ('airport_12.jpg' -> 12, '7.tif' -> 7)."""
    tail = pathlib.PurePosixPath(filename.replace("\\", "/")).stem.split("_")[-1]
    return int(tail) if tail.isdigit() else None


def parse_eval(path: pathlib.Path, gt: dict[int, list[str]] | None, gt_name: str,
               encodings=("utf-8",), report_note=None) -> tuple[list[ImageRecord], str]:
    """Val/test list -> one record per image with its ground-truth references.

    A row listed twice (same image, same id) is kept once (the reference de-duplicates by id
    too); ``report_note(reason, msg)`` is told. Without a ground-truth file the row's own
    ``caption`` (a string or a list) is used; neither is an error naming the ground truth.
    """
    rows, encoding = read_json(path, encodings)
    if not isinstance(rows, list):
        raise DatasetError(f"{path}: expected a JSON list of image rows (BITA/LAVIS eval format)")
    records: list[ImageRecord] = []
    by_id: dict[int, ImageRecord] = {}
    for i, row in enumerate(rows):
        where = f"{path} row {i}"
        image = _field(row, "image", str, where)
        if "image_id" in row and isinstance(row["image_id"], int) and not isinstance(row["image_id"], bool):
            image_id = row["image_id"]
        else:
            image_id = reference_image_id(image)
            if image_id is None:
                raise DatasetError(f"{where}: no integer field 'image_id', and the file name "
                                   f"{image!r} does not end in _<number>; add 'image_id' (the id "
                                   f"used in {gt_name})")
        prev = by_id.get(image_id)
        if prev is not None:
            if prev.filename == image:
                if report_note:
                    report_note("duplicate_row", f"{where}: {image!r} is listed again (kept once)")
                continue
            raise DatasetError(f"{where}: image id {image_id} of {image!r} is also the id of "
                               f"{prev.filename!r} ({prev.where}); give each row a unique integer "
                               f"'image_id' matching {gt_name}")
        if gt is not None:
            if image_id not in gt:
                raise DatasetError(f"{where}: image id {image_id} ({image!r}) is not in {gt_name}")
            captions = list(gt[image_id])
        elif "caption" in row:
            cap = row["caption"]
            captions = [cap] if isinstance(cap, str) else cap
            if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                raise DatasetError(f"{where}: field 'caption' should be str or a list of str")
        else:
            raise DatasetError(f"{where}: no captions: {gt_name} (the ground truth) is missing "
                               "and the row has no 'caption' field")
        rec = ImageRecord(filename=image, image_id=image_id, captions=captions,
                          label=UNKNOWN_LABEL, where=where)
        by_id[image_id] = rec
        records.append(rec)
    if gt is not None and report_note:
        for image_id in gt:
            if image_id not in by_id:
                report_note("gt_image_not_listed",
                            f"{gt_name}: image id {image_id} has no row in {path.name} (ignored)")
    return records, encoding


def read_lists(manual: pathlib.Path, prefix: str, instructions: str, encodings=("utf-8",),
               notes=None):
    """All of a dataset's BITA lists -> ({split: records}, {file name: encoding}).

    ``notes``: a ``collections.Counter``-like callable sink ``notes(split, reason, msg)``.
    """
    paths = list_paths(manual, prefix)
    splits = [s for s in ("train",) + EVAL_SPLITS if s in paths]
    if not splits:
        raise DatasetError(f"missing {manual}/annotations/{prefix}_train.json (and no val/test "
                           f"list either). {instructions.strip()}")
    out, encodings_used = {}, collections.OrderedDict()
    for split in splits:
        path = paths[split]
        if split == "train":
            out[split], encodings_used[path.name] = parse_train(path, encodings)
            continue
        gt_path = paths.get(f"{split}_gt")
        gt_name = gt_path.name if gt_path else f"{prefix}_{split}_gt.json"
        gt = parse_gt(gt_path, encodings) if gt_path else None
        note = (lambda reason, msg, s=split: notes(s, reason, msg)) if notes else None
        out[split], encodings_used[path.name] = parse_eval(path, gt, gt_name, encodings, note)
    return out, dict(encodings_used)
