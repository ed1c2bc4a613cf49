"""Synthetic scenes: deterministic, balanced, varied, disjoint splits, and visibly learnable."""
import collections
import hashlib

import numpy as np
import pytest

from rsvl_jax.data import synthetic as S


def _digest(img):
    return hashlib.sha1(img.tobytes()).hexdigest()


def test_example_format():
    ex = S.generate(12, "train", seed=0, image_size=48)
    for e in ex:
        assert e["image"].shape == (48, 48, 3) and e["image"].dtype == np.uint8
        assert len(e["captions"]) == S.CAPTIONS_PER_IMAGE
        assert all(isinstance(c, str) and c == c.strip() and c for c in e["captions"])
        assert 0 <= e["label"] < len(S.CLASS_NAMES)
        assert e["filename"].startswith("train/" + S.CLASS_NAMES[e["label"]])


def test_deterministic_and_order_free():
    a = S.generate(15, "val", seed=3, image_size=32)
    b = S.generate(15, "val", seed=3, image_size=32)
    for x, y in zip(a, b):
        assert np.array_equal(x["image"], y["image"]) and x["captions"] == y["captions"]
    # example 9 alone equals example 9 of the whole split (lazy builders rely on this)
    labels = S.split_labels(15, "val", 3)
    one = S.make_example(9, int(labels[9]), "val", 3, 32)
    assert np.array_equal(one["image"], a[9]["image"]) and one["captions"] == a[9]["captions"]
    c = S.generate(15, "val", seed=4, image_size=32)
    assert sum(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c)) == 0


def test_class_balance():
    labels = [e["label"] for e in S.generate(53, "train", seed=1, image_size=32)]
    counts = collections.Counter(labels)
    assert set(counts) == set(range(len(S.CLASS_NAMES)))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_caption_variety():
    ex = S.generate(200, "train", seed=0, image_size=32)
    for e in ex:
        assert len(set(e["captions"])) == S.CAPTIONS_PER_IMAGE
    all_caps = [c for e in ex for c in e["captions"]]
    assert len(set(all_caps)) > 300  # of 1000: the attributes multiply the templates
    sets = {tuple(e["captions"]) for e in ex}
    assert len(sets) > 150  # most images are described differently from all others
    # every caption names something from its scene: no caption is shared across classes
    owner = collections.defaultdict(set)
    for e in ex:
        for c in e["captions"]:
            owner[c].add(e["label"])
    assert all(len(v) == 1 for v in owner.values())


def test_splits_disjoint():
    seen = {}
    for split in S.SPLITS:
        for e in S.generate(40, split, seed=0, image_size=32):
            d = _digest(e["image"])
            assert d not in seen, f"{split} image equals a {seen[d]} image"
            seen[d] = split
    ids = [e["image_id"] for s in S.SPLITS for e in S.generate(40, s, 0, 32)]
    assert len(set(ids)) == len(ids)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        S.generate(2, "dev", 0, 32)
    with pytest.raises(ValueError, match="image_size"):
        S.generate(2, "train", 0, 16)


def _features(e):
    x = e["image"].astype(np.float32) / 255
    return np.concatenate([x.reshape(4, 8, 4, 8, 3).mean((1, 3)).ravel(), x.std((0, 1))])


def test_scene_class_is_visible():
    """A nearest-centroid classifier on 4x4 colour thumbnails beats chance (10%) by far."""
    tr, te = S.generate(200, "train", 0, 32), S.generate(100, "test", 0, 32)
    xtr = np.stack([_features(e) for e in tr])
    ytr = np.array([e["label"] for e in tr])
    xte = np.stack([_features(e) for e in te])
    yte = np.array([e["label"] for e in te])
    centroids = np.stack([xtr[ytr == k].mean(0) for k in range(len(S.CLASS_NAMES))])
    pred = np.argmin(((xte[:, None] - centroids[None]) ** 2).sum(-1), 1)
    assert (pred == yte).mean() > 0.6


def test_attributes_in_captions_are_visible():
    """Lake position and car colour named by the captions can be read off the pixels."""
    ex = S.generate(300, "train", 2, 64)
    checked = 0
    for e in ex:
        img = e["image"].astype(int)
        name = S.CLASS_NAMES[e["label"]]
        if name == "lake":
            blue = (img[..., 2] > 130) & (img[..., 0] < 90)
            ys, xs = np.nonzero(blue)
            cy, cx = ys.mean() / 64, xs.mean() / 64
            pos = next(p for p in ("left", "right", "top", "bottom", "middle")
                       if any(p in c for c in e["captions"]))
            assert {"left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4, "bottom": cy > 0.6,
                    "middle": abs(cx - 0.5) < 0.1 and abs(cy - 0.5) < 0.1}[pos], (pos, cy, cx)
            checked += 1
        if name == "parking_lot":
            red = ((img[..., 0] > 150) & (img[..., 1] < 100)).mean()
            says_red = any(" red " in f" {c} " for c in e["captions"])
            assert (red > 0.02) == says_red
            checked += 1
    assert checked > 40
