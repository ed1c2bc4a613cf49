"""Evaluation reports: `evaluate --report` for PIR renders in Chromium with its cards, a non-blank
recall plot and VIR heatmaps; the heatmap is VIR's belief on the Swin grid (7x7 at 224 px); the
captioning report shows every image worst CIDEr first."""
import dataclasses
import re

import jax
import numpy as np
from flax import nnx

from rsvl_jax import checkpoint, evaluate
from rsvl_jax.eval import report
from rsvl_jax.models import bert, pir as pir_lib, resnet, swin
from rsvl_jax.tasks import pir as pir_task
from tests import browser

from .test_pir_evaluate import _args
from .test_pir_train import tiny_config


def _table(text):
    lines = text.strip().splitlines()
    return dict(zip(lines[-2].split(), map(float, lines[-1].split())))


def test_retrieval_report_renders_with_its_cards_plot_and_heatmaps(tmp_path, capsys):
    config = tiny_config(tmp_path, "eval")
    model = pir_task.make(config).make_model()
    checkpoint.save_params(tmp_path / "ckpt", nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
    args = _args(tmp_path) + ["--checkpoint", str(tmp_path / "ckpt")]
    assert evaluate.main(args + ["--report", str(tmp_path / "report")]) == 0
    table = _table(capsys.readouterr().out)  # the metric table is still the last two lines
    assert list(table) == list(pir_task.METRIC_KEYS) and all(0 <= v <= 100 for v in table.values())

    out = tmp_path / "report"
    assert not browser.is_blank(out / "recall.png")
    page = browser.render(out / "index.html", tmp_path / "report.png")
    # 20 test images x 5 captions: 24 sampled caption queries and all 20 image queries
    assert page.cards == 24 + 20
    assert len(re.findall(r'data-kind="t2i"', page.dom)) == 24
    assert len(re.findall(r'alt="VIR belief', page.dom)) == 20
    page.assert_all_images_loaded(at_least=20 + 20 + 1)
    assert not browser.is_blank(page.screenshot)
    ranks = [int(r) for r in re.findall(r'data-kind="t2i" data-rank="(\d+)"', page.dom)]
    assert ranks == sorted(ranks, reverse=True)  # worst first


def test_vir_heatmap_is_the_7x7_grid_of_belief_scores():
    """A 224 px Swin (4 stages, a 7x7 last grid) with tiny widths: the heatmap of each image is
    its belief scores of the 49 grid tokens, laid out row-major."""
    tiny_swin = dataclasses.replace(swin.PRESETS["swin_test"], image_size=224, depths=(1, 1, 1, 1),
                                    num_heads=(1, 1, 2, 2), window_size=7, embed_dim=8)
    cfg = dataclasses.replace(pir_lib.PRESETS["pir_test"], swin=tiny_swin, bert=bert.PRESETS["bert_test"],
                              resnet=resnet.PRESETS["resnet_test"])
    model = pir_lib.PIR(cfg, rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(1), (2, 224, 224, 3))
    maps = pir_task.vir_heatmaps(model, images)
    _, inter = model.encode_image(images)
    scores = np.asarray(inter["belief_scores"])
    assert scores.shape == (2, 50)  # the mean token + 49 grid tokens
    for heat, row in zip(maps, scores):
        assert heat.shape == (7, 7)
        np.testing.assert_allclose(heat.sum(), row[1:].sum(), rtol=1e-6)
        np.testing.assert_allclose(heat.ravel(), row[1:], rtol=1e-6)
        np.testing.assert_allclose(heat.sum() + row[0], row.sum(), rtol=1e-6)


def test_caption_report_renders_every_image_worst_first(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"image_id": i, "file_name": f"img{i}.png", "caption": f"caption {i}"} for i in range(7)]
    ciders = {i: {"CIDEr": float(c)} for i, c in enumerate(rng.uniform(0, 3, 7))}
    refs = {i: [f"reference {i} a", f"reference {i} b"] for i in range(7)}
    pictures = {i: rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for i in range(7)}
    page_path = report.caption_report(tmp_path / "cap", {"CIDEr": 1.2, "Bleu_4": 0.3}, rows, refs, ciders,
                                      lambda r: pictures[r["image_id"]])
    page = browser.render(page_path, tmp_path / "cap.png")
    assert page.cards == 7
    page.assert_all_images_loaded(at_least=7)
    shown = [float(c) for c in re.findall(r'data-cider="([0-9.]+)"', page.dom)]
    assert shown == sorted(shown) and len(shown) == 7
    assert "reference 3 b" in page.dom
    assert not browser.is_blank(page.screenshot)


def test_a_missing_image_is_seen_as_broken(tmp_path):
    page = report.write_page(tmp_path / "p.html", "broken", '<div class="card"><img src="nowhere.jpg"></div>')
    rendered = browser.render(page, tmp_path / "p.png")
    assert rendered.images_state == "broken" and rendered.images_loaded == 0 and rendered.images_total == 1


def _event_images(logdir):
    """{tag: (height, width)} of the image summaries in TensorBoard event files (TFRecord
    framing: length, its CRC, the Event proto, its CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    found = {}
    for path in logdir.glob("events.out.tfevents.*"):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("image"):
                    found[value.tag] = (value.image.height, value.image.width)
    return found


def test_training_sends_the_report_pictures_to_tensorboard(tmp_path):
    from rsvl_jax import train

    config = tiny_config(tmp_path, "run", "--config.data.synthetic_train_images=10", "--config.max_steps=3",
                         "--config.tensorboard_images=3")
    train.train(config)  # 50 captions, batch 16: the epoch ends at step 3, val and test are evaluated
    for split in ("val", "test"):
        out = tmp_path / "run" / "reports" / f"{split}_step3"
        assert (out / "index.html").exists() and not browser.is_blank(out / "recall.png")
    images = _event_images(tmp_path / "run" / "tensorboard")
    assert len(images) == 6 and {"val/recall", "test/recall"} <= set(images), images
    assert all(h > 0 and w > 0 for h, w in images.values())
