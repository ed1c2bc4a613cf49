"""`python -m rsvl_jax.caption` on a folder of generated images (JPEG, PNG, an 8-bit TIFF, a
16-bit 4-band GeoTIFF-style TIFF and a corrupt file) with a tiny random BITA: one record per
readable image, the corrupt file named and skipped, a page whose thumbnails all load in Chromium."""
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import tifffile
from flax import nnx
from PIL import Image

from rsvl_jax import caption, checkpoint, parallel, tasks
from rsvl_jax.config import load_config
from rsvl_jax.data import synthetic
from tests import browser

REPO = pathlib.Path(__file__).resolve().parents[2]
SPEC = f"{REPO}/configs/bita.py:stage=caption,demo"


def write_image_folder(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """Five files: a.jpg, sub/b.png, c8.tif (8-bit RGB), geo16.tif (16-bit, 4 bands, band-sequential)
    and broken.jpg (not an image)."""
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    scenes = [e["image"] for e in synthetic.generate(4, "test", seed=3, image_size=96)]
    files = {"jpeg": folder / "a.jpg", "png": folder / "sub" / "b.png", "tiff8": folder / "c8.tif",
             "geotiff16": folder / "geo16.tif", "corrupt": folder / "broken.jpg"}
    Image.fromarray(scenes[0]).save(files["jpeg"], quality=92)
    Image.fromarray(scenes[1]).save(files["png"])
    tifffile.imwrite(files["tiff8"], scenes[2])
    rgb16 = scenes[3].astype(np.uint16) * 180 + 1000
    nir = (rgb16[..., 1:2] // 2).astype(np.uint16)
    tifffile.imwrite(files["geotiff16"], np.concatenate([rgb16, nir], -1).transpose(2, 0, 1),
                     photometric="minisblack", planarconfig="separate")
    files["corrupt"].write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return files


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("caption")
    files = write_image_folder(tmp / "images")
    overrides = [f"--config.workdir={tmp / 'run'}", f"--config.data.data_dir={tmp / 'data'}"]
    config = load_config(SPEC, overrides)
    task = tasks.get(config)
    mesh = parallel.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        model = parallel.init_sharded(task.make_model, mesh, tuple(tuple(r) for r in config.sharding_rules))
        checkpoint.save_params(tmp / "ckpt", nnx.state(model, task.saved))
    return tmp, files, [f"--config={SPEC}", *overrides, "--checkpoint", str(tmp / "ckpt")]


def _records(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def test_a_folder_is_captioned_and_the_page_renders(setup, capsys):
    tmp, files, args = setup
    out = tmp / "out"
    assert caption.main([*args, str(tmp / "images"), "--out", str(out), "--alternatives", "2",
                         "--batch-size", "3"]) == 0
    printed = capsys.readouterr()
    records = _records(out / "captions.jsonl")
    readable = sorted(str(p) for k, p in files.items() if k != "corrupt")
    assert sorted(r["path"] for r in records) == readable
    for r in records:
        assert isinstance(r["caption"], str) and np.isfinite(r["score"]) and r["image_size"] == [96, 96]
        assert "window" not in r and len(r["alternatives"]) <= 2
        assert all(a["score"] <= r["score"] + 1e-6 for a in r["alternatives"])  # best first
    assert str(files["corrupt"]) in printed.err and "skipped" in printed.err
    assert f"unreadable: {files['corrupt']}" in printed.out
    assert "4 captions of 4 image files, 1 unreadable file skipped" in printed.out

    page = browser.render(out / "captions.html", tmp / "captions.png")
    page.assert_all_images_loaded(at_least=4)
    assert page.cards == 4
    assert not browser.is_blank(page.screenshot)


@pytest.mark.slow
def test_tiles_record_their_pixel_window(setup, capsys):
    tmp, _, args = setup
    big = tmp / "big"
    big.mkdir()
    scene = synthetic.generate(1, "val", seed=1, image_size=150)[0]["image"][:, :100]  # 150 x 100
    Image.fromarray(scene).save(big / "wide.png")
    assert caption.main([*args, str(big), "--out", str(tmp / "tiles"), "--tile"]) == 0
    windows = sorted(tuple(r["window"]) for r in _records(tmp / "tiles" / "captions.jsonl"))
    # 64 px model input: x starts 0, 36; y starts 0, 64, 86 (the last tile aligned with the edge)
    assert windows == sorted((x, y, x + 64, y + 64) for y in (0, 64, 86) for x in (0, 36))


def test_cli_help_and_a_missing_folder_is_one_error_line(setup):
    tmp, _, args = setup
    help_ = subprocess.run([sys.executable, "-m", "rsvl_jax.caption", "--help"], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    assert help_.returncode == 0 and "--alternatives" in help_.stdout and "--bands" in help_.stdout
    missing = subprocess.run([sys.executable, "-m", "rsvl_jax.caption", *args, str(tmp / "nowhere")], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2, missing.stderr
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nowhere" in lines[0], lines
