"""No stale cache: a built dataset records its source and every open checks it."""
import json
import logging
import shutil

import pytest
import tensorflow_datasets as tfds

from rsvl_jax.data import builders as B
from rsvl_jax.data.builders import cache
from rsvl_jax.data.builders.common import DatasetError

from tests.unit.test_caption_builders import UCM_FILES, karpathy_manual

tfds.disable_progress_bar()


def first_caption(b):
    return B.open_split(b, "train")[0]["captions"][0].decode()


def test_changed_caption_rebuilds_never_old(tmp_path, caplog):
    manual = karpathy_manual(tmp_path / "ucm", UCM_FILES)
    out = tmp_path / "out"
    b1 = B.build("ucm_captions", out, manual_dir=manual)
    src = b1.info.metadata["source"]
    assert src["builder"] == "ucm_captions" and src["config"]["annotations"] == "karpathy"
    assert src["images"]["count"] == 6 and src["files"][0]["name"] == "dataset.json"
    assert len(src["files"][0]["sha256"]) == 64 and src["on_error"] == "raise"
    assert B.build("ucm_captions", out, manual_dir=manual).data_dir == b1.data_dir  # reused

    edited = tmp_path / "ucm2"
    shutil.copytree(manual, edited)
    data = json.loads((edited / "dataset.json").read_text())
    data["images"][0]["sentences"][0]["raw"] = "a changed caption"
    (edited / "dataset.json").write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        b2 = B.build("ucm_captions", out, manual_dir=edited)
    assert b2.data_dir != b1.data_dir
    assert first_caption(b2) == "a changed caption"
    assert "dataset.json changed" in caplog.text
    assert first_caption(B.build("ucm_captions", out, manual_dir=manual)) != "a changed caption"

    # an image added (same annotations) is a different source too
    shutil.copy(edited / "imgs" / "1.tif", edited / "imgs" / "3000.tif")
    b3 = B.build("ucm_captions", out, manual_dir=edited)
    assert b3.data_dir not in (b1.data_dir, b2.data_dir)


def test_missing_manual_dir(tmp_path):
    manual = karpathy_manual(tmp_path / "ucm", UCM_FILES)
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=r"ucm_captions/karpathy \(on_error=raise\) is not built"):
        B.build("ucm_captions", out)
    b = B.build("ucm_captions", out, manual_dir=manual)
    with pytest.raises(DatasetError, match=r"manual_dir .*nowhere does not exist"):
        B.build("ucm_captions", out, manual_dir=tmp_path / "nowhere")
    # not naming one reuses the only build with these settings
    assert B.build("ucm_captions", out).data_dir == b.data_dir
    with pytest.raises(DatasetError, match="is not built"):  # other settings: no such build
        B.build("ucm_captions", out, on_error="skip")
    edited = tmp_path / "ucm2"
    shutil.copytree(manual, edited)
    (edited / "imgs" / "1.tif").unlink()
    B.build("ucm_captions", out, manual_dir=edited, on_error="skip")
    B.build("ucm_captions", out, manual_dir=manual, on_error="skip")
    with pytest.raises(DatasetError, match=r"2 builds of ucm_captions/karpathy .* pass manual_dir"):
        B.build("ucm_captions", out, on_error="skip")


def test_synthetic_needs_no_manual_dir(tmp_path):
    cfg = B.synthetic_config(4, 2, 2, image_size=32, seed=3)
    b1 = B.build("synthetic", tmp_path, config=cfg)
    assert b1.info.metadata["source"]["config"]["seed"] == 3
    assert B.build("synthetic", tmp_path, config=cfg).data_dir == b1.data_dir
    b2 = B.build("synthetic", tmp_path, config=B.synthetic_config(4, 2, 2, image_size=32, seed=4))
    assert b2.data_dir != b1.data_dir


def test_difference_names_first_change():
    a = {"builder": "x", "config": {"a": 1}, "files": [{"name": "f", "size": 1, "sha256": "0" * 64}],
         "images": {"count": 1, "bytes": 3}}
    assert cache.difference(a, dict(a, config={"a": 2})) == "config {'a': 1} -> {'a': 2}"
    assert cache.difference(a, dict(a, images={"count": 2, "bytes": 3})).startswith("image files")
    assert cache.difference(a, dict(a, files=[])) == "f is gone"
