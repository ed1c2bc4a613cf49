"""Your own images, as they come: files and folders -> uint8 RGB views -> model-input batches.

Used by `python -m rsvl_jax.caption` and `python -m rsvl_jax.search`; the pixels then go
through the task's evaluation transform, so a folder is preprocessed exactly as a test split.

Reading:

* JPEG, PNG, BMP, GIF, WebP: PIL, converted to RGB.
* TIFF / GeoTIFF (`.tif`, `.tiff`): `tifffile`, any sample type (8-, 16-bit, float) and any
  number of bands, band-interleaved (Y, X, S) or band-sequential (S, Y, X) as the file's
  series axes say. Band choice (`bands`): default the first three bands as R, G, B (a 1- or
  2-band image shows its first band as grey); or the 0-based band indices to use, one (grey)
  or three (R, G, B), e.g. `(3, 2, 1)` for a Sentinel-2-style near-infrared false colour.
  8-bit bands are kept as they are; every other sample type is stretched band by band from
  its `stretch` percentiles (default 2 and 98) to 0..255 (`stretch_8bit=True` stretches
  8-bit bands too). NaNs (nodata) are ignored by the percentiles and drawn black.

Images larger than the model input are resized to it (the evaluation transform, a bicubic
squash), or, with `tile=True`, cut into model-input-sized tiles (the last row and column of
tiles aligned with the image's edges, so they may overlap their neighbours); every view
carries its pixel window `(left, top, right, bottom)` (None = the whole image).

A file that cannot be read is reported (`on_error(path, message)`, and in `FolderImages.errors`)
and skipped: one bad file never loses a run.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from rsvl_jax.errors import UserError

PIL_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = PIL_SUFFIXES + TIFF_SUFFIXES
DEFAULT_STRETCH = (2.0, 98.0)

Window = tuple[int, int, int, int]  # (left, top, right, bottom), pixels, right/bottom exclusive


class ImageReadError(UserError, ValueError):
    """A file that is not a readable image, or a band choice the file cannot satisfy."""


# ----------------------------------------------------------------------------- finding files
def find_images(paths: Iterable[str | os.PathLike]) -> list[pathlib.Path]:
    """Image files under `paths`: a file is taken as given (whatever its suffix: an unreadable
    one is reported when read), a folder is searched recursively for `IMAGE_SUFFIXES`
    (case-insensitive), sorted. Each file once, in the order the paths were given."""
    found, seen = [], set()
    for p in paths:
        p = pathlib.Path(p)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files = [p]
        else:
            raise FileNotFoundError(f"no such image file or folder: {p}")
        for f in files:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                found.append(f)
    return found


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    """`"3,2,1"` -> (3, 2, 1); empty/None -> None (the default choice)."""
    if not text:
        return None
    try:
        bands = tuple(int(b) for b in str(text).replace(" ", "").split(",") if b)
    except ValueError:
        raise ImageReadError(f"--bands must be 0-based band indices like 3,2,1, got {text!r}") from None
    if len(bands) not in (1, 3) or min(bands) < 0:
        raise ImageReadError(f"--bands takes one (grey) or three (R,G,B) 0-based indices, got {text!r}")
    return bands


def parse_stretch(text: str | None) -> tuple[float, float]:
    """`"2,98"` -> (2.0, 98.0): the low and high percentiles mapped to 0 and 255."""
    if not text:
        return DEFAULT_STRETCH
    try:
        lo, hi = (float(v) for v in str(text).split(","))
    except ValueError:
        raise ImageReadError(f"--stretch must be two percentiles like 2,98, got {text!r}") from None
    if not 0 <= lo < hi <= 100:
        raise ImageReadError(f"--stretch percentiles must satisfy 0 <= low < high <= 100, got {text!r}")
    return lo, hi


def add_arguments(parser) -> None:
    """The image-reading flags `caption` and `search` share (argparse)."""
    parser.add_argument("--batch-size", type=int, default=0, help="images per batch (default: eval_batch_size)")
    parser.add_argument("--tile", action="store_true",
                        help="cut images larger than the model input into tiles (window recorded) instead of resizing")
    parser.add_argument("--bands", default=None,
                        help="0-based bands of multi-band images, one (grey) or three (R,G,B), e.g. 3,2,1 "
                             "(default: the first three)")
    parser.add_argument("--stretch", default=None,
                        help="percentiles stretched to 0..255 for non-8-bit bands (default: 2,98)")
    parser.add_argument("--stretch-8bit", action="store_true", help="stretch 8-bit bands too")


# ----------------------------------------------------------------------------- reading
def _bands_last(arr: np.ndarray, axes: str) -> np.ndarray:
    """A tifffile array -> (H, W, bands), using the series' axes string (e.g. 'YXS', 'SYX')."""
    axes = axes.upper()
    if len(axes) != arr.ndim:
        axes = "YX" if arr.ndim == 2 else ("YXS" if arr.shape[-1] <= 4 and arr.ndim == 3 else "")
    if "Y" not in axes or "X" not in axes:
        if arr.ndim == 3:  # unknown labels: the smallest axis holds the bands
            return np.moveaxis(arr, int(np.argmin(arr.shape)), -1)
        raise ImageReadError(f"a {arr.ndim}-d TIFF with axes {axes!r} is not an image")
    # Leading axes other than Y, X and one band axis (pages, time, z): take their first entry.
    band_axis = next((a for a in "SCQIE" if a in axes), None)
    keep = {"Y", "X"} | ({band_axis} if band_axis else set())
    index = tuple(slice(None) if a in keep else 0 for a in axes)
    arr = arr[index]
    axes = "".join(a for a in axes if a in keep)
    order = [axes.index("Y"), axes.index("X")] + ([axes.index(band_axis)] if band_axis else [])
    arr = np.transpose(arr, order)
    return arr if arr.ndim == 3 else arr[..., None]


def stretch_band(band: np.ndarray, percentiles: tuple[float, float] = DEFAULT_STRETCH) -> np.ndarray:
    """One band of any sample type -> uint8: `percentiles` (of its finite values) -> 0 and 255."""
    band = band.astype(np.float64)
    finite = np.isfinite(band)
    if not finite.any():
        return np.zeros(band.shape, np.uint8)
    lo, hi = np.percentile(band[finite], percentiles)
    if hi <= lo:  # a constant band: mid grey where it has data
        return np.where(finite, 128, 0).astype(np.uint8)
    out = (np.where(finite, band, lo) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def select_bands(arr: np.ndarray, bands: Sequence[int] | None, name: str) -> np.ndarray:
    """(H, W, N) -> (H, W, 3) by the documented band choice."""
    n = arr.shape[-1]
    if bands is None:
        bands = (0, 1, 2) if n >= 3 else (0,)
    bad = [b for b in bands if not 0 <= b < n]
    if bad:
        raise ImageReadError(f"{name}: band {bad[0]} asked for, but the image has {n} band"
                             f"{'s' if n != 1 else ''} (0-based indices 0..{n - 1})")
    arr = arr[..., list(bands)]
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr


def read_tiff(path, bands: Sequence[int] | None = None, stretch: tuple[float, float] = DEFAULT_STRETCH,
              stretch_8bit: bool = False) -> np.ndarray:
    """A TIFF/GeoTIFF -> uint8 (H, W, 3) (see the module docstring for bands and stretch)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        arr = series.asarray()
        axes = series.axes
    arr = select_bands(_bands_last(np.asarray(arr), axes), bands, str(path))
    if arr.dtype == np.uint8 and not stretch_8bit:
        return np.ascontiguousarray(arr)
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    return np.stack([stretch_band(arr[..., c], stretch) for c in range(3)], axis=-1)


def read_image(path, bands: Sequence[int] | None = None, stretch: tuple[float, float] = DEFAULT_STRETCH,
               stretch_8bit: bool = False) -> np.ndarray:
    """Any supported file -> uint8 (H, W, 3); ImageReadError naming the file when it cannot."""
    path = pathlib.Path(path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            image = read_tiff(path, bands, stretch, stretch_8bit)
        else:
            with Image.open(path) as im:
                im.load()
                if bands is not None:
                    arr = np.asarray(im)
                    arr = select_bands(arr if arr.ndim == 3 else arr[..., None], bands, str(path))
                    image = arr if arr.dtype == np.uint8 else np.stack(
                        [stretch_band(arr[..., c], stretch) for c in range(3)], -1)
                else:
                    image = np.asarray(im.convert("RGB"))
    except ImageReadError:
        raise
    except Exception as e:  # truncated, not an image, unknown compression, ...
        raise ImageReadError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None
    if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageReadError(f"{path}: the image has no pixels (shape {image.shape})")
    return np.ascontiguousarray(image)


# ----------------------------------------------------------------------------- views
def tile_windows(height: int, width: int, size: int) -> list[Window]:
    """`size` x `size` windows covering the image, row by row; the last row/column aligned with
    the bottom/right edge (overlapping its neighbour). A side shorter than `size` is one tile."""
    def starts(n):
        if n <= size:
            return [0]
        s = list(range(0, n - size + 1, size))
        return s if s[-1] == n - size else s + [n - size]

    return [(x, y, min(x + size, width), min(y + size, height)) for y in starts(height) for x in starts(width)]


def views(image: np.ndarray, size: int, tile: bool = False) -> list[tuple[Window | None, np.ndarray]]:
    """[(window, uint8 pixels)]: the whole image (window None), or its tiles when `tile` and the
    image is larger than `size` on a side."""
    h, w = image.shape[:2]
    if not tile or (h <= size and w <= size):
        return [(None, image)]
    return [((x0, y0, x1, y1), image[y0:y1, x0:x1]) for x0, y0, x1, y1 in tile_windows(h, w, size)]


def thumbnail(image: np.ndarray, max_side: int = 256) -> np.ndarray:
    """A uint8 copy no larger than `max_side` on its longer side (aspect kept)."""
    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


@dataclasses.dataclass
class ReadError:
    path: str
    message: str


class FolderImages:
    """Batches of model inputs from image files, in file order, unreadable files skipped.

    Each batch: `image` float32 (B, S, S, 3) after `transform` (the task's evaluation
    transform; the last batch is padded to B), `mask` bool (B,), and per real row `paths`
    (str), `windows` (None or (left, top, right, bottom)), `sizes` ((height, width) of the
    whole image) and, with `thumb_size`, `thumbs` (uint8 previews of the views). Files are read
    by a small thread pool, in order. `errors` lists every file that could not be read.
    """

    def __init__(self, files: Sequence[str | os.PathLike], transform: Callable[[np.ndarray], np.ndarray], *,
                 batch_size: int, tile: bool = False, bands: Sequence[int] | None = None,
                 stretch: tuple[float, float] = DEFAULT_STRETCH, stretch_8bit: bool = False,
                 thumb_size: int = 0, on_error: Callable[[str, str], None] | None = None,
                 num_threads: int = 4):
        self.files = [str(f) for f in files]
        self.transform = transform
        self.size = int(transform.size)
        self.batch_size = int(batch_size)
        self.tile, self.bands, self.stretch, self.stretch_8bit = tile, bands, stretch, stretch_8bit
        self.thumb_size = int(thumb_size)
        self.on_error = on_error
        self.num_threads = max(1, int(num_threads))
        self.errors: list[ReadError] = []

    def _read(self, path: str):
        """(path, [(window, model input, thumbnail)], (h, w)) or (path, error message)."""
        try:
            image = read_image(path, self.bands, self.stretch, self.stretch_8bit)
        except ImageReadError as e:
            return path, str(e)
        out = []
        for window, pixels in views(image, self.size, self.tile):
            thumb = thumbnail(pixels, self.thumb_size) if self.thumb_size else None
            out.append((window, self.transform(np.ascontiguousarray(pixels)), thumb))
        return path, out, image.shape[:2]

    def _batch(self, rows) -> dict:
        images = [r[2] for r in rows]
        pad = self.batch_size - len(rows)
        if pad:
            images += [np.zeros((self.size, self.size, 3), np.float32)] * pad
        return {"image": np.stack(images).astype(np.float32, copy=False),
                "mask": np.arange(self.batch_size) < len(rows),
                "paths": [r[0] for r in rows], "windows": [r[1] for r in rows],
                "sizes": [r[4] for r in rows], "thumbs": [r[3] for r in rows]}

    def __iter__(self) -> Iterator[dict]:
        rows = []
        # Bounded read-ahead: Executor.map would read every file of a huge folder at once.
        chunk = max(self.batch_size, 4 * self.num_threads)
        with concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool:
            pending = []
            for start in range(0, len(self.files), chunk):
                pending.append(pool.map(self._read, self.files[start:start + chunk]))
                if len(pending) < 2 and start + chunk < len(self.files):
                    continue
                yield from self._emit(pending.pop(0), rows)
            for results in pending:
                yield from self._emit(results, rows)
        if rows:
            yield self._batch(rows)

    def _emit(self, results, rows):
        """Batches from one chunk of read results; `rows` carries the partial batch over."""
        for result in results:
            if len(result) == 2:
                path, message = result
                self.errors.append(ReadError(path, message))
                if self.on_error is not None:
                    self.on_error(path, message)
                continue
            path, items, hw = result
            for window, pixels, thumb in items:
                rows.append((path, window, pixels, thumb, hw))
                if len(rows) == self.batch_size:
                    yield self._batch(rows)
                    rows.clear()


__all__ = ["add_arguments", "IMAGE_SUFFIXES", "DEFAULT_STRETCH", "ImageReadError", "FolderImages", "find_images", "parse_bands",
           "parse_stretch", "read_image", "read_tiff", "select_bands", "stretch_band", "thumbnail",
           "tile_windows", "views"]
