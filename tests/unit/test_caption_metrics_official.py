"""With Java, `caption_scores` gives pycocoevalcap's own `COCOEvalCap` numbers (corpus and per
image) on a small fixed set, built as the COCO GT + results JSON files BITA's evaluation writes
(spec §7); SPICE is left out on both sides. Also: `write_captions` output, and the loud fallback."""
import json
import shutil

import pytest

from rsvl_jax.eval import captioning
from rsvl_jax.eval.captioning import CaptionMetricsWarning, caption_scores

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java not installed")

# Ids deliberately not in order, results given in another order than GT, punctuation and case
# that the PTB tokenizer must handle.
GTS = {
    31: ["There is a green pool next to the road.", "A green pool beside a road.", "a pool near a road"],
    7: ["Many buildings are near a river.", "Some buildings and a river.", "Buildings, trees and a river!"],
    12: ["A plane parked at the airport.", "An airplane is on the runway.", "Two planes (white) at an airport"],
    3: ["Dense trees surround a small farmland.", "A farmland with many trees around it."],
    18: ["A baseball field is surrounded by trees.", "It's a baseball field near green trees."],
}
RES = {
    12: "an airplane is parked at the airport",
    3: "many trees are around a farmland",
    31: "a green pool is next to a road",
    18: "a baseball field with some trees",
    7: "a river runs past many buildings.",
}
METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


class _NoSpice:
    """Stands in for pycocoevalcap's Spice (needs CoreNLP jars that are downloaded on first use)."""

    def method(self):
        return "SPICE"

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """COCOEvalCap run directly on a GT json and a results json."""
    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    root = tmp_path_factory.mktemp("coco")
    gt_path, res_path = root / "gt.json", root / "res.json"
    gt_path.write_text(json.dumps(captioning.coco_gt(GTS)))
    res_path.write_text(json.dumps([{"image_id": k, "caption": c} for k, c in RES.items()]))
    coco = COCO(str(gt_path))
    ev = coco_eval.COCOEvalCap(coco, coco.loadRes(str(res_path)))
    mp = pytest.MonkeyPatch()
    mp.setattr(coco_eval, "Spice", _NoSpice)
    try:
        ev.evaluate()
    finally:
        mp.undo()
    return ev


@needs_java
def test_equals_coco_eval_cap(official, tmp_path):
    ours = caption_scores(GTS, RES, spice=False)
    assert ours.notes == ()
    for m in METRICS:
        print(f"{m}: ours {ours.corpus[m]:.6f} official {official.eval[m]:.6f}")
        assert ours.corpus[m] == pytest.approx(official.eval[m], abs=1e-9), m
    assert set(ours.corpus) == set(METRICS)
    for k in GTS:
        for m in METRICS:
            assert ours.per_image[k][m] == pytest.approx(official.imgToEval[k][m], abs=1e-9), (k, m)
    assert captioning.agg_metrics(ours.corpus) == pytest.approx(official.eval["CIDEr"] + official.eval["Bleu_4"])

    # The captions file: one row per image, with its per-image CIDEr and BLEU-4; it is also a
    # COCO results file that COCOEvalCap accepts.
    rows = [{"image_id": k, "file_name": f"img_{k}.jpg", "caption": RES[k]} for k in sorted(RES)]
    path = tmp_path / "test_captions.json"
    captioning.write_captions(path, rows, ours)
    written = json.loads(path.read_text())
    assert [r["image_id"] for r in written] == sorted(RES)
    for r in written:
        assert r["file_name"] == f"img_{r['image_id']}.jpg" and r["caption"] == RES[r["image_id"]]
        assert r["CIDEr"] == pytest.approx(official.imgToEval[r["image_id"]]["CIDEr"], abs=1e-9)
        assert r["Bleu_4"] == pytest.approx(official.imgToEval[r["image_id"]]["Bleu_4"], abs=1e-9)
    from pycocotools.coco import COCO
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(captioning.coco_gt(GTS)))
    coco = COCO(str(gt_path))
    assert sorted(coco.loadRes(str(path)).getImgIds()) == sorted(GTS)


def test_without_java_every_approximation_is_named(monkeypatch):
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
    with pytest.warns(CaptionMetricsWarning) as record:
        out = caption_scores(GTS, RES, spice=False)
    messages = [str(w.message) for w in record]
    assert any("PTB tokenizer" in m and "BLEU, ROUGE_L and CIDEr are approximate" in m for m in messages)
    assert any("METEOR skipped" in m for m in messages)
    assert list(out.notes) == messages
    assert "METEOR" not in out.corpus and set(out.per_image) == set(GTS)
    assert all("CIDEr" in v and "Bleu_4" in v for v in out.per_image.values())
