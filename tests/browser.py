"""Render our HTML pages in headless Chromium: the DOM after load, and a screenshot.

No CDP: `--dump-dom` prints the DOM after the page's load event, where the page's own check
script (rsvl_jax.eval.report.CHECK_SCRIPT) has put `data-images`, `data-images-loaded` and
`data-images-total` on <body>; `--screenshot` writes a PNG. Tests skip, with the reason, only
when no Chromium binary can be found (CI installs Debian's `chromium` package).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shutil
import signal
import subprocess
import tempfile

import numpy as np
import pytest

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL = "apt-get update -qq && apt-get install -y -qq chromium"


def find_chromium() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env and shutil.which(env):
        return shutil.which(env)
    return next((shutil.which(n) for n in NAMES if shutil.which(n)), None)


def require_chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip(f"no Chromium binary found (tried {', '.join(NAMES)}); install it with: {INSTALL}")
    return path


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Chromium in its own process group, so a timeout kills its helpers (zygote, renderers) too."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@dataclasses.dataclass
class Rendered:
    dom: str
    screenshot: pathlib.Path
    images_state: str | None  # "ok", "broken", or None when the check script did not run
    images_loaded: int
    images_total: int
    cards: int

    def assert_all_images_loaded(self, at_least: int = 1):
        assert self.images_state == "ok", (self.images_state, self.images_loaded, self.images_total)
        assert self.images_loaded == self.images_total >= at_least, (self.images_loaded, self.images_total)


def _attr(dom: str, name: str) -> str | None:
    body = re.search(r"<body[^>]*>", dom)
    found = body and re.search(rf'{name}="([^"]*)"', body.group(0))
    return found.group(1) if found else None


def render(page: str | os.PathLike, screenshot: str | os.PathLike, *, width: int = 1280, height: int = 1600,
           timeout: float = 90) -> Rendered:
    """Loads `page` (a local HTML file) headless; returns its DOM facts and writes a screenshot."""
    chromium = require_chromium()
    url = pathlib.Path(page).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="rsvl-chromium-") as profile:
        common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--no-first-run", "--no-default-browser-check", "--hide-scrollbars", "--mute-audio",
                  f"--user-data-dir={profile}", "--virtual-time-budget=10000", f"--window-size={width},{height}"]
        dom = _run(common + ["--dump-dom", url], timeout)
        assert dom.returncode == 0 and "<body" in dom.stdout, dom.stderr[-2000:]
        shot = _run(common + [f"--screenshot={pathlib.Path(screenshot).resolve()}", url], timeout)
        assert shot.returncode == 0 and pathlib.Path(screenshot).is_file(), shot.stderr[-2000:]
    html = dom.stdout
    return Rendered(dom=html, screenshot=pathlib.Path(screenshot), images_state=_attr(html, "data-images"),
                    images_loaded=int(_attr(html, "data-images-loaded") or -1),
                    images_total=int(_attr(html, "data-images-total") or -1),
                    cards=len(re.findall(r'class="card"', html)))


def is_blank(png: str | os.PathLike, min_std: float = 3.0) -> bool:
    """True when an image is (nearly) one flat colour."""
    from PIL import Image

    with Image.open(png) as im:
        pixels = np.asarray(im.convert("RGB"), np.float32)
    return float(pixels.std()) < min_std
