"""The captioning datasets BITA uses besides RSICD: UCM-Captions, Sydney-Captions (both
Karpathy-style ``dataset.json`` with images named by number, ``1.tif``) and NWPU-Captions
(``dataset_nwpu.json`` keyed by category). Each also reads BITA's own lists (config 'bita',
see ``bita_lists``).
"""
from __future__ import annotations

import collections
import pathlib

from rsvl_jax.data.builders.common import DatasetError, ImageRecord, manual_file, read_json
from rsvl_jax.data.builders.karpathy import (
    BITA_CONFIG, KARPATHY_CONFIG, KARPATHY_SPLITS, AnnotationConfig, KarpathyPirBuilder,
    _field, label_from_filename)

# UC Merced land-use classes in alphabetical order, 100 images each.
UCM_CLASSES = (
    "agricultural", "airplane", "baseballdiamond", "beach", "buildings", "chaparral",
    "denseresidential", "forest", "freeway", "golfcourse", "harbor", "intersection",
    "mediumresidential", "mobilehomepark", "overpass", "parkinglot", "river", "runway",
    "sparseresidential", "storagetanks", "tenniscourt")


def ucm_label(filename: str) -> int:
    """Scene class of a UCM-Captions image. Numbered names ``n.tif`` (n = 1..2100) are taken to
    follow the UC Merced class order, 100 images per class: label = (n - 1) // 100. Names
    with a class prefix (``airplane_12.tif``) use the prefix. Anything else: -1."""
    stem = pathlib.PurePosixPath(filename.replace("\\", "/")).stem
    if stem.isdigit() and 1 <= int(stem) <= 100 * len(UCM_CLASSES):
        return (int(stem) - 1) // 100
    return label_from_filename(filename, {c: k for k, c in enumerate(UCM_CLASSES)})


class UcmCaptions(KarpathyPirBuilder):
    """UCM-Captions (Qu et al. 2016) from the user's local copy (``manual_dir``)."""

    BUILDER_CONFIGS = [KARPATHY_CONFIG, BITA_CONFIG]
    KARPATHY_FILE = "dataset.json"
    BITA_PREFIX = "UCM"
    IMAGE_DIRS = ("imgs", "images")
    DESCRIPTION = ("UCM-Captions: 2,100 UC Merced land-use images (256x256 .tif), 5 captions each, "
                   "21 scene classes; standard split 1,680 / 210 / 210. Labels assume the numbered "
                   "files follow the UC Merced class order, 100 per class.")
    CITATION = """@inproceedings{qu2016deep,
  title={Deep semantic understanding of high resolution remote sensing image},
  author={Qu, Bo and Li, Xuelong and Tao, Dacheng and Lu, Xiaoqiang},
  booktitle={CITS}, year={2016}}"""
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
Download UCM-Captions yourself (Qu et al. 2016; e.g. via https://github.com/201528014227051/RSICD_optimal)
and pass its folder as manual_dir. Config 'karpathy' (default) expects:
  <manual_dir>/dataset.json              the Karpathy-style annotation file (train/val/test)
  <manual_dir>/imgs/1.tif ... 2100.tif   the images (or <manual_dir>/images/, or <manual_dir>/)
Config 'bita' expects BITA's own lists (from the BITA authors' download) instead:
  <manual_dir>/annotations/UCM_train.json, UCM_val.json, UCM_test.json   (LAVIS-style lists)
  <manual_dir>/annotations/UCM_val_gt.json, UCM_test_gt.json             (COCO-format references)
  images under <manual_dir>/images/ (or imgs/, or <manual_dir>/); the lists may also sit
  directly in <manual_dir>.
"""

    def _scene_labels(self, splits):
        for rec in (r for v in splits.values() for r in v):
            rec.label = ucm_label(rec.filename)
        return list(UCM_CLASSES)


class SydneyCaptions(KarpathyPirBuilder):
    """Sydney-Captions (Qu et al. 2016) from the user's local copy (``manual_dir``)."""

    BUILDER_CONFIGS = [KARPATHY_CONFIG, BITA_CONFIG]
    KARPATHY_FILE = "dataset.json"
    BITA_PREFIX = "Sydney"
    IMAGE_DIRS = ("imgs", "images")
    DESCRIPTION = ("Sydney-Captions: 613 images (500x500 .tif), 5 captions each, 7 scene classes; "
                   "standard split 497 / 58 / 58. The numbered file names carry no class, so "
                   "labels are -1 unless the names have a class prefix.")
    CITATION = UcmCaptions.CITATION
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
Download Sydney-Captions yourself (Qu et al. 2016; e.g. via https://github.com/201528014227051/RSICD_optimal)
and pass its folder as manual_dir. Config 'karpathy' (default) expects:
  <manual_dir>/dataset.json              the Karpathy-style annotation file (train/val/test)
  <manual_dir>/imgs/1.tif ... 613.tif    the images (or <manual_dir>/images/, or <manual_dir>/)
Config 'bita' expects lists in BITA's format instead:
  <manual_dir>/annotations/Sydney_train.json, Sydney_val.json, Sydney_test.json
  <manual_dir>/annotations/Sydney_val_gt.json, Sydney_test_gt.json   (COCO-format references)
"""


# ----------------------------------------------------------------------------- NWPU
NWPU_CAPTION_FIELDS = ("raw", "raw_1", "raw_2", "raw_3", "raw_4")


def parse_nwpu(path: pathlib.Path, encodings=("utf-8",), note=None):
    """``dataset_nwpu.json`` -> ({split: [ImageRecord]}, class names = sorted categories).

    File names become ``<category>/<filename>`` (where the images are). ``imgid`` is the
    image id when it is unique over the whole file; otherwise every image is renumbered by
    its position (categories in sorted order) and ``note(reason, msg)`` is told.
    """
    data, encoding = read_json(path, encodings)
    if not isinstance(data, dict) or not data or not all(isinstance(v, list) for v in data.values()):
        raise DatasetError(f"{path}: expected a JSON object mapping each category to a list of "
                           "images (NWPU-Captions format)")
    class_names = sorted(data)
    splits: dict[str, list[ImageRecord]] = collections.defaultdict(list)
    records = []
    for label, category in enumerate(class_names):
        for i, row in enumerate(data[category]):
            where = f"{path} [{category!r}][{i}]"
            filename = _field(row, "filename", str, where)
            where = f"{where} ({filename})"
            split = _field(row, "split", str, where)
            if split not in KARPATHY_SPLITS:
                raise DatasetError(f"{where}: field 'split' is {split!r}, expected one of {KARPATHY_SPLITS}")
            captions = [_field(row, f, str, where) for f in NWPU_CAPTION_FIELDS]
            image_id = _field(row, "imgid", int, where)
            rec = ImageRecord(filename=f"{category}/{filename}", image_id=image_id,
                              captions=captions, label=label, where=where, label_name=category)
            splits[split].append(rec)
            records.append(rec)
    if len({r.image_id for r in records}) != len(records):
        if note:
            note("imgid_not_unique", f"{path}: field 'imgid' repeats across categories; image ids "
                                     "are the images' positions in the file instead")
        for k, rec in enumerate(records):
            rec.image_id = k
    return dict(splits), class_names, encoding


NWPU_CONFIG = AnnotationConfig(
    name="official", annotations="nwpu",
    description="The official dataset_nwpu.json with its standard splits.")


class NwpuCaptions(KarpathyPirBuilder):
    """NWPU-Captions (Cheng et al. 2022) from the user's local copy (``manual_dir``)."""

    BUILDER_CONFIGS = [NWPU_CONFIG, BITA_CONFIG]
    # builders.build(..., config="karpathy") means "the official file" for every dataset
    CONFIG_ALIASES = {"karpathy": "official"}
    KARPATHY_FILE = "dataset_nwpu.json"  # what source_files fingerprints for 'official'
    BITA_PREFIX = "NWPU"
    IMAGE_DIRS = ("NWPU_images", "images")
    IMAGES_BY_SCENE = True  # <root>/<category>/<file> is tried for names without a folder
    DESCRIPTION = ("NWPU-Captions: 31,500 NWPU-RESISC45 images (256x256 .jpg), 5 captions each, "
                   "45 scene classes (label = index of the sorted category names); standard split "
                   "25,200 / 3,150 / 3,150.")
    CITATION = """@article{cheng2022nwpu,
  title={NWPU-Captions Dataset and MLCA-Net for Remote Sensing Image Captioning},
  author={Cheng, Qimin and Huang, Haiyan and Xu, Yuan and Zhou, Yuzhuo and Li, Huanying and Wang, Zhongyuan},
  journal={IEEE Transactions on Geoscience and Remote Sensing}, year={2022}}"""
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
Download NWPU-Captions yourself (https://github.com/HaiyanHuang98/NWPU-Captions; the images are
NWPU-RESISC45) and pass its folder as manual_dir. Config 'official' (default) expects:
  <manual_dir>/dataset_nwpu.json                     the annotation file, keyed by category
  <manual_dir>/NWPU_images/<category>/<filename>     the 31,500 images (or images/<category>/..., or
                                                     <manual_dir>/<category>/...)
Config 'bita' expects BITA's own lists (from the BITA authors' download) instead:
  <manual_dir>/annotations/NWPU_train.json, NWPU_val.json, NWPU_test.json   (LAVIS-style lists)
  <manual_dir>/annotations/NWPU_val_gt.json, NWPU_test_gt.json             (COCO-format references)
  images as above (a list entry may name <category>/<file> or just <file>).
"""

    def _read_other(self, manual, kind):
        if kind != "nwpu":
            return super()._read_other(manual, kind)
        path = manual_file(manual, self.KARPATHY_FILE, self.MANUAL_DOWNLOAD_INSTRUCTIONS)

        def note(reason, msg):
            for split in KARPATHY_SPLITS:
                self._parse_notes[split].append((reason, msg))

        splits, class_names, enc = parse_nwpu(path, self.ENCODINGS, note)
        return splits, class_names, {path.name: enc}
