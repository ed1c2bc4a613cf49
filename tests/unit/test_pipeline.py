"""grain pipelines: batch format, determinism, exact resume, host sharding, eval padding."""
import json
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from rsvl_jax.data import builders as B
from rsvl_jax.data import pipeline as P
from rsvl_jax.data import synthetic, text
from rsvl_jax.data.transforms import TrainTransform

tfds.disable_progress_bar()
VOCAB = pathlib.Path(__file__).resolve().parents[2] / "data" / "synthetic_vocab" / "vocab.txt"


@pytest.fixture(scope="module")
def tok():
    return text.load_bert_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def source():
    return synthetic.generate(30, "train", seed=0, image_size=32)  # 150 caption items


def _loader(source, tok, **kw):
    args = dict(batch_size=8, image_size=32, seed=1, process_index=0, process_count=1,
                num_threads=2)
    args.update(kw)
    return P.TrainLoader(source, tok, **args)


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_demo_vocab_special_ids(tok):
    assert [tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    caps = [c for e in synthetic.generate(50, "test", 3, 32) for c in e["captions"]]
    ids = text.encode_pir(caps, tok)
    assert all(1 not in row for row in ids)  # every synthetic word is in the vocabulary


def test_batch_format(source, tok):
    loader = _loader(source, tok)
    assert loader.num_items == 150 and loader.steps_per_epoch == 150 // 8
    batch = next(loader)
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape[1] % 8 == 0
    assert batch["idx"].dtype == np.int32 and batch["label"].dtype == np.int32
    cls_id = tok.token_to_id("[CLS]")
    for row, idx, label in zip(batch["input_ids"], batch["idx"], batch["label"]):
        rec = source[idx]
        assert label == rec["label"]
        ids = [int(t) for t in row]
        n = len(ids) - ids[::-1].index(next(t for t in ids[::-1] if t != 0))
        assert ids[0] == cls_id and set(ids[n:]) <= {0}
        options = [text.encode_pir([text.pre_caption(c)], tok)[0] for c in rec["captions"]]
        assert ids[:n] in options  # the ids are one of this image's captions


def test_epoch_covers_every_item_once(source, tok):
    loader = _loader(source, tok, batch_size=5)  # 150 = 30 batches, nothing dropped
    assert sorted(loader.epoch_items(0).tolist()) == list(range(150))
    idx = np.concatenate([next(loader)["idx"] for _ in range(loader.steps_per_epoch)])
    assert loader.epoch == 1
    assert idx.tolist() == [int(loader.items[i][0]) for i in loader.epoch_items(0)]
    assert np.bincount(idx).tolist() == [5] * 30  # every image once per caption


def test_determinism_by_seed_and_epoch(source, tok):
    a, b, c = _loader(source, tok), _loader(source, tok), _loader(source, tok, seed=2)
    first = [next(a) for _ in range(3)]
    assert all(_same(x, next(b)) for x in first)
    assert not _same(first[0], next(c))
    assert not np.array_equal(a.epoch_items(0), a.epoch_items(1))
    assert np.array_equal(a.epoch_items(3), _loader(source, tok).epoch_items(3))


def test_state_resume_is_exact(source, tok):
    loader = _loader(source, tok, batch_size=16)  # 9 steps per epoch
    for _ in range(7):
        next(loader)
    state = json.loads(json.dumps(loader.get_state()))
    expected = [next(loader) for _ in range(5)]  # crosses into epoch 1
    assert loader.get_state()["epoch"] == 1
    resumed = _loader(source, tok, batch_size=16)
    resumed.set_state(state)
    assert all(_same(x, next(resumed)) for x in expected)
    with pytest.raises(ValueError, match="seed"):
        _loader(source, tok, batch_size=16, seed=5).set_state(state)
    with pytest.raises(ValueError, match="process_count.*strict=False"):
        _loader(source, tok, batch_size=16, process_count=2).set_state(state)
    # another topology: same epoch, same number of items consumed (7 * 16 = 112 = 14 * 2 * 4)
    other = _loader(source, tok, batch_size=4, process_index=1, process_count=2)
    other.set_state(state, strict=False)
    assert other.get_state()["epoch"] == 0 and other.get_state()["step"] == 14


@pytest.mark.parametrize("n_images", [30, 29])  # 150 items, and 145 (odd: one padded item)
def test_two_hosts_disjoint_and_complete(source, tok, n_images):
    src = source[:n_images]
    hosts = [_loader(src, tok, batch_size=1, process_index=h, process_count=2) for h in (0, 1)]
    shards = [h.epoch_items(4) for h in hosts]
    assert len(shards[0]) == len(shards[1])  # same number of steps on every host
    union = np.concatenate(shards)
    assert set(union.tolist()) == set(range(5 * n_images))
    assert len(union) - len(set(union.tolist())) == (5 * n_images) % 2  # only the pad repeats
    # the hosts' actual batches follow their shards
    b0 = next(_loader(src, tok, batch_size=4, process_index=1, process_count=2))
    items = _loader(src, tok, batch_size=4, process_index=1, process_count=2).epoch_items(0)[:4]
    assert b0["idx"].tolist() == [int(hosts[1].items[i][0]) for i in items]


def test_train_errors(source, tok):
    unlabeled = [dict(e) for e in source[:4]]
    unlabeled[2]["label"] = B.UNKNOWN_LABEL
    with pytest.raises(ValueError, match=r"train record 2 \(train/.*\) has no scene label"):
        _loader(unlabeled, tok)
    _loader(unlabeled, tok, require_label=False)
    with pytest.raises(ValueError, match="no full batch"):
        _loader(source[:2], tok, batch_size=16)
    empty = [dict(e) for e in source[:4]]
    empty[1]["captions"] = ["?!", "...", "(*)", ";", "~"]
    bad = _loader(empty, tok, batch_size=20, transform=TrainTransform(size=32, randaug=None))
    with pytest.raises(ValueError, match=r"train record 1 .* caption \d: caption is empty"):
        next(bad)


def test_eval_images_padded_and_in_order(source):
    src = source[:23]
    hosts = [P.EvalImages(src, batch_size=4, image_size=32, process_index=h, process_count=2,
                          num_threads=2) for h in (0, 1)]
    assert len(hosts[0]) == len(hosts[1]) == 3  # ceil(23 / 8)
    batches = [list(h) for h in hosts]
    order, masks = [], []
    for step in range(3):
        for h in (0, 1):
            b = batches[h][step]
            assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
            order += b["index"].tolist()
            masks += b["mask"].tolist()
    assert order[:23] == list(range(23)) and order[23:] == [-1]
    assert masks == [True] * 23 + [False]
    last = batches[1][2]
    assert np.all(last["image"][3] == 0) and last["label"][2] == src[22]["label"]


def test_eval_texts(source):
    t = P.eval_texts(source[:3])
    assert t.num_images == 3 and len(t.captions) == 15
    assert t.img2txt[1] == [5, 6, 7, 8, 9] and t.txt2img.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert t.captions[5] == text.pre_caption(source[1]["captions"][0])


def test_tfds_source(tmp_path, tok):
    """The same pipeline over a built array_record dataset (encoded images, bytes text)."""
    b = B.build("synthetic", tmp_path, config=B.synthetic_config(20, 6, 0, image_size=32))
    train = B.open_split(b, "train")
    batch = next(P.TrainLoader(train, tok, batch_size=8, image_size=32, process_index=0,
                               process_count=1, num_threads=2))
    assert batch["image"].shape == (8, 32, 32, 3)
    mem = synthetic.generate(20, "train", seed=0, image_size=32)
    same = next(P.TrainLoader(mem, tok, batch_size=8, image_size=32, process_index=0,
                              process_count=1, num_threads=2))
    assert _same(batch, same)  # PNG round trip is lossless: identical batches
    val = B.open_split(b, "val")
    assert P.eval_texts(val).num_images == 6
    assert sum(int(x["mask"].sum()) for x in P.EvalImages(
        val, batch_size=4, image_size=32, process_index=0, process_count=1)) == 6


def test_two_hosts_together_give_the_one_host_batches(source, tok):
    """Each host pads to the length of the *global* batch and takes one block of it, so the
    hosts' batches concatenated in host order equal the one-host batch of twice the size."""
    one = _loader(source, tok, batch_size=8, text_bucket=(8, 12, 16, 24, 32))
    hosts = [_loader(source, tok, batch_size=4, process_index=h, process_count=2, text_bucket=(8, 12, 16, 24, 32))
             for h in (0, 1)]
    assert one.steps_per_epoch == hosts[0].steps_per_epoch
    lengths = set()
    for _ in range(one.steps_per_epoch + 2):  # into the second epoch
        want = next(one)
        got = [next(h) for h in hosts]
        assert got[0]["input_ids"].shape == got[1]["input_ids"].shape  # one shape for all hosts
        joined = {k: np.concatenate([g[k] for g in got]) for k in want}
        assert _same(joined, want)
        lengths.add(want["input_ids"].shape[1])
    assert len(lengths) > 1  # the check covered steps whose hosts' own longest captions differ
