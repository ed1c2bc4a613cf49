"""Reading your own images: TIFF/GeoTIFF bands and stretch, tiles, unreadable files skipped by name."""
import numpy as np
import pytest
import tifffile
from PIL import Image

from rsvl_jax.data import images
from rsvl_jax.data.transforms import EvalTransform


def _rgb(h=40, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_pil_formats_and_an_8bit_tiff_read_as_they_are(tmp_path):
    img = _rgb()
    Image.fromarray(img).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "b.tif", img)
    np.testing.assert_array_equal(images.read_image(tmp_path / "a.png"), img)
    np.testing.assert_array_equal(images.read_image(tmp_path / "b.tif"), img)


def test_a_16bit_4band_band_sequential_tiff_takes_the_first_three_bands_stretched(tmp_path):
    rng = np.random.default_rng(1)
    bands = rng.integers(200, 60000, (4, 50, 60)).astype(np.uint16)  # (S, Y, X), planar
    tifffile.imwrite(tmp_path / "g.tif", bands, photometric="minisblack", planarconfig="separate")
    out = images.read_image(tmp_path / "g.tif")
    assert out.shape == (50, 60, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], images.stretch_band(bands[c]))
        lo, hi = np.percentile(bands[c], (2, 98))
        assert out[..., c][bands[c] <= lo].max() == 0 and out[..., c][bands[c] >= hi].min() == 255
    false_colour = images.read_image(tmp_path / "g.tif", bands=(3, 2, 1))
    np.testing.assert_array_equal(false_colour[..., 0], images.stretch_band(bands[3]))
    grey = images.read_image(tmp_path / "g.tif", bands=(3,))
    assert (grey[..., 0] == grey[..., 2]).all()
    with pytest.raises(images.ImageReadError, match=r"g\.tif: band 7 .* has 4 bands"):
        images.read_image(tmp_path / "g.tif", bands=(7, 1, 2))


def test_band_interleaved_one_band_and_float_tiffs(tmp_path):
    rng = np.random.default_rng(2)
    five = rng.integers(0, 4000, (20, 24, 5)).astype(np.uint16)  # (Y, X, S), contiguous
    tifffile.imwrite(tmp_path / "five.tif", five, photometric="minisblack", planarconfig="contig")
    out = images.read_image(tmp_path / "five.tif", bands=(4, 0, 1))
    np.testing.assert_array_equal(out[..., 0], images.stretch_band(five[..., 4]))
    one = rng.normal(size=(16, 16)).astype(np.float32)
    one[0, 0] = np.nan  # nodata: ignored by the percentiles, drawn black
    tifffile.imwrite(tmp_path / "one.tif", one)
    grey = images.read_image(tmp_path / "one.tif")
    assert grey.shape == (16, 16, 3) and grey[0, 0, 0] == 0 and grey.max() == 255


def test_tiles_cover_the_image_and_align_with_its_edges():
    windows = images.tile_windows(150, 100, 64)
    assert windows == [(x, y, x + 64, y + 64) for y in (0, 64, 86) for x in (0, 36)]
    assert images.tile_windows(50, 70, 64) == [(0, 0, 64, 50), (6, 0, 70, 50)]
    img = _rgb(150, 100)
    assert images.views(img, 64) == [(None, img)]  # resized by the transform, not tiled
    tiles = images.views(img, 64, tile=True)
    assert len(tiles) == 6 and all(t.shape == (64, 64, 3) for _, t in tiles)
    np.testing.assert_array_equal(tiles[-1][1], img[86:150, 36:100])


def test_a_folder_is_batched_in_order_and_a_corrupt_file_is_reported_and_skipped(tmp_path):
    (tmp_path / "d" / "e").mkdir(parents=True)
    for i, name in enumerate(["d/1.png", "d/e/2.jpg", "d/3.tiff"]):
        path = tmp_path / name
        (tifffile.imwrite(path, _rgb(seed=i)) if name.endswith("tiff") else Image.fromarray(_rgb(seed=i)).save(path))
    (tmp_path / "d" / "0_bad.png").write_bytes(b"not a png")
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    files = images.find_images([tmp_path / "d"])
    assert [f.name for f in files] == ["0_bad.png", "1.png", "3.tiff", "2.jpg"]
    seen = []
    loader = images.FolderImages(files, EvalTransform(size=32), batch_size=2, thumb_size=16,
                                 on_error=lambda p, m: seen.append((p, m)))
    batches = list(loader)
    assert [b["mask"].tolist() for b in batches] == [[True, True], [True, False]]
    assert [p for b in batches for p in b["paths"]] == [str(f) for f in files[1:]]
    assert batches[0]["image"].shape == (2, 32, 32, 3) and max(batches[0]["thumbs"][0].shape[:2]) == 16
    assert len(seen) == 1 and seen[0][0] == str(files[0]) and "0_bad.png" in seen[0][1]
    assert [e.path for e in loader.errors] == [str(files[0])]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        images.find_images([tmp_path / "nowhere"])


def test_band_and_stretch_arguments():
    assert images.parse_bands("3,2,1") == (3, 2, 1) and images.parse_bands(None) is None
    assert images.parse_stretch("1,99") == (1.0, 99.0)
    for bad in ("1,2", "a", "-1"):
        with pytest.raises(images.ImageReadError):
            images.parse_bands(bad)
    with pytest.raises(images.ImageReadError):
        images.parse_stretch("99,1")
