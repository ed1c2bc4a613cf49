"""PIR image transforms (spec PIR §1.3) in NumPy + PIL, one uint8 HxWx3 image at a time.

Train: RandomResizedCrop (torchvision 0.11 algorithm, PIL bicubic) -> horizontal flip ->
RandomAugment(N=2, M=7) with the reference's ten OpenCV-based ops -> CLIP normalisation.
Eval: bicubic squash-resize -> CLIP normalisation. Output float32 HxWx3.

All randomness comes from a ``numpy.random.Generator`` handed in by the caller, so an example's
augmentation is fixed by (seed, epoch, index) and a resumed run repeats it exactly. The draws
happen in the reference's order (crop, flip, op names, then per op: apply?, sign).

Two reference quirks are mirrored by default, each with a flag to fix it:
* Sharpness casts float -> uint8 without clipping (spec Q22): values wrap modulo 256.
  ``sharpness_clip=True`` clips instead.
* AutoContrast negates a NumPy uint8 minimum (``-low`` with ``low`` a ``np.uint8``), which wraps
  to ``256 - low``; every channel whose minimum is above 0 therefore becomes all 255. Found by
  reading the reference (not in the spec); ``autocontrast_fix=True`` gives PIL's behaviour.
Geometric ops reproduce OpenCV's classic ``warpAffine`` INTER_LINEAR arithmetic (inverse map,
coordinates on a 1/32-pixel grid, 15-bit fixed-point weights, constant border 128).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)

PIR_AUG_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
               "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
MAX_LEVEL = 10
FILL = 128


# ----------------------------------------------------------------------------- resize / crop
def _check(img: np.ndarray) -> np.ndarray:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image, got {img.dtype} {img.shape}")
    return img


def resize_bicubic(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL bicubic resize (antialiased when shrinking), like torchvision on PIL images."""
    if img.shape[:2] == (height, width):
        return img
    return np.asarray(Image.fromarray(img).resize((width, height), Image.BICUBIC))


def random_resized_crop_params(rng: np.random.Generator, height: int, width: int,
                               scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision 0.11 ``RandomResizedCrop.get_params``: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: central crop with the aspect ratio clamped into `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(img: np.ndarray, top: int, left: int, h: int, w: int, size: int) -> np.ndarray:
    """Crop first, then resize (PIL's resize(box=...) would sample outside the box)."""
    pil = Image.fromarray(img).crop((left, top, left + w, top + h))
    return np.asarray(pil.resize((size, size), Image.BICUBIC))


# ----------------------------------------------------------------------------- colour ops
def autocontrast(img: np.ndarray, fix: bool = False) -> np.ndarray:
    """Per-channel min/max stretch. ``fix=False`` mirrors the reference's uint8 ``-low`` wrap."""
    out = np.empty_like(img)
    for c in range(img.shape[-1]):
        ch = img[..., c]
        low, high = int(ch.min()), int(ch.max())
        if high <= low:
            out[..., c] = ch
            continue
        scale = 255 / (high - low)
        neg_low = -low if fix else (-low) % 256  # -np.uint8(low) in the reference
        table = np.arange(256) * scale + neg_low * scale
        table = np.clip(table, 0, 255).astype(np.uint8)
        out[..., c] = table[ch]
    return out


def equalize(img: np.ndarray) -> np.ndarray:
    """PIL's ``ImageOps.equalize`` per channel (integer arithmetic, identical results)."""
    out = np.empty_like(img)
    for c in range(img.shape[-1]):
        ch = img[..., c]
        hist = np.bincount(ch.ravel(), minlength=256)
        nonzero = hist[hist != 0]
        step = int(nonzero[:-1].sum()) // 255
        if step == 0:
            out[..., c] = ch
            continue
        n = np.concatenate([[step // 2], hist[:-1]])
        out[..., c] = np.clip(np.cumsum(n) // step, 0, 255).astype(np.uint8)[ch]
    return out


def brightness(img: np.ndarray, factor: float) -> np.ndarray:
    table = np.clip(np.arange(256, dtype=np.float32) * np.float32(factor), 0, 255).astype(np.uint8)
    return table[img]


def _smooth(img: np.ndarray) -> np.ndarray:
    """``cv2.filter2D`` with [[1,1,1],[1,5,1],[1,1,1]]/13, reflect-101 border, rounded to uint8.

    Integer sums are exact; a tie at .5 cannot occur with a divisor of 13, so rounding matches
    OpenCV's float path."""
    p = np.pad(img.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="reflect")  # = reflect-101
    h, w = img.shape[:2]
    s = sum(p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) + 4 * img.astype(np.int32)
    return ((2 * s + 13) // 26).astype(np.uint8)


def sharpness(img: np.ndarray, factor: float, clip: bool = False) -> np.ndarray:
    """Blend with the smoothed image on interior pixels; the 1-pixel border keeps its values."""
    degenerate = _smooth(img)
    if factor == 0.0:
        return degenerate
    if factor == 1.0:
        return img
    out = img.astype(np.float32)
    d = degenerate.astype(np.float32)[1:-1, 1:-1]
    out[1:-1, 1:-1] = d + np.float32(factor) * (out[1:-1, 1:-1] - d)
    if clip:
        return np.clip(out, 0, 255).astype(np.uint8)
    return (np.trunc(out).astype(np.int64) % 256).astype(np.uint8)  # the reference's wrap (Q22)


# ----------------------------------------------------------------------------- geometric ops
def warp_affine(img: np.ndarray, matrix, fill: int = FILL) -> np.ndarray:
    """``cv2.warpAffine(img, M, (W, H), flags=INTER_LINEAR, borderValue=fill)``.

    ``matrix`` is the forward 2x3 map; destination pixel p samples the source at M^-1 p.
    OpenCV's classic fixed-point path is reproduced: M^-1 scaled by 1024 and rounded, source
    coordinates on a 1/32-pixel grid, bilinear weights in units of 1/32768, taps outside the
    image read ``fill``.
    """
    m = np.asarray(matrix, np.float64).reshape(2, 3)
    det = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
    det = 1.0 / det if det != 0 else 0.0
    a00, a11 = m[1, 1] * det, m[0, 0] * det
    a01, a10 = -m[0, 1] * det, -m[1, 0] * det
    b0 = -a00 * m[0, 2] - a01 * m[1, 2]
    b1 = -a10 * m[0, 2] - a11 * m[1, 2]

    h, w = img.shape[:2]
    xs, ys = np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)
    adelta = np.rint(a00 * xs * 1024).astype(np.int64)
    bdelta = np.rint(a10 * xs * 1024).astype(np.int64)
    x0 = np.rint((a01 * ys + b0) * 1024).astype(np.int64) + 16
    y0 = np.rint((a11 * ys + b1) * 1024).astype(np.int64) + 16
    gx = (x0[:, None] + adelta[None, :]) >> 5  # 1/32-pixel units
    gy = (y0[:, None] + bdelta[None, :]) >> 5
    sx, sy = gx >> 5, gy >> 5
    fx, fy = (gx & 31).astype(np.int32), (gy & 31).astype(np.int32)

    # A 1-pixel frame of `fill` around the image: every tap outside the image is clamped onto
    # it, which is what BORDER_CONSTANT means tap by tap.
    padded = np.full((h + 2, w + 2, img.shape[2]), fill, np.int32)
    padded[1:-1, 1:-1] = img
    flat = padded.reshape(-1, img.shape[2])
    out = np.full(img.shape, 1 << 14, np.int32)  # rounding term of the >> 15 below
    for dy, wy in ((0, 32 - fy), (1, fy)):
        rows = (np.clip(sy + dy, -1, h) + 1) * (w + 2)
        for dx, wx in ((0, 32 - fx), (1, fx)):
            taps = flat[(rows + np.clip(sx + dx, -1, w) + 1).astype(np.intp)]
            out += (wy * wx * 32)[..., None] * taps
    return (out >> 15).clip(0, 255).astype(np.uint8)


def _f32_matrix(rows) -> np.ndarray:
    """The reference builds these matrices with np.float32 before OpenCV reads them as double."""
    return np.asarray(rows, np.float32).astype(np.float64)


def shear_x(img, s, fill=FILL):
    return warp_affine(img, _f32_matrix([[1, s, 0], [0, 1, 0]]), fill)


def shear_y(img, s, fill=FILL):
    return warp_affine(img, _f32_matrix([[1, 0, 0], [s, 1, 0]]), fill)


def translate_x(img, t, fill=FILL):
    return warp_affine(img, _f32_matrix([[1, 0, -t], [0, 1, 0]]), fill)


def translate_y(img, t, fill=FILL):
    return warp_affine(img, _f32_matrix([[1, 0, 0], [0, 1, -t]]), fill)


def rotation_matrix(center, degrees: float, scale: float = 1.0) -> np.ndarray:
    """``cv2.getRotationMatrix2D``: positive angle = counter-clockwise on screen."""
    a = math.radians(degrees)
    alpha, beta = math.cos(a) * scale, math.sin(a) * scale
    cx, cy = center
    return np.array([[alpha, beta, (1 - alpha) * cx - beta * cy],
                     [-beta, alpha, beta * cx + (1 - alpha) * cy]])


def rotate(img, degrees, fill=FILL):
    h, w = img.shape[:2]
    return warp_affine(img, rotation_matrix((w / 2, h / 2), degrees), fill)


# ----------------------------------------------------------------------------- RandomAugment
@dataclasses.dataclass(frozen=True)
class RandomAugment:
    """Reference ``RandomAugment(N, M, isPIL=True, augs=...)`` driven by a numpy Generator."""

    n: int = 2
    m: int = 7
    ops: tuple[str, ...] = PIR_AUG_OPS
    sharpness_clip: bool = False
    autocontrast_fix: bool = False

    def _signed(self, value: float, rng: np.random.Generator, negative_if_above: bool) -> float:
        u = rng.random()
        return -value if (u > 0.5 if negative_if_above else u < 0.5) else value

    def apply(self, name: str, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One op at level ``m``; draws its random sign (if any) from ``rng``."""
        level = self.m / MAX_LEVEL
        if name == "Identity":
            return img
        if name == "AutoContrast":
            return autocontrast(img, fix=self.autocontrast_fix)
        if name == "Equalize":
            return equalize(img)
        if name == "Brightness":
            return brightness(img, level * 1.8 + 0.1)
        if name == "Sharpness":
            return sharpness(img, level * 1.8 + 0.1, clip=self.sharpness_clip)
        if name in ("ShearX", "ShearY"):
            s = self._signed(level * 0.3, rng, negative_if_above=True)
            return (shear_x if name == "ShearX" else shear_y)(img, s)
        if name in ("TranslateX", "TranslateY"):
            t = self._signed(level * 10.0, rng, negative_if_above=True)
            return (translate_x if name == "TranslateX" else translate_y)(img, t)
        if name == "Rotate":
            return rotate(img, self._signed(level * 30, rng, negative_if_above=False))
        raise ValueError(f"unknown augmentation op {name!r}")

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        names = [self.ops[k] for k in rng.choice(len(self.ops), self.n)]  # with replacement
        for name in names:
            if rng.random() > 0.5:  # each op applied with probability 0.5
                continue
            img = self.apply(name, img, rng)
        return img


# ----------------------------------------------------------------------------- pipelines
def normalize(img: np.ndarray) -> np.ndarray:
    """uint8 -> float32: /255 then CLIP mean/std (both train and eval, spec §1.3, Q20)."""
    return (img.astype(np.float32) / np.float32(255.0) - CLIP_MEAN) / CLIP_STD


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """PIR's training transform; ``augment`` returns the uint8 image before normalisation."""

    size: int = 224
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    randaug: RandomAugment | None = RandomAugment()

    def augment(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        img = _check(img)
        top, left, h, w = random_resized_crop_params(rng, *img.shape[:2], self.scale, self.ratio)
        img = resized_crop(img, top, left, h, w, self.size)
        if self.hflip and rng.random() < 0.5:
            img = np.ascontiguousarray(img[:, ::-1])
        if self.randaug is not None:
            img = self.randaug(img, rng)
        return img

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return normalize(self.augment(img, rng))


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """PIR's test transform: bicubic resize to size x size (no aspect preservation)."""

    size: int = 224

    def __call__(self, img: np.ndarray) -> np.ndarray:
        return normalize(resize_bicubic(_check(img), self.size, self.size))


# ----------------------------------------------------------------------------- BITA (spec BITA §6.4)
def bita_image_train(size: int = 224) -> TrainTransform:
    """``bita_image_train``: RandomResizedCrop(size, scale 0.5-1, ratio 3/4-4/3, bicubic) ->
    horizontal flip -> CLIP normalisation. No RandAugment."""
    return TrainTransform(size=size, scale=(0.5, 1.0), randaug=None)


def bita_image_eval(size: int = 224) -> EvalTransform:
    """``bita_image_eval``: bicubic resize to size x size (aspect not kept, no crop) -> CLIP
    normalisation."""
    return EvalTransform(size=size)
