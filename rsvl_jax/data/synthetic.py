"""Procedurally drawn top-down "remote-sensing" scenes with captions and scene labels.

Why: the demo and the end-to-end tests must run, and visibly learn, with no downloads. Every
caption names the scene plus attributes that are *visible* in the pixels (object counts,
colours, orientation, position), so a small retrieval model can beat chance by a wide margin
after a few CPU minutes, and can do better still by reading the attributes.

Everything is deterministic: example ``i`` of split ``s`` depends only on ``(seed, s, i,
image_size)``, so examples can be generated lazily, in any order, on any host.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

CLASS_NAMES = (
    "farmland",
    "river",
    "lake",
    "parking_lot",
    "airport",
    "residential",
    "forest",
    "beach",
    "storage_tanks",
    "playground",
)
SPLITS = ("train", "val", "test")
CAPTIONS_PER_IMAGE = 5
# Image ids of different splits never collide (one split holds far fewer than 10**7 images).
_SPLIT_ID_OFFSET = 10_000_000

_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
            "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen")

_PALETTE = {
    "green": (70, 140, 60),
    "dark green": (30, 85, 35),
    "light green": (130, 180, 90),
    "yellow": (215, 195, 80),
    "brown": (140, 100, 60),
    "blue": (40, 90, 170),
    "grey": (120, 120, 125),
    "dark grey": (70, 70, 75),
    "white": (235, 235, 235),
    "red": (190, 45, 40),
    "orange": (225, 130, 40),
    "black": (25, 25, 30),
    "sand": (220, 200, 150),
    "bare": (165, 140, 105),
}


# ----------------------------------------------------------------------------- drawing helpers
class _Canvas:
    """A float RGB canvas addressed in fractions of the side length (size-independent scenes)."""

    def __init__(self, size: int, rng: np.random.Generator, colour: str):
        self.size = size
        self.rng = rng
        self.img = np.empty((size, size, 3), np.float32)
        self.img[:] = self.colour(colour)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        self.yy, self.xx = (yy + 0.5) / size, (xx + 0.5) / size  # pixel centres in [0, 1]

    def colour(self, name: str, jitter: float = 12.0) -> np.ndarray:
        return np.asarray(_PALETTE[name], np.float32) + self.rng.uniform(-jitter, jitter, 3)

    def fill(self, mask: np.ndarray, colour: str, jitter: float = 12.0) -> None:
        self.img[mask] = self.colour(colour, jitter)

    def rect(self, y0, x0, y1, x1, colour: str, jitter: float = 12.0) -> None:
        self.fill((self.yy >= y0) & (self.yy < y1) & (self.xx >= x0) & (self.xx < x1), colour, jitter)

    def ellipse(self, cy, cx, ry, rx, colour: str, jitter: float = 12.0) -> None:
        self.fill(((self.yy - cy) / ry) ** 2 + ((self.xx - cx) / rx) ** 2 <= 1.0, colour, jitter)

    def finish(self, noise: float = 5.0) -> np.ndarray:
        img = self.img * self.rng.uniform(0.9, 1.1) + self.rng.normal(0.0, noise, self.img.shape)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _num(n: int) -> str:
    return _NUMBERS[n]


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{_num(n)} {word if n == 1 else (plural or word + 's')}"


def _be(n: int) -> str:
    return "is" if n == 1 else "are"


def _where(pos: str) -> str:
    """'in the middle' / 'on the left' / 'at the top' (how RS captions phrase positions)."""
    if pos == "centre":
        return "in the middle"
    return f"on the {pos}" if pos in ("left", "right") else f"at the {pos}"


def _spread(n: int, lo: float, hi: float, rng: np.random.Generator, jitter: float) -> np.ndarray:
    """n roughly evenly spaced positions in [lo, hi] with a little jitter (objects stay countable)."""
    centres = lo + (np.arange(n) + 0.5) * (hi - lo) / n
    return centres + rng.uniform(-jitter, jitter, n) * (hi - lo) / max(n, 1)


# ----------------------------------------------------------------------------- scene drawers
# Each drawer paints the scene and returns the facts its captions may mention.
def _farmland(c: _Canvas) -> dict:
    rng = c.rng
    k = int(rng.integers(3, 7))
    orient = str(rng.choice(["horizontal", "vertical"]))
    c1, c2 = (str(x) for x in rng.choice(["green", "yellow", "brown"], 2, replace=False))
    edges = np.linspace(0, 1, k + 1)
    edges[1:-1] += rng.uniform(-0.25, 0.25, k - 1) / k
    for i in range(k):
        colour = c1 if i % 2 == 0 else c2
        if orient == "horizontal":
            c.rect(edges[i], 0, edges[i + 1], 1, colour)
        else:
            c.rect(0, edges[i], 1, edges[i + 1], colour)
    return dict(count=k, orient=orient, colours=(c1, c2))


def _river(c: _Canvas) -> dict:
    rng = c.rng
    orient = str(rng.choice(["horizontal", "vertical"]))
    n = int(rng.integers(1, 4))
    colour = str(rng.choice(["grey", "red", "white"]))
    width = rng.uniform(0.16, 0.24)
    centre = rng.uniform(0.4, 0.6)
    phase, amp = rng.uniform(0, 2 * np.pi), rng.uniform(0.02, 0.06)
    along, across = (c.xx, c.yy) if orient == "horizontal" else (c.yy, c.xx)
    river = np.abs(across - centre - amp * np.sin(2 * np.pi * along + phase)) < width / 2
    c.fill(river, "blue")
    for p in _spread(n, 0.05, 0.95, rng, 0.2):
        deck = (np.abs(along - p) < 0.035) & (np.abs(across - centre) < width / 2 + 0.1)
        c.fill(deck, colour, 6.0)
    return dict(count=n, orient=orient, colour=colour)


def _lake(c: _Canvas) -> dict:
    rng = c.rng
    pos = str(rng.choice(["left", "right", "top", "bottom", "centre"]))
    n = int(rng.integers(1, 6))
    cy, cx = {"left": (0.5, 0.25), "right": (0.5, 0.75), "top": (0.25, 0.5),
              "bottom": (0.75, 0.5), "centre": (0.5, 0.5)}[pos]
    c.ellipse(cy + rng.uniform(-0.04, 0.04), cx + rng.uniform(-0.04, 0.04),
              rng.uniform(0.17, 0.22), rng.uniform(0.17, 0.22), "blue")
    # Trees go on a ring around the lake, evenly spread so they stay countable.
    angles = _spread(n, 0, 2 * np.pi, rng, 0.25)
    for a in angles:
        ty = np.clip(cy + 0.34 * np.sin(a), 0.08, 0.92)
        tx = np.clip(cx + 0.34 * np.cos(a), 0.08, 0.92)
        c.ellipse(ty, tx, 0.065, 0.065, "dark green", 8.0)
    return dict(count=n, pos=pos)


def _parking_lot(c: _Canvas) -> dict:
    rng = c.rng
    n = int(rng.integers(2, 9))
    colour = str(rng.choice(["red", "white", "blue", "yellow", "black"]))
    c.rect(0.08, 0.08, 0.92, 0.92, "dark grey", 6.0)
    slots = [(r, k) for r in range(2) for k in range(4)]  # 2 rows x 4 bays
    for r in range(2):
        for k in range(5):
            c.rect(0.15 + 0.4 * r, 0.12 + 0.19 * k - 0.01, 0.45 + 0.4 * r, 0.12 + 0.19 * k + 0.01,
                   "white", 4.0)
    for idx in rng.choice(len(slots), n, replace=False):
        r, k = slots[idx]
        y0, x0 = 0.18 + 0.4 * r, 0.15 + 0.19 * k
        c.rect(y0, x0, y0 + 0.24, x0 + 0.13, colour, 8.0)
    return dict(count=n, colour=colour)


def _airport(c: _Canvas) -> dict:
    rng = c.rng
    orient = str(rng.choice(["horizontal", "vertical"]))
    n = int(rng.integers(1, 5))
    side = rng.uniform(0.3, 0.4)
    along, across = (c.xx, c.yy) if orient == "horizontal" else (c.yy, c.xx)
    c.fill(np.abs(across - side) < 0.1, "dark grey", 6.0)
    dashes = (np.abs(across - side) < 0.012) & ((along * 8) % 1 < 0.5)
    c.fill(dashes, "white", 4.0)
    for p in _spread(n, 0.05, 0.95, rng, 0.05):
        q = side + 0.32  # planes are parked on the apron beside the runway
        body = (np.abs(along - p) < 0.025) & (np.abs(across - q) < 0.12)
        wings = (np.abs(along - p) < 0.08) & (np.abs(across - q + 0.02) < 0.03)
        c.fill(body | wings, "white", 6.0)
    return dict(count=n, orient=orient)


def _residential(c: _Canvas) -> dict:
    rng = c.rng
    rows, cols = int(rng.integers(2, 5)), int(rng.integers(2, 5))
    colour = str(rng.choice(["red", "orange", "grey", "blue"]))
    for k in range(1, rows):
        c.rect(k / rows - 0.02, 0, k / rows + 0.02, 1, "grey", 4.0)
    for r in range(rows):
        for k in range(cols):
            h, w = 0.55 / rows, 0.55 / cols
            y0, x0 = (r + 0.5) / rows - h / 2, (k + 0.5) / cols - w / 2
            c.rect(y0, x0, y0 + h, x0 + w, colour, 10.0)
    n = rows * cols
    density = "sparse" if n <= 6 else ("dense" if n >= 12 else "medium")
    return dict(count=n, rows=rows, colour=colour, density=density)


def _forest(c: _Canvas) -> dict:
    rng = c.rng
    clearing = str(rng.choice(["none", "left", "right", "top", "bottom"]))
    m = 60
    for ty, tx in rng.uniform(0, 1, (m, 2)):
        c.ellipse(ty, tx, 0.07, 0.07, str(rng.choice(["dark green", "green"])), 10.0)
    if clearing != "none":
        cy, cx = {"left": (0.5, 0.2), "right": (0.5, 0.8), "top": (0.2, 0.5), "bottom": (0.8, 0.5)}[clearing]
        c.ellipse(cy, cx, 0.17, 0.17, "bare", 8.0)
    return dict(pos=clearing)


def _beach(c: _Canvas) -> dict:
    rng = c.rng
    pos = str(rng.choice(["left", "right", "top", "bottom"]))
    n = int(rng.integers(0, 4))
    shore = rng.uniform(0.45, 0.55)
    coord = {"left": c.xx, "right": 1 - c.xx, "top": c.yy, "bottom": 1 - c.yy}[pos]
    along = c.yy if pos in ("left", "right") else c.xx
    wave = shore + 0.03 * np.sin(2 * np.pi * along * 2 + rng.uniform(0, 6))
    c.fill(coord < wave, "blue")
    c.fill((coord >= wave) & (coord < wave + 0.04), "white", 6.0)  # surf line
    for p in _spread(n, 0.08, 0.92, rng, 0.15) if n else []:
        d = shore * 0.45
        boat = (np.abs(along - p) < 0.035) & (np.abs(coord - d) < 0.07)
        c.fill(boat, "white", 6.0)
    return dict(count=n, pos=pos)


def _storage_tanks(c: _Canvas) -> dict:
    rng = c.rng
    n = int(rng.integers(2, 7))
    colour = str(rng.choice(["white", "grey"]))
    cols = 3 if n > 4 else 2
    rows = int(np.ceil(n / cols))
    for i in range(n):
        r, k = divmod(i, cols)
        cy = (r + 0.5) / rows + rng.uniform(-0.03, 0.03)
        cx = (k + 0.5) / cols + rng.uniform(-0.03, 0.03)
        rad = min(0.4 / cols, 0.4 / rows, 0.14)
        c.ellipse(cy, cx, rad, rad, colour, 8.0)
        c.ellipse(cy, cx, rad * 0.35, rad * 0.35, "dark grey", 6.0)
    return dict(count=n, colour=colour)


def _playground(c: _Canvas) -> dict:
    rng = c.rng
    colour = str(rng.choice(["red", "blue"]))
    orient = str(rng.choice(["horizontal", "vertical"]))
    ry, rx = (0.3, 0.42) if orient == "horizontal" else (0.42, 0.3)
    c.ellipse(0.5, 0.5, ry, rx, colour, 8.0)
    c.ellipse(0.5, 0.5, ry - 0.08, rx - 0.08, "green", 6.0)
    c.fill((np.abs(c.yy - 0.5) < 0.006) if orient == "vertical" else (np.abs(c.xx - 0.5) < 0.006),
           "white", 4.0)
    c.fill(((c.yy - 0.5) ** 2 + (c.xx - 0.5) ** 2 > 0.47 ** 2), "grey", 10.0)
    return dict(colour=colour, orient=orient)


_BACKGROUND = {
    "farmland": "green", "river": "green", "lake": "light green", "parking_lot": "grey",
    "airport": "light green", "residential": "green", "forest": "dark green", "beach": "sand",
    "storage_tanks": "bare", "playground": "grey",
}
_DRAWERS: dict[str, Callable[[_Canvas], dict]] = {
    "farmland": _farmland, "river": _river, "lake": _lake, "parking_lot": _parking_lot,
    "airport": _airport, "residential": _residential, "forest": _forest, "beach": _beach,
    "storage_tanks": _storage_tanks, "playground": _playground,
}


# ----------------------------------------------------------------------------- caption grammar
def _dir(orient: str) -> str:
    return "from left to right" if orient == "horizontal" else "from top to bottom"


def _captions_for(name: str, f: dict, rng: np.random.Generator) -> list[str]:
    """All caption variants for one scene; 5 distinct ones are sampled from this list."""
    pick = lambda *opts: str(rng.choice(opts))  # noqa: E731  (synonyms)
    n = f.get("count", 0)
    if name == "farmland":
        c1, c2 = f["colours"]
        return [
            f"the {pick('farmland', 'farm land')} is divided into {_num(n)} {f['orient']} strips",
            f"{c1} and {c2} fields lie side by side",
            f"{_plural(n, 'strip')} of {c1} and {c2} crops run {_dir(f['orient'])}",
            f"this is a piece of farmland with {_plural(n, 'field')}",
            f"{pick('many', 'several')} {f['orient']} fields of {c1} and {c2} crops",
            f"{_num(n)} rectangular {pick('fields', 'farmlands')} in {c1} and {c2}",
        ]
    if name == "river":
        b = _plural(n, "bridge")
        return [
            f"a river flows {_dir(f['orient'])} under {b}",
            f"{b} {'crosses' if n == 1 else 'cross'} a {f['orient']} river",
            f"{_num(n)} {f['colour']} {'bridge' if n == 1 else 'bridges'} over a blue river",
            f"a {f['orient']} river with green {pick('banks', 'grass')} on both sides",
            f"there {_be(n)} {b} across the river",
            f"the {f['colour']} {'bridge connects' if n == 1 else 'bridges connect'} the two banks of the river",
        ]
    if name == "lake":
        t = _plural(n, "tree")
        return [
            f"a lake {_where(f['pos'])} is surrounded by {t}",
            f"{t} {'stands' if n == 1 else 'stand'} near a blue lake",
            f"the lake is {_where(f['pos'])} of the {pick('image', 'picture')}",
            f"a {pick('blue', 'calm')} lake {_where(f['pos'])} and {t} on the grass",
            f"there {_be(n)} {t} around the {pick('lake', 'pond')}",
            f"a pond {_where(f['pos'])} with green grass",
        ]
    if name == "parking_lot":
        lot = pick("parking lot", "car park")
        return [
            f"{_num(n)} {f['colour']} cars are parked in a {lot}",
            f"a {lot} with {_plural(n, 'car')}",
            f"many {f['colour']} cars in the {lot}",
            f"there are {_plural(n, 'car')} parked in rows",
            f"{f['colour']} cars stand in the parking spaces of a {lot}",
            f"a grey {lot} with white lines and {_num(n)} {f['colour']} cars",
        ]
    if name == "airport":
        p = _plural(n, "plane")
        return [
            f"{p} {_be(n)} parked beside a {f['orient']} runway",
            f"an airport with a runway and {p}",
            f"{_num(n)} white {'plane' if n == 1 else 'planes'} near the runway of an airport",
            f"a {f['orient']} runway with white marks",
            f"there {_be(n)} {p} on the apron of the airport",
            f"the runway runs {_dir(f['orient'])} next to {p}",
        ]
    if name == "residential":
        return [
            f"a {f['density']} residential area with {f['colour']} roofs",
            f"{_plural(n, 'house')} with {f['colour']} roofs are arranged in {_num(f['rows'])} rows",
            f"many buildings with {f['colour']} roofs",
            f"houses are arranged in {_num(f['rows'])} rows along the roads",
            f"{_num(n)} {f['colour']} houses in a {f['density']} residential area",
            f"grey roads separate {f['colour']} houses",
        ]
    if name == "forest":
        if f["pos"] == "none":
            return [
                "a dense forest covers the whole area",
                "many green trees grow closely together",
                "a large piece of forest without any clearing",
                f"the {pick('image', 'picture')} is full of dark green trees",
                "lush trees in a thick forest",
                "green trees cover the land completely",
            ]
        w = _where(f["pos"])
        return [
            f"a dense forest with a clearing {w}",
            f"a bare clearing {w} of the forest",
            f"many green trees surround a piece of bare land {w}",
            f"there is a brown open space {w} among the trees",
            f"a thick forest and a clearing {w}",
            f"green trees with bare ground {w}",
        ]
    if name == "beach":
        boats = _plural(n, "boat") if n else "no boats"
        return [
            f"the sea is {_where(f['pos'])} of a yellow beach",
            f"{boats} {'floats' if n == 1 else 'float'} on the sea near the beach",
            f"a sandy beach next to blue water {_where(f['pos'])}",
            f"white waves between the sea and the {pick('beach', 'sand')}",
            f"there {_be(n)} {boats} in the sea {_where(f['pos'])}",
            f"a beach with the ocean {_where(f['pos'])}",
        ]
    if name == "storage_tanks":
        t = _plural(n, "storage tank")
        return [
            f"{_num(n)} {f['colour']} storage tanks on bare land",
            f"there are {_plural(n, 'round tank')} in the {pick('area', 'image')}",
            f"{t} are arranged in rows",
            f"{f['colour']} storage tanks stand on brown ground",
            f"{pick('many', 'some')} {f['colour']} round tanks",
            f"{_num(n)} circular {f['colour']} tanks",
        ]
    if name == "playground":
        return [
            f"a {f['colour']} running track surrounds a green football field",
            f"a playground with a {f['colour']} track",
            f"a {f['orient']} oval track in {f['colour']}",
            "a green field in the middle of a running track",
            f"the {f['colour']} track of the playground is {f['orient']}",
            f"a {pick('playground', 'stadium')} with a {f['colour']} track and a green lawn",
        ]
    raise KeyError(name)


# ----------------------------------------------------------------------------- public API
def _split_code(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown synthetic split {split!r}; expected one of {SPLITS}")
    return SPLITS.index(split)


def split_labels(num_images: int, split: str, seed: int) -> np.ndarray:
    """Scene label of every image in a split: balanced (counts differ by at most 1), shuffled."""
    rng = np.random.default_rng([seed, _split_code(split), 0x1ABE1])
    return rng.permutation(np.arange(num_images) % len(CLASS_NAMES)).astype(np.int64)


def make_example(index: int, label: int, split: str, seed: int, image_size: int = 64) -> dict:
    """One example; depends only on its arguments (deterministic, order-free)."""
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 for the scenes to stay legible, got {image_size}")
    name = CLASS_NAMES[label]
    rng = np.random.default_rng([seed, _split_code(split), index, 0x5CE4E])
    canvas = _Canvas(image_size, rng, _BACKGROUND[name])
    facts = _DRAWERS[name](canvas)
    variants = _captions_for(name, facts, rng)
    variants = list(dict.fromkeys(variants))  # distinct, order kept
    chosen = rng.choice(len(variants), CAPTIONS_PER_IMAGE, replace=False)
    return {
        "image": canvas.finish(),
        "captions": [variants[i] for i in sorted(chosen)],
        "label": int(label),
        "image_id": _split_code(split) * _SPLIT_ID_OFFSET + index,
        "filename": f"{split}/{name}_{index:05d}.png",
    }


def generate(num_images: int, split: str = "train", seed: int = 0, image_size: int = 64) -> list[dict]:
    """``num_images`` examples of one split: dicts with image (uint8 HxWx3), captions (5 str),
    label (int), image_id (int, unique across splits) and filename."""
    labels = split_labels(num_images, split, seed)
    return [make_example(i, int(labels[i]), split, seed, image_size) for i in range(num_images)]


def iter_examples(num_images: int, split: str = "train", seed: int = 0, image_size: int = 64):
    """Lazy version of :func:`generate` (the builder streams thousands of images)."""
    labels = split_labels(num_images, split, seed)
    for i in range(num_images):
        yield make_example(i, int(labels[i]), split, seed, image_size)
