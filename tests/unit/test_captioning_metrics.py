"""Caption metrics: hand-computed BLEU, sanity orderings, and graceful degradation."""
import math
import shutil

import pytest

from rsvl_jax.eval import captioning
from rsvl_jax.eval.captioning import CaptionMetricsWarning, caption_metrics, simple_tokenize

GTS = {
    1: ["There is a green pool next to the road.", "A green pool beside a road."],
    2: ["Many buildings are near a river.", "Some buildings and a river."],
    3: ["A plane parked at the airport.", "An airplane is on the runway."],
    4: ["Dense trees surround a small farmland.", "A farmland with many trees around it."],
}
SAME = {k: v[0] for k, v in GTS.items()}
UNRELATED = {k: "purple elephants dance quietly" for k in GTS}
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java not installed")


def test_bleu_matches_hand_computation():
    # One image; candidate of 4 tokens, references of 6 and 7 tokens.
    gts = {"x": ["the cat is on the mat", "there is a cat on the mat"]}
    res = {"x": "the the the cat"}
    m = caption_metrics(gts, res, tokenizer="simple", meteor=False, spice=False)
    bp = math.exp(1 - 6 / 4)  # closest reference length is 6 > 4
    p1 = 3 / 4  # "the" clipped to 2 (max count in one reference) + "cat"
    p2 = 1 / 3  # bigrams: "the the" x2, "the cat" (matches)
    assert m["Bleu_1"] == pytest.approx(p1 * bp, rel=1e-6)
    assert m["Bleu_2"] == pytest.approx(math.sqrt(p1 * p2) * bp, rel=1e-6)
    assert m["Bleu_3"] < 1e-5  # no trigram matches


def _check_orderings(good, bad):
    assert good["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert good["ROUGE_L"] == pytest.approx(1.0)
    assert good["CIDEr"] > 1.0
    for key in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert bad[key] < good[key] and bad[key] < 0.05, key


def test_identical_vs_unrelated_simple_tokenizer():
    kw = dict(tokenizer="simple", meteor=False, spice=False)
    _check_orderings(caption_metrics(GTS, SAME, **kw), caption_metrics(GTS, UNRELATED, **kw))


@needs_java
def test_identical_vs_unrelated_ptb_tokenizer():
    kw = dict(meteor=False, spice=False)
    good = caption_metrics(GTS, SAME, **kw)
    _check_orderings(good, caption_metrics(GTS, UNRELATED, **kw))
    # Partial overlap sits in between.
    mid = caption_metrics(GTS, {k: v[1] for k, v in GTS.items()} | {1: "a green road"}, **kw)
    assert 0.05 < mid["CIDEr"] < good["CIDEr"]


@needs_java
def test_simple_tokenizer_agrees_with_ptb_on_plain_captions():
    caps = ["There's a green pool, next to the road.", "Two planes (white) are parked; near 3.5 hangars!",
            "A \"big\" river -- and trees...", "a two-way road, I don't know", "1,000 cars & 50% trees",
            "[x] {y} a/b", "it's the pilots' tree-lined hangar"]
    ptb, _ = captioning._tokenize({i: [c] for i, c in enumerate(caps)}, {}, use_ptb=True)
    assert [ptb[i][0] for i in range(len(caps))] == [simple_tokenize(c) for c in caps]


def test_without_java_falls_back_and_skips_meteor(monkeypatch):
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
    with pytest.warns(CaptionMetricsWarning) as record:
        m = caption_metrics(GTS, SAME, spice=False)
    messages = " ".join(str(w.message) for w in record)
    assert "PTB" in messages and "METEOR" in messages
    assert "METEOR" not in m and m["Bleu_4"] == pytest.approx(1.0, abs=1e-6)


def test_spice_requested_but_unavailable_warns(monkeypatch):
    monkeypatch.setattr(captioning, "spice_available", lambda: False)
    with pytest.warns(CaptionMetricsWarning, match="SPICE"):
        m = caption_metrics(GTS, SAME, tokenizer="simple", meteor=False, spice=True)
    assert "SPICE" not in m and "CIDEr" in m


def test_result_ids_must_match_gt():
    with pytest.raises(ValueError, match="GT ids without a result"):
        caption_metrics(GTS, {1: "a"}, tokenizer="simple", meteor=False)
    with pytest.raises(ValueError, match="not in GT"):
        caption_metrics(GTS, SAME | {99: "a"}, tokenizer="simple", meteor=False)


@pytest.mark.slow
@needs_java
def test_meteor_runs_with_java():
    """METEOR's JVM loads a 60 MB paraphrase table (10-30 s), hence `slow`."""
    good = caption_metrics(GTS, SAME, spice=False)
    assert good["METEOR"] == pytest.approx(1.0, abs=1e-6)
    bad = caption_metrics(GTS, UNRELATED, spice=False)
    assert bad["METEOR"] < 0.1
