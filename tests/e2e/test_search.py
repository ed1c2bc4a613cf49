"""`python -m rsvl_jax.search`: an incremental index (nothing re-embedded, only new files
embedded), rankings equal to a brute-force NumPy ranking, image/text queries and a results page
that renders in Chromium; and, with the demo model trained in the test, a scene's caption finds
an image of that scene first."""
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from rsvl_jax import checkpoint, search
from rsvl_jax.data import synthetic
from rsvl_jax.tasks import pir as pir_task
from tests import browser

from .test_pir_train import tiny_config, tiny_overrides

REPO = pathlib.Path(__file__).resolve().parents[2]


def _scenes(folder: pathlib.Path, n: int, split: str = "test", seed: int = 5, start: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    examples = synthetic.generate(start + n, split, seed=seed, image_size=64)[start:]
    for i, e in enumerate(examples, start):
        Image.fromarray(e["image"]).save(folder / f"{i:03d}_{synthetic.CLASS_NAMES[e['label']]}.png")
    return examples


def _embedded(out: str) -> int:
    return int(re.search(r"embedded (\d+) images", out).group(1))


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    config = tiny_config(tmp, "run")
    model = pir_task.make(config).make_model()
    checkpoint.save_params(tmp / "ckpt", nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
    _scenes(tmp / "photos", 6)
    (tmp / "photos" / "damaged.png").write_bytes(b"\x89PNG not really")
    args = ["index", f"--config={REPO}/configs/pir.py:demo", *tiny_overrides(tmp, "run"), "--checkpoint",
            str(tmp / "ckpt"), str(tmp / "photos"), "--out", str(tmp / "index"), "--chunk", "4"]
    return tmp, args


def test_indexing_is_incremental_and_queries_equal_a_brute_force_ranking(index, capsys):
    tmp, args = index
    assert search.main(args) == 0  # the command line, once
    first = capsys.readouterr()
    assert _embedded(first.out) == 6 and "damaged.png" in first.err and "1 unreadable" in first.out
    # The same model for the re-runs and the queries (building a model costs most of the time).
    searcher = search.Searcher(tmp / "index")
    record = searcher.manifest["model"]
    rerun = lambda: search.build_index(searcher.task, searcher.model, [str(tmp / "photos")], tmp / "index",  # noqa: E731
                                       record, batch_size=4, chunk_size=4, say=lambda *a: None)
    assert rerun()["embedded"] == 0  # nothing new: nothing embedded
    _scenes(tmp / "photos", 2, start=6)
    counts = rerun()
    assert counts["embedded"] == 2 and counts["unchanged"] == 6
    manifest = search.read_manifest(tmp / "index")
    assert len(manifest["files"]) == 8 and list(manifest["unreadable"]) == [str((tmp / "photos" / "damaged.png").resolve())]

    searcher.reload()
    embs, paths, _ = search.load_rows(tmp / "index", searcher.manifest)
    assert len(paths) == 8
    query = searcher.text_query("two tennis courts next to a parking lot")
    got = searcher.rank(query, len(paths))
    brute = embs @ query
    order = np.argsort(-brute, kind="stable")
    assert [r["path"] for r in got] == [paths[i] for i in order]
    np.testing.assert_allclose([r["score"] for r in got], brute[order], rtol=1e-5, atol=1e-6)
    # An indexed image finds itself first (unit vectors: its own score is the largest possible).
    pixels = searcher.read_query_image(paths[3])
    vector = searcher.image_query(pixels)
    assert searcher.rank(vector, 1)[0]["path"] == paths[3]
    texts = ["a lake", "a forest", "two planes on a runway"]
    text_embs = np.asarray(searcher.task.embed_texts(searcher.model, texts))
    assert [r["text"] for r in searcher.rank_texts(vector, texts, 3)] == [texts[i] for i in np.argsort(-(text_embs @ vector))]


def test_the_query_command_prints_the_ranking_and_its_page_renders(index, capsys):
    tmp, args = index
    if not (tmp / "index" / search.MANIFEST).is_file():
        assert search.main(args) == 0
    assert search.main(["query", str(tmp / "index"), "a lake is surrounded by trees", "--top", "5"]) == 0
    out = capsys.readouterr().out
    ranked = [line.split()[2] for line in out.splitlines() if re.match(r"\s+\d+ -?\d\.\d{4} /", line)]
    assert len(ranked) == 5 and "results page" in out
    page = tmp / "index" / "queries" / "a-lake-is-surrounded-by-trees.html"
    rendered = browser.render(page, tmp / "results.png")
    assert rendered.cards == 5
    rendered.assert_all_images_loaded(at_least=5)
    assert not browser.is_blank(rendered.screenshot)


@pytest.mark.slow
def test_a_scene_caption_finds_that_scene_with_the_demo_model_trained_here(tmp_path):
    """The demo model (64 px) trained for 75 steps, in a subprocess on one CPU device; one image
    per scene class indexed; each class's caption (of another image) as a query. Chance puts the
    right scene first for 1 query in 10."""
    overrides = tiny_overrides(tmp_path, "demo", "--config.model.preset=pir_demo", "--config.data.image_size=64",
                               "--config.batch_size=32", "--config.reference_device_batch=32", "--config.max_steps=75",
                               "--config.data.synthetic_train_images=480", "--config.eval_splits=()",
                               "--config.log_every=25")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-m", "rsvl_jax.train", f"--config={REPO}/configs/pir.py:demo", *overrides],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=900)
    scenes = synthetic.generate(40, "test", seed=11, image_size=64)
    first = {}
    for e in scenes:
        first.setdefault(e["label"], e)
    folder = tmp_path / "scenes"
    folder.mkdir()
    for label, e in first.items():
        Image.fromarray(e["image"]).save(folder / f"{synthetic.CLASS_NAMES[label]}.png")
    args = [f"--config={REPO}/configs/pir.py:demo", *overrides, "--checkpoint", str(tmp_path / "demo"),
            str(folder), "--out", str(tmp_path / "index")]
    assert search.main(["index", *args]) == 0
    searcher = search.Searcher(tmp_path / "index")
    queries = {}
    for e in synthetic.generate(60, "val", seed=12, image_size=64):
        queries.setdefault(e["label"], e["captions"][0])
    hits = [pathlib.Path(searcher.rank(searcher.text_query(q), 1)[0]["path"]).stem == synthetic.CLASS_NAMES[label]
            for label, q in sorted(queries.items())]
    assert sum(hits) >= 4, list(zip(sorted(queries.values()), hits))
