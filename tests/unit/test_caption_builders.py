"""Caption builders: UCM/Sydney/RSICD (Karpathy), NWPU (category-keyed), BITA's LAVIS lists."""
import json
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from rsvl_jax.data import builders as B
from rsvl_jax.data.builders import bita_lists
from rsvl_jax.data.builders.caption_sets import UCM_CLASSES, parse_nwpu, ucm_label
from rsvl_jax.data.builders.common import DatasetError

tfds.disable_progress_bar()


def write_image(path: pathlib.Path, seed: int, size=(12, 10), mode="RGB") -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path)  # the suffix picks the format: .tif / .jpg
    return np.asarray(im.convert("RGB"))


def caps(i):
    return [f"Image {i} caption {j}." for j in range(5)]


def karpathy_manual(root, names_splits, image_dir="imgs", mode="RGB"):
    data = {"dataset": "x", "images": []}
    for i, (name, split) in enumerate(names_splits):
        write_image(root / image_dir / name, i, mode=mode)
        data["images"].append({
            "filename": name, "imgid": i, "split": split, "sentids": list(range(5 * i, 5 * i + 5)),
            "sentences": [{"raw": r, "tokens": r.split(), "imgid": i, "sentid": 5 * i + j}
                          for j, r in enumerate(caps(i))]})
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(data))
    return root


def build(name, tmp_path, manual, config=None, **kw):
    return B.build(name, tmp_path / "out", config=config, manual_dir=manual, **kw)


def split_counts(b):
    return {s: b.info.splits[s].num_examples for s in b.info.splits}


UCM_FILES = [("1.tif", "train"), ("101.tif", "train"), ("250.tif", "train"),
             ("2100.tif", "val"), ("5.tif", "test"), ("1999.tif", "test")]


def test_ucm_karpathy_tif(tmp_path):
    manual = karpathy_manual(tmp_path / "ucm", UCM_FILES, mode="P")  # palette TIFF -> RGB
    b = build("ucm_captions", tmp_path, manual)
    assert b.builder_config.name == "karpathy"
    assert split_counts(b) == {"train": 3, "val": 1, "test": 2}
    assert B.class_names(b) == list(UCM_CLASSES) and len(UCM_CLASSES) == 21
    train = B.open_split(b, "train", decode=True)
    assert [int(train[i]["label"]) for i in range(3)] == [0, 1, 2]  # 100 images per class
    assert [int(train[i]["image_id"]) for i in range(3)] == [0, 1, 2]
    assert [c.decode() for c in train[1]["captions"]] == caps(1)
    assert train[0]["filename"].decode() == "1.tif"
    with Image.open(manual / "imgs" / "1.tif") as im:
        assert np.array_equal(train[0]["image"], np.asarray(im.convert("RGB")))
    test = B.open_split(b, "test")
    assert [int(test[i]["label"]) for i in range(2)] == [0, 19]
    assert B.open_split(b, "val")[0]["label"] == 20
    assert ucm_label("airplane_3.tif") == 1 and ucm_label("x.tif") == B.UNKNOWN_LABEL


def test_sydney_karpathy(tmp_path):
    files = [(f"{k}.tif", s) for k, s in zip(range(1, 8), ["train"] * 4 + ["val", "test", "test"])]
    b = build("sydney_captions", tmp_path, karpathy_manual(tmp_path / "syd", files, "images"))
    assert split_counts(b) == {"train": 4, "val": 1, "test": 2}
    src = B.open_split(b, "test")
    assert all(len(src[i]["captions"]) == 5 for i in range(2))
    assert {int(src[i]["label"]) for i in range(2)} == {B.UNKNOWN_LABEL}  # numbers carry no class
    assert b.info.metadata["build_report"]["train"]["notes"] == {"unknown_label": 4}


def test_karpathy_duplicate_imgid_is_named(tmp_path):
    manual = karpathy_manual(tmp_path / "ucm", UCM_FILES)
    data = json.loads((manual / "dataset.json").read_text())
    data["images"][3]["imgid"] = 1
    (manual / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"dataset\.json images\[3\] \(2100\.tif\): field 'imgid' 1"):
        build("ucm_captions", tmp_path, manual)


# ----------------------------------------------------------------------------- NWPU
def nwpu_manual(root, edit=None):
    data, k = {}, 0
    for cat, splits in [("airplane", ["train", "train", "val"]), ("baseball_diamond", ["train", "test"]),
                        ("airport", ["test"])]:
        data[cat] = []
        for n, split in enumerate(splits):
            fn = f"{cat}_{n + 1:03d}.jpg"
            write_image(root / "NWPU_images" / cat / fn, k)
            row = {"filename": fn, "imgid": k, "split": split}
            for f, c in zip(("raw", "raw_1", "raw_2", "raw_3", "raw_4"), caps(k)):
                row[f] = c
            row.update({"sentids": 5 * k, "sentids_1": 5 * k + 1})
            data[cat].append(row)
            k += 1
    if edit:
        edit(data)
    (root / "dataset_nwpu.json").write_text(json.dumps(data))
    return root


def test_nwpu_official(tmp_path):
    b = build("nwpu_captions", tmp_path, nwpu_manual(tmp_path / "nwpu"))
    assert b.builder_config.name == "official"
    assert B.build("nwpu_captions", tmp_path / "out", config="karpathy",
                   manual_dir=tmp_path / "nwpu").data_dir == b.data_dir  # alias
    assert split_counts(b) == {"train": 3, "val": 1, "test": 2}
    assert B.class_names(b) == ["airplane", "airport", "baseball_diamond"]  # sorted categories
    train = B.open_split(b, "train")
    assert [train[i]["filename"].decode() for i in range(3)] == [
        "airplane/airplane_001.jpg", "airplane/airplane_002.jpg", "baseball_diamond/baseball_diamond_001.jpg"]
    assert [int(train[i]["label"]) for i in range(3)] == [0, 0, 2]
    assert [c.decode() for c in train[2]["captions"]] == caps(3)
    test = B.open_split(b, "test")
    ids = [int(test[i]["image_id"]) for i in range(2)]
    assert sorted(ids) == [4, 5] and [int(test[i]["label"]) for i in range(2)] == [1, 2]


def test_nwpu_errors_and_repeated_imgid(tmp_path):
    def drop_raw3(data):
        del data["airport"][0]["raw_3"]
    with pytest.raises(DatasetError, match=r"dataset_nwpu\.json \['airport'\]\[0\] \(airport_001\.jpg\): "
                                           r"missing field 'raw_3'"):
        parse_nwpu(nwpu_manual(tmp_path / "a", drop_raw3) / "dataset_nwpu.json")
    notes = []

    def same_ids(data):
        for rows in data.values():
            for n, row in enumerate(rows):
                row["imgid"] = n  # per-category ids
    splits, _, _ = parse_nwpu(nwpu_manual(tmp_path / "b", same_ids) / "dataset_nwpu.json",
                              note=lambda *a: notes.append(a))
    ids = [r.image_id for v in splits.values() for r in v]
    assert sorted(ids) == list(range(6)) and notes[0][0] == "imgid_not_unique"


# ----------------------------------------------------------------------------- BITA lists
def bita_manual(root, prefix, names, image_dir="images", edit=None):
    """names: {split: [file names]}; train rows one per caption; val/test lists + *_gt.json."""
    ann = root / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    files, k = {}, 0
    for split, fns in names.items():
        rows, gt = [], {"images": [], "annotations": []}
        for fn in fns:
            write_image(root / image_dir / fn, k)
            image_id = bita_lists.reference_image_id(fn)
            if split == "train":
                rows += [{"image": fn, "caption": c, "image_id": f"{prefix}_{k}"} for c in caps(k)]
            else:
                rows.append({"image": fn, "image_id": image_id, "instance_id": str(len(rows))})
                gt["images"].append({"id": image_id})
                gt["annotations"] += [{"image_id": image_id, "caption": c, "id": len(gt["annotations"])}
                                      for c in caps(k)]
            k += 1
        files[f"{prefix}_{split}.json"] = rows
        if split != "train":
            files[f"{prefix}_{split}_gt.json"] = gt
    if edit:
        edit(files)
    for name, data in files.items():
        (ann / name).write_text(json.dumps(data))
    return root


def test_rsicd_bita_lists(tmp_path):
    names = {"train": ["airport_1.jpg", "beach_2.jpg", "00017.jpg"],
             "val": ["airport_3.jpg", "bridge_4.jpg"], "test": ["beach_5.jpg"]}
    b = build("rsicd", tmp_path, bita_manual(tmp_path / "rsicd", "RSICD", names), "bita")
    assert split_counts(b) == {"train": 3, "val": 2, "test": 1}
    assert B.class_names(b) == ["airport", "beach", "bridge"]
    train = B.open_split(b, "train")
    assert [int(train[i]["image_id"]) for i in range(3)] == [0, 1, 2]  # string ids -> positions
    assert [int(train[i]["label"]) for i in range(3)] == [0, 1, B.UNKNOWN_LABEL]
    assert all(len(train[i]["captions"]) == 5 for i in range(3))
    val = B.open_split(b, "val")
    assert [int(val[i]["image_id"]) for i in range(2)] == [3, 4]
    assert [c.decode() for c in val[1]["captions"]] == caps(4)  # the GT's references
    assert [int(val[i]["label"]) for i in range(2)] == [0, 2]


def test_ucm_bita_lists_and_nwpu_bita(tmp_path):
    names = {"train": ["1.tif", "150.tif"], "test": ["2000.tif", "7.tif"]}
    b = build("ucm_captions", tmp_path, bita_manual(tmp_path / "ucm", "UCM", names), "bita")
    assert split_counts(b) == {"train": 2, "test": 2}
    test = B.open_split(b, "test")
    assert [int(test[i]["image_id"]) for i in range(2)] == [2000, 7]  # the '.tif' ids work (Q9)
    assert [int(test[i]["label"]) for i in range(2)] == [19, 0]
    names = {"train": ["airplane/airplane_001.jpg"], "val": ["airport/airport_002.jpg"]}
    b = build("nwpu_captions", tmp_path, bita_manual(tmp_path / "nwpu", "NWPU", names, "NWPU_images"),
              "bita")
    assert split_counts(b) == {"train": 1, "val": 1}
    assert int(B.open_split(b, "val")[0]["image_id"]) == 2


def _collide(files):  # two different images with id 1 and no image_id field
    for row in files["RSICD_test.json"]:
        del row["image_id"]


def _not_in_gt(files):
    files["RSICD_test.json"][0]["image_id"] = 99


def _repeat(files):
    files["RSICD_test.json"].append(dict(files["RSICD_test.json"][0]))


@pytest.mark.parametrize("edit,pattern", [
    (_collide, r"RSICD_test\.json row 1: image id 1 of 'bridge_1\.jpg' is also the id of 'airport_1\.jpg'"),
    (_not_in_gt, r"RSICD_test\.json row 0: image id 99 \('airport_1\.jpg'\) is not in RSICD_test_gt\.json"),
])
def test_bita_eval_id_errors(tmp_path, edit, pattern):
    # 'airport_1' and 'bridge_1' share the reference's derived id 1 (Q9)
    second = "bridge_1.jpg" if edit is _collide else "bridge_2.jpg"
    manual = bita_manual(tmp_path / "m", "RSICD", {"test": ["airport_1.jpg", second]}, edit=edit)
    with pytest.raises(DatasetError, match=pattern):
        build("rsicd", tmp_path, manual, "bita")


def test_bita_repeated_row_kept_once_and_counted(tmp_path):
    names = {"test": ["airport_1.jpg", "bridge_2.jpg"]}
    b = build("rsicd", tmp_path, bita_manual(tmp_path / "m", "RSICD", names, edit=_repeat), "bita")
    assert split_counts(b) == {"test": 2}
    assert b.info.metadata["build_report"]["test"]["notes"] == {"duplicate_row": 1}


def test_bad_image_skip_counts(tmp_path):
    manual = karpathy_manual(tmp_path / "ucm", UCM_FILES)
    (manual / "imgs" / "5.tif").write_bytes(b"not a tiff")
    with pytest.raises(DatasetError, match=r"images\[4\] \(5\.tif\): cannot decode image"):
        build("ucm_captions", tmp_path, manual)
    b = build("ucm_captions", tmp_path, manual, on_error="skip")
    assert split_counts(b)["test"] == 1
    assert b.info.metadata["build_report"]["test"]["dropped_rows"] == {"bad_image": 1}


def test_instructions_name_the_files():
    assert "dataset.json" in B.UcmCaptions.MANUAL_DOWNLOAD_INSTRUCTIONS
    assert "UCM_test_gt.json" in B.UcmCaptions.MANUAL_DOWNLOAD_INSTRUCTIONS
    assert "dataset_nwpu.json" in B.NwpuCaptions.MANUAL_DOWNLOAD_INSTRUCTIONS
    assert "RSICD_val_gt.json" in B.Rsicd.MANUAL_DOWNLOAD_INSTRUCTIONS
    assert "'karpathy' (default)" not in B.Rsicd.MANUAL_DOWNLOAD_INSTRUCTIONS  # doc slip fixed
