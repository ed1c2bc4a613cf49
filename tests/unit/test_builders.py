"""Builders: PIR-format and Karpathy-format files -> array_record datasets (no TensorFlow)."""
import json
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from rsvl_jax.data import builders as B
from rsvl_jax.data import synthetic
from rsvl_jax.data.builders import karpathy as K
from rsvl_jax.data.builders.common import DatasetError, decode_image, scene_from_filename

tfds.disable_progress_bar()
PIR_DIR = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "annotations" / "pir_format"


def _load(name):
    return json.loads((PIR_DIR / name).read_text())


def _write_image(path: pathlib.Path, seed: int, size=(8, 6)) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)  # format from the suffix: .tif / .jpg / .png
    return arr


def _pir_manual(root: pathlib.Path, n_train=23, n_eval=4, edit=None) -> pathlib.Path:
    """A truncated copy of the real RSITMD PIR files plus tiny stand-in images."""
    files = {"rsitmd_train.json": _load("rsitmd_train.json")[:n_train],
             "rsitmd_val.json": _load("rsitmd_val.json")[:n_eval],
             "rsitmd_test.json": _load("rsitmd_test.json")[:n_eval]}
    if edit:
        edit(files)
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        (root / name).write_text(json.dumps(rows))
        for k, row in enumerate(rows):
            if not (root / row["image"]).exists():
                _write_image(root / row["image"], seed=k)
    return root


def _build(cls, tmp_path, manual, config, **kw):
    b = cls(data_dir=str(tmp_path / "out"), config=config, **kw)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    return b


# ----------------------------------------------------------------------------- parsing only
def test_scene_from_filename():
    assert scene_from_filename("train/storagetanks_12.tif") == "storagetanks"
    assert scene_from_filename("denseresidential_3.jpg") == "denseresidential"
    assert scene_from_filename("val/00017.jpg") is None


def test_parse_full_pir_files():
    records, enc = K.parse_pir_train(PIR_DIR / "rsitmd_train.json")
    test, _ = K.parse_pir_eval(PIR_DIR / "rsitmd_test.json")
    val, _ = K.parse_pir_eval(PIR_DIR / "rsitmd_val.json")
    assert all(r.label == B.UNKNOWN_LABEL for r in test)  # the test file has no labels
    names = K.assign_labels([records, val, test])
    rows = _load("rsitmd_train.json")
    assert enc == "utf-8" and len(records) == 3435 and len(names) == 33
    assert sum(len(r.captions) for r in records) == len(rows) == 17175
    # record index == PIR's contiguous idx (order of first appearance of image_id)
    first_seen = list(dict.fromkeys(r["image_id"] for r in rows))
    assert [r.image_id for r in records] == first_seen
    assert names[0] == "bridge" and names[18] == "plane" and names[32] == "boat"
    by_id = {r.image_id: r for r in records}
    for row in rows[::997]:
        rec = by_id[row["image_id"]]
        assert row["caption"] in rec.captions and rec.label == row["label"]
        assert names[rec.label] == row["label_name"]
    assert len(test) == 452 and all(len(r.captions) == 5 for r in test)
    assert all(names[r.label] == scene_from_filename(r.filename) for r in test)
    assert [r.label for r in val] == [row["label"] for row in _load("rsitmd_val.json")]

    rsicd, _ = K.parse_pir_eval(PIR_DIR / "rsicd_test.json")
    rsicd_names = K.class_names_from_filenames(r.filename for r in rsicd)
    assert len(rsicd_names) == 30 and len(rsicd) == 1093
    labels = [K.label_from_filename(r.filename, {c: k for k, c in enumerate(rsicd_names)})
              for r in rsicd]
    assert labels.count(B.UNKNOWN_LABEL) == 66  # the images named only by a number


def test_conflicting_rows(tmp_path):
    rows = _load("rsitmd_train.json")
    other = next(i for i, r in enumerate(rows) if r["image_id"] != rows[0]["image_id"])
    bad = [dict(rows[0]), dict(rows[other], label=rows[0]["label"], label_name="not_bridge")]
    (tmp_path / "t.json").write_text(json.dumps(bad))
    records, _ = K.parse_pir_train(tmp_path / "t.json")
    with pytest.raises(DatasetError, match=r"t\.json row 1: label 0 is named 'not_bridge'"):
        K.assign_labels([records])
    same_image = [dict(rows[0]), dict(rows[0], label=5)]
    (tmp_path / "t.json").write_text(json.dumps(same_image))
    with pytest.raises(DatasetError, match=r"t\.json row 1: image_id \d+ has .* label 5"):
        K.parse_pir_train(tmp_path / "t.json")


# ----------------------------------------------------------------------------- PIR config
def test_build_rsitmd_pir(tmp_path):
    manual = _pir_manual(tmp_path / "manual")
    b = _build(B.Rsitmd, tmp_path, manual, "pir")
    train_rows = _load("rsitmd_train.json")[:23]
    ids = list(dict.fromkeys(r["image_id"] for r in train_rows))
    assert b.info.splits["train"].num_examples == len(ids)
    assert b.info.splits["val"].num_examples == 4 and b.info.splits["test"].num_examples == 4
    train = b.as_data_source("train")
    for k, image_id in enumerate(ids):
        ex = train[k]
        rows = [r for r in train_rows if r["image_id"] == image_id]
        assert ex["image_id"] == image_id and ex["label"] == rows[0]["label"]
        assert [c.decode() for c in ex["captions"]] == [r["caption"] for r in rows]
        assert ex["filename"].decode() == rows[0]["image"]
        assert ex["image"].shape == (6, 8, 3) and ex["image"].dtype == np.uint8
    names = B.class_names(b)
    assert names[train[0]["label"]] == train_rows[0]["label_name"]
    test = B.open_split(b, "test")  # images left encoded; file order kept
    test_rows = _load("rsitmd_test.json")[:4]
    assert [test[i]["filename"].decode() for i in range(4)] == [r["image"] for r in test_rows]
    assert isinstance(test[0]["image"], bytes)
    for i, row in enumerate(test_rows):  # no labels in the test file: from the name, if known
        prefix = scene_from_filename(row["image"])
        assert test[i]["label"] == (names.index(prefix) if prefix in names else B.UNKNOWN_LABEL)
    assert B.UNKNOWN_LABEL in [test[i]["label"] for i in range(4)]  # 'parking' is not in 23 rows
    report = b.info.metadata["build_report"]["train"]
    assert report["rows_in"] == report["examples_out"] == len(ids) and not report["dropped_rows"]
    # the metadata survives a reload from disk
    again = tfds.builder_from_directory(b.data_dir)
    assert again.info.metadata["class_names"] == names


# ----------------------------------------------------------------------------- Karpathy config
def _karpathy_manual(root: pathlib.Path) -> tuple[pathlib.Path, dict]:
    images = [("airport_1.jpg", "train"), ("bridge_2.jpg", "train"), ("00017.jpg", "train"),
              ("airport_3.jpg", "val"), ("beach_4.jpg", "val"), ("bridge_5.jpg", "test")]
    data, pixels = {"dataset": "rsicd", "images": []}, {}
    sent = 0
    for i, (name, split) in enumerate(images):
        pixels[name] = _write_image(root / "RSICD_images" / name, seed=i, size=(10, 7))
        raws = [f"Image {i}, caption {j}." for j in range(5)]
        if i == 1:
            raws[2] = "a bridge over the river 河流 ."  # non-ASCII: the file is written as gb18030
        data["images"].append({
            "filename": name, "imgid": i, "split": split, "sentids": list(range(sent, sent + 5)),
            "sentences": [{"raw": r, "tokens": r.split(), "imgid": i, "sentid": sent + j}
                          for j, r in enumerate(raws)]})
        sent += 5
    (root / "dataset_rsicd.json").write_bytes(json.dumps(data, ensure_ascii=False).encode("gb18030"))
    return root, pixels


def test_build_rsicd_karpathy_gb18030(tmp_path):
    manual, pixels = _karpathy_manual(tmp_path / "manual")
    with pytest.raises(UnicodeDecodeError):
        (manual / "dataset_rsicd.json").read_bytes().decode("utf-8")
    b = _build(B.Rsicd, tmp_path, manual, "karpathy")
    assert {s: b.info.splits[s].num_examples for s in ("train", "val", "test")} == \
        {"train": 3, "val": 2, "test": 1}
    assert B.class_names(b) == ["airport", "beach", "bridge"]
    assert b.info.metadata["annotation_encoding"] == {"dataset_rsicd.json": "gb18030"}
    train = b.as_data_source("train")
    assert [int(train[i]["label"]) for i in range(3)] == [0, 2, B.UNKNOWN_LABEL]
    assert [int(train[i]["image_id"]) for i in range(3)] == [0, 1, 2]
    assert train[1]["captions"][2].decode() == "a bridge over the river 河流 ."
    assert b.info.metadata["build_report"]["train"]["notes"] == {"unknown_label": 1}
    # JPEG bytes are kept as they are: decoding gives what PIL gives for the original file
    src = B.open_split(b, "val")
    with Image.open(manual / "RSICD_images" / "airport_3.jpg") as im:
        assert np.array_equal(decode_image(src[0]["image"]), np.asarray(im.convert("RGB")))


def test_karpathy_structure_errors(tmp_path):
    path = tmp_path / "dataset_rsicd.json"
    path.write_text(json.dumps([{"filename": "a_1.jpg"}]))
    with pytest.raises(DatasetError, match=r"dataset_rsicd\.json: expected a JSON object with an 'images'"):
        K.parse_karpathy(path)
    ok = {"filename": "a_1.jpg", "split": "train", "sentences": [{"raw": "x"}]}
    path.write_text(json.dumps({"images": [ok, {"filename": "b_2.jpg", "split": "train"}]}))
    with pytest.raises(DatasetError, match=r"images\[1\] \(b_2\.jpg\): missing field 'sentences'"):
        K.parse_karpathy(path)
    path.write_text(json.dumps({"images": [dict(ok, split="dev")]}))
    with pytest.raises(DatasetError, match=r"images\[0\] \(a_1\.jpg\): field 'split' is 'dev'"):
        K.parse_karpathy(path)


def test_missing_annotation_file_names_it(tmp_path):
    (tmp_path / "manual").mkdir()
    _write_image(tmp_path / "manual" / "images" / "x_1.tif", 0)
    with pytest.raises(DatasetError, match=r"dataset_RSITMD\.json.*RSITMD"):
        _build(B.Rsitmd, tmp_path, tmp_path / "manual", "karpathy")


# ----------------------------------------------------------------------------- bad input
def _drop_label(files):
    del files["rsitmd_train.json"][3]["label"]


def _empty_caption(files):
    files["rsitmd_test.json"][1]["caption"][2] = " ... ?! "


def _bad_type(files):
    files["rsitmd_val.json"][2]["caption"] = "not a list"


@pytest.mark.parametrize("edit,pattern", [
    (_drop_label, r"rsitmd_train\.json row 3: missing field 'label'"),
    (_empty_caption, r"rsitmd_test\.json row 1: caption 2 .* empty after normalisation"),
    (_bad_type, r"rsitmd_val\.json row 2: field 'caption' should be list"),
])
def test_bad_rows_name_file_and_row(tmp_path, edit, pattern):
    manual = _pir_manual(tmp_path / "manual", edit=edit)
    with pytest.raises(DatasetError, match=pattern):
        _build(B.Rsitmd, tmp_path, manual, "pir")


def test_missing_and_undecodable_images(tmp_path):
    manual = _pir_manual(tmp_path / "manual")
    test_rows = _load("rsitmd_test.json")[:4]
    (manual / test_rows[1]["image"]).unlink()
    with pytest.raises(DatasetError, match=r"rsitmd_test\.json row 1: image 'test/park_217\.tif' not found"):
        _build(B.Rsitmd, tmp_path, manual, "pir")
    _write_image(manual / test_rows[1]["image"], 0)
    (manual / test_rows[2]["image"]).write_bytes(b"this is not an image")
    with pytest.raises(DatasetError, match=r"rsitmd_test\.json row 2: cannot decode image"):
        _build(B.Rsitmd, tmp_path, manual, "pir")


def test_malformed_json(tmp_path):
    manual = _pir_manual(tmp_path / "manual")
    (manual / "rsitmd_val.json").write_text('[{"image": "val/x_1.tif", "caption": [}')
    with pytest.raises(DatasetError, match=r"rsitmd_val\.json: malformed JSON"):
        _build(B.Rsitmd, tmp_path, manual, "pir")


def test_skip_mode_drops_and_reports(tmp_path):
    manual = _pir_manual(tmp_path / "manual", edit=_empty_caption)
    test_rows = _load("rsitmd_test.json")[:4]
    (manual / test_rows[3]["image"]).unlink()
    b = _build(B.Rsitmd, tmp_path, manual, "pir", on_error="skip")
    report = b.info.metadata["build_report"]["test"]
    assert report["rows_in"] == 4 and report["examples_out"] == 3
    assert report["dropped_rows"] == {"missing_image": 1}
    assert report["dropped_captions"] == {"empty_caption": 1}
    assert any("parking" in m or "row 3" in m for m in report["messages"])
    test = b.as_data_source("test")
    assert len(test) == 3 and len(test[1]["captions"]) == 4


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_builder(tmp_path):
    b = B.build("synthetic", tmp_path, config=B.synthetic_config(12, 5, 5, image_size=32, seed=7))
    assert {s: b.info.splits[s].num_examples for s in ("train", "val", "test")} == \
        {"train": 12, "val": 5, "test": 5}
    assert B.class_names(b) == list(synthetic.CLASS_NAMES)
    ref = synthetic.generate(5, "val", seed=7, image_size=32)
    src = B.open_split(b, "val", decode=True)
    for i in range(5):
        assert np.array_equal(src[i]["image"], ref[i]["image"])  # PNG is lossless
        assert [c.decode() for c in src[i]["captions"]] == ref[i]["captions"]
        assert src[i]["label"] == ref[i]["label"] and src[i]["image_id"] == ref[i]["image_id"]
    assert b.info.metadata["build_report"]["val"]["examples_out"] == 5
