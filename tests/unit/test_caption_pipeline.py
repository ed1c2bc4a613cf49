"""BITA caption pipeline: bita_caption, OPT target masking, exact resume, eval sharding, GT."""
import json
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from rsvl_jax.data import bita_text, synthetic
from rsvl_jax.data import builders as B
from rsvl_jax.data import caption_pipeline as C
from rsvl_jax.data.text import bita_pre_caption

tfds.disable_progress_bar()
ROOT = pathlib.Path(__file__).resolve().parents[2]
OPT_DIR = ROOT / "data" / "synthetic_opt_tokenizer"
VOCAB = ROOT / "data" / "synthetic_vocab"

WORDS60 = " ".join(f"w{k}" for k in range(60))
TRICKY = [  # (raw caption, prompt, expected bita_caption output)
    ("A plane, parked.  Near the runway!", "", "a plane, parked near the runway"),
    ('Two (white) cars; one "red" car: ~ok* #1', "", "two white cars one red car ok 1"),
    ("It's a well-known road/bridge?", "", "it's a well-known road/bridge?"),
    ("There is a lake.\n", "", "there is a lake"),
    ("line one\nline two", "", "line one\nline two"),  # a lone newline stays
    (WORDS60 + ".", "", " ".join(f"w{k}" for k in range(50))),
    ("There are trees.", "a photo of", "a photo ofthere are trees"),  # no separator (Q7)
    ("  Many   buildings \t  ", "a photo of", "a photo ofmany buildings"),
]


@pytest.fixture(scope="module")
def opt_tok():
    return bita_text.load_opt_tokenizer(OPT_DIR)


@pytest.fixture(scope="module")
def bert_tok():
    return bita_text.load_bita_bert_tokenizer(VOCAB)


def image(seed, size=40):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def tricky_source():
    return [{"image": image(i), "captions": [raw], "image_id": 100 + i, "filename": f"t{i}.png",
             "label": 0} for i, (raw, _, _) in enumerate(TRICKY)]


@pytest.mark.parametrize("raw,prompt,expected", TRICKY)
def test_bita_caption_table(raw, prompt, expected):
    assert bita_pre_caption(raw, 50, prompt) == expected
    assert C.process_captions([raw], prompt) == [expected]


def test_tiny_opt_tokenizer_layout(opt_tok):
    assert (opt_tok.bos_token_id, opt_tok.eos_token_id, opt_tok.pad_token_id) == (2, 2, 1)
    assert opt_tok.convert_ids_to_tokens(0) == "<s>" and opt_tok.convert_ids_to_tokens(3) == "<unk>"
    eos = bita_text.opt_eos_id(opt_tok)
    assert opt_tok.convert_ids_to_tokens(eos) == "Ċ"
    assert bita_text.opt_prompt_length(opt_tok, C.CAPTION_PROMPT) == 4  # </s> a photo of


def test_loader_texts_match_the_table(opt_tok, bert_tok):
    src = tricky_source()
    for stage, prompt in [(1, ""), (3, "a photo of")]:
        tok = bert_tok if stage == 1 else opt_tok
        loader = C.CaptionTrainLoader(src, tok, batch_size=len(src), stage=stage, prompt=prompt,
                                      image_size=32, process_index=0, process_count=1, num_threads=1)
        batch = next(loader)
        for row, mask, image_id in zip(batch["text_ids"], batch["text_mask"], batch["image_id"]):
            raw = TRICKY[image_id - 100][0]
            expected = bita_pre_caption(raw, 50, prompt)
            if stage == 1:
                want, _ = bita_text.encode_stage1([expected], tok)
                assert batch["text_ids"].shape[1] == 32  # always exactly 32 (Q2)
                assert np.array_equal(row, want[0])
            else:
                want, _ = bita_text.encode_opt_captions(tok, [expected], 32)
                n = int(mask.sum())
                assert np.array_equal(row[:n], want[0]) and set(row[n:].tolist()) <= {1}
        if stage == 3:
            assert batch["text_ids"].shape[1] in C.OPT_BUCKETS


def test_opt_target_masking(opt_tok):
    ids = np.array([[2, 10, 11, 12, 13, 202, 1, 1], [2, 20, 21, 202, 1, 1, 1, 1]], np.int32)
    mask = (ids != 1).astype(np.int32)
    assert C.opt_targets(ids, mask, 4).tolist() == [
        [-100, -100, -100, -100, 13, 202, -100, -100], [-100] * 8]
    assert C.opt_targets(ids, mask, 0).tolist() == [  # empty prompt: BOS is a target (Q18)
        [2, 10, 11, 12, 13, 202, -100, -100], [2, 20, 21, 202, -100, -100, -100, -100]]
    src = tricky_source()
    eos = bita_text.opt_eos_id(opt_tok)
    for stage, prompt, plen in [(2, "", 0), (3, "a photo of", 4)]:
        loader = C.CaptionTrainLoader(src, opt_tok, batch_size=len(src), stage=stage, prompt=prompt,
                                      image_size=32, process_index=0, process_count=1, num_threads=1)
        batch = next(loader)
        ids, mask, targets = batch["text_ids"], batch["text_mask"], batch["targets"]
        assert np.array_equal(targets, C.opt_targets(ids, mask, plen))
        assert (ids[:, 0] == 2).all() and (targets[:, 0] == (2 if plen == 0 else -100)).all()
        long_row = list(batch["image_id"]).index(105)  # the 50-word caption
        assert mask[long_row].sum() == 32 and ids[long_row, 31] != eos  # lost its "\n" (Q17)
        others = [r for r in range(len(src)) if r != long_row]
        assert all(ids[r, mask[r].sum() - 1] == eos for r in others)


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_exact_resume_over_concatenated_sources(opt_tok):
    sources = {"a": synthetic.generate(6, "train", seed=0, image_size=32),
               "b": synthetic.generate(5, "train", seed=1, image_size=32)}  # 55 pairs

    def make():
        return C.CaptionTrainLoader(sources, opt_tok, batch_size=8, stage=2, image_size=32, seed=3,
                                    process_index=0, process_count=1, num_threads=2)
    ref = make()
    assert ref.num_items == 55 and ref.steps_per_epoch == 6
    batches = [next(ref) for _ in range(9)]  # crosses the epoch boundary
    assert set(np.concatenate([b["dataset"] for b in batches]).tolist()) == {0, 1}
    for cut in (2, 6, 7):
        run = make()
        for _ in range(cut):
            next(run)
        state = json.loads(json.dumps(run.get_state()))
        resumed = make()
        resumed.set_state(state)
        assert all(_same(batches[k], next(resumed)) for k in range(cut, 9))
    other = C.CaptionTrainLoader(sources, opt_tok, batch_size=8, stage=3, image_size=32, seed=3,
                                 process_index=0, process_count=1)
    with pytest.raises(ValueError, match="bita_stage2"):
        other.set_state(make().get_state())


def test_eval_covers_every_image_once_on_two_hosts():
    src = synthetic.generate(7, "val", seed=0, image_size=32)
    seen, steps = [], []
    for host in range(2):
        ev = C.CaptionEvalImages(src, batch_size=3, image_size=32, process_index=host,
                                 process_count=2, num_threads=1)
        steps.append(len(ev))
        for batch in ev:
            assert batch["image"].shape == (3, 32, 32, 3)
            seen += batch["image_id"][batch["mask"]].tolist()
            assert (batch["image_id"][~batch["mask"]] == -1).all()
    assert steps == [2, 2]
    assert sorted(seen) == sorted(e["image_id"] for e in src)
    # Q8: the eval transform by default, the reference's random train transform behind a flag
    plain = next(iter(C.CaptionEvalImages(src, batch_size=2, image_size=32, process_index=0,
                                          process_count=1)))
    rand = [next(iter(C.CaptionEvalImages(src, batch_size=2, image_size=32, train_transform=True,
                                          seed=5, process_index=0, process_count=1)))
            for _ in range(2)]
    assert np.array_equal(rand[0]["image"], rand[1]["image"])  # deterministic by seed
    assert not np.array_equal(plain["image"], rand[0]["image"])


def test_ground_truth_round_trip_and_max_bleu(tmp_path):
    from rsvl_jax.eval.captioning import caption_metrics

    b = B.build("synthetic", tmp_path / "ds", config=B.synthetic_config(4, 6, 6, image_size=32))
    val = B.open_split(b, "val")
    path = C.write_ground_truth(val, tmp_path / "val_gt.json")
    coco = json.loads(path.read_text())
    assert len(coco["images"]) == 6 and len(coco["annotations"]) == 30
    gts = C.read_ground_truth(path)
    assert gts == C.ground_truth(val)
    assert list(gts) == [int(val[i]["image_id"]) for i in range(6)]  # the ids the batches carry
    test_ids = set(C.ground_truth(B.open_split(b, "test")))
    assert not test_ids & set(gts)  # ids unique across splits
    scores = caption_metrics(gts, {k: refs[0] for k, refs in gts.items()}, tokenizer="simple",
                             meteor=False)
    assert scores["Bleu_1"] == pytest.approx(1.0, abs=1e-6)


def test_ground_truth_rejects_repeated_ids():
    src = synthetic.generate(2, "test", seed=0, image_size=32)
    src[1] = dict(src[1], image_id=src[0]["image_id"])
    with pytest.raises(B.DatasetError, match=r"record 1 .* image id \d+ is also the id of record 0"):
        C.ground_truth(src)


def test_two_hosts_pad_opt_ids_to_the_global_batch(opt_tok):
    """Stages 2-3: the hosts' OPT ids share one padded length per step, and together are the
    one-host batch (so any process count trains on the same batches)."""
    src = synthetic.generate(24, "train", seed=3, image_size=32)
    kw = dict(stage=2, image_size=32, seed=5, num_threads=1)
    one = C.CaptionTrainLoader(src, opt_tok, batch_size=8, process_index=0, process_count=1, **kw)
    hosts = [C.CaptionTrainLoader(src, opt_tok, batch_size=4, process_index=h, process_count=2, **kw)
             for h in (0, 1)]
    for _ in range(one.steps_per_epoch):
        want, got = next(one), [next(h) for h in hosts]
        assert got[0]["text_ids"].shape == got[1]["text_ids"].shape
        for k in want:
            np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k], err_msg=k)
