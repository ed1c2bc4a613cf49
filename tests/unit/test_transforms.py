"""Image transforms: each op against PIL or a hand-computed reference (spec PIR §1.3)."""
import numpy as np
import pytest
from PIL import Image, ImageOps

from rsvl_jax.data import transforms as T


def _img(h=40, w=50, seed=0, lo=0, hi=256):
    return np.random.default_rng(seed).integers(lo, hi, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("lo,hi", [(0, 256), (30, 90), (100, 101)])
def test_equalize_matches_pil(lo, hi):
    for seed in range(3):
        img = _img(seed=seed, lo=lo, hi=hi)
        assert np.array_equal(T.equalize(img), np.asarray(ImageOps.equalize(Image.fromarray(img))))


def test_autocontrast_fixed_matches_pil():
    for seed in range(3):
        img = _img(seed=seed, lo=20, hi=200)
        ref = np.asarray(ImageOps.autocontrast(Image.fromarray(img)))
        assert np.array_equal(T.autocontrast(img, fix=True), ref)


def test_autocontrast_reference_quirk():
    """The reference negates a uint8 minimum: channels with min > 0 saturate to 255."""
    img = _img(lo=0, hi=200)
    img[..., 1] = np.clip(img[..., 1], 10, None)  # channel 1: min 10 > 0
    img[0, 0, 0] = 0  # channel 0: min 0 -> a normal stretch
    out = T.autocontrast(img)
    assert np.all(out[..., 1] == 255)
    assert np.array_equal(out[..., 0], T.autocontrast(img, fix=True)[..., 0])
    flat = np.full((4, 4, 3), 7, np.uint8)  # max == min: unchanged in both modes
    assert np.array_equal(T.autocontrast(flat), flat)


def test_brightness_lut():
    img = np.array([[[0, 100, 200]]], np.uint8)
    assert T.brightness(img, 1.36).tolist() == [[[0, 136, 255]]]
    assert T.brightness(np.array([[[3, 50, 187]]], np.uint8), 1.36).tolist() == [[[4, 68, 254]]]


def test_sharpness_by_hand():
    img = np.zeros((5, 5, 3), np.uint8)
    img[2, 2] = 255  # a lone bright pixel: blur = round(5*255/13) = 98
    img[2, 3] = 13  # its neighbour: blur = round((255 + 5*13)/13) = 25 (24.6)
    out = T.sharpness(img, 1.36)
    assert out[2, 2, 0] == int(98 + 1.36 * (255 - 98)) % 256  # 311.5 wraps to 55 (Q22)
    assert out[2, 3, 0] == np.uint8(int(25 + 1.36 * (13 - 25)))  # 8.68 -> 8
    assert out[1, 1, 0] == 249  # blur round(255/13) = 20; 20 - 1.36*20 = -7.2 wraps to 249
    clipped = T.sharpness(img, 1.36, clip=True)
    assert clipped[2, 2, 0] == 255 and clipped[1, 1, 0] == 0
    border = np.ones((5, 5), bool)
    border[1:-1, 1:-1] = False
    assert np.array_equal(out[border], img[border])  # the 1-pixel border keeps its values
    assert np.array_equal(T.sharpness(img, 1.0), img)


def test_translate_integer_is_a_shift_with_fill():
    img = _img(20, 30)
    out = T.translate_x(img, 7.0)  # matrix [[1,0,-7],[0,1,0]]: content moves left by 7
    assert np.array_equal(out[:, :-7], img[:, 7:]) and np.all(out[:, -7:] == 128)
    out = T.translate_x(img, -7.0)
    assert np.array_equal(out[:, 7:], img[:, :-7]) and np.all(out[:, :7] == 128)
    out = T.translate_y(img, 7.0)
    assert np.array_equal(out[:-7], img[7:]) and np.all(out[-7:] == 128)


def test_rotate_90_about_centre():
    """Centre (W/2, H/2) is a pixel corner, so +90 deg = np.rot90 moved down one row."""
    img = _img(16, 16)
    out = T.rotate(img, 90.0)
    assert np.array_equal(out[1:], np.rot90(img)[:-1])
    assert np.all(out[0] == 128)


def test_shear_by_hand_and_identity_warp():
    img = _img(12, 20)
    out = T.shear_x(img, 0.25)  # row y samples the source at x - 0.25*y
    assert np.array_equal(out[0], img[0])
    assert np.array_equal(out[4, 1:], img[4, :-1]) and np.all(out[4, 0] == 128)
    assert np.array_equal(out[8, 2:], img[8, :-2])
    assert np.array_equal(T.warp_affine(img, [[1, 0, 0], [0, 1, 0]]), img)


def test_warp_half_pixel_is_bilinear_average():
    img = np.zeros((4, 4, 3), np.uint8)
    img[:, 1] = 100
    img[:, 2] = 201
    out = T.warp_affine(img, [[1, 0, -0.5], [0, 1, 0]])  # sample at x + 0.5
    assert out[0, 1, 0] == (100 + 201 + 1) // 2  # 150.5 rounds up in fixed point: 151
    assert out[0, 0, 0] == 50


def test_random_resized_crop_params():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = T.random_resized_crop_params(rng, 60, 90)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 90
        assert 0.5 * 60 * 90 * 0.9 <= h * w <= 60 * 90
    a = T.random_resized_crop_params(np.random.default_rng(5), 224, 224)
    assert a == T.random_resized_crop_params(np.random.default_rng(5), 224, 224)
    # no try can fit (scale > 1): central crop with the aspect ratio clamped to 4/3
    assert T.random_resized_crop_params(rng, 100, 400, scale=(2.0, 3.0)) == (0, 133, 100, 133)
    assert T.random_resized_crop_params(rng, 400, 100, scale=(2.0, 3.0)) == (133, 0, 133, 100)
    assert T.random_resized_crop_params(rng, 100, 120, scale=(2.0, 3.0)) == (0, 0, 100, 120)


def test_resized_crop_is_crop_then_pil_bicubic():
    img = _img(64, 64)
    ref = Image.fromarray(img).crop((5, 3, 45, 33)).resize((24, 24), Image.BICUBIC)
    assert np.array_equal(T.resized_crop(img, 3, 5, 30, 40, 24), np.asarray(ref))


def test_normalize_and_eval_transform():
    img = _img(30, 40)
    out = T.EvalTransform(size=24)(img)
    assert out.shape == (24, 24, 3) and out.dtype == np.float32
    ref = np.asarray(Image.fromarray(img).resize((24, 24), Image.BICUBIC)).astype(np.float32) / 255
    np.testing.assert_allclose(out, (ref - T.CLIP_MEAN) / T.CLIP_STD, rtol=1e-6, atol=1e-6)
    white = T.normalize(np.full((1, 1, 3), 255, np.uint8))[0, 0]
    np.testing.assert_allclose(white, (1 - T.CLIP_MEAN) / T.CLIP_STD, rtol=1e-6)


def test_random_augment_draws():
    img = _img(32, 32)
    only_id = T.RandomAugment(ops=("Identity",))
    assert np.array_equal(only_id(img, np.random.default_rng(0)), img)
    shifts = {"none": 0, "left": 0, "right": 0}
    for seed in range(60):
        out = T.RandomAugment(n=1, ops=("TranslateX",))(img, np.random.default_rng(seed))
        if np.array_equal(out, img):
            shifts["none"] += 1
        elif np.array_equal(out[:, :-7], img[:, 7:]):
            shifts["left"] += 1
        else:
            assert np.array_equal(out[:, 7:], img[:, :-7])
            shifts["right"] += 1
    assert all(v > 5 for v in shifts.values()), shifts  # p=0.5 apply, p=0.5 sign


def test_train_transform_shapes_and_determinism():
    img = _img(70, 90)
    tt = T.TrainTransform(size=32)
    a = tt(img, np.random.default_rng([1, 2, 3]))
    b = tt(img, np.random.default_rng([1, 2, 3]))
    c = tt(img, np.random.default_rng([1, 2, 4]))
    assert a.shape == (32, 32, 3) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    raw = a * T.CLIP_STD + T.CLIP_MEAN
    assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5
    with pytest.raises(ValueError, match="uint8"):
        tt(img.astype(np.float32), np.random.default_rng(0))
