"""CLIP BPE tokenizer (data/clip_text.py) from tiny local files: vocabulary layout, both file
formats, HF's CLIPTokenizer on the same files, OpenAI's 77-token layout, user errors."""
import json

import numpy as np
import pytest

from rsvl_jax.data import clip_text as ct
from rsvl_jax.errors import UserError

CORPUS = ["A satellite photo of a parking lot.", "many green trees grow closely together",
          "two white planes near the runway of an airport", "the lake is in the middle of the image"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    merges = ct.learn_merges(CORPUS * 2, 60)
    gz = ct.write_merges_file(d / ct.OPEN_CLIP_FILE, merges)
    hf = d / "hf"
    hf.mkdir()
    (hf / "vocab.json").write_text(json.dumps(ct.vocabulary_from_merges(merges)))
    (hf / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return dict(merges=merges, gz=gz, dir=d, hf=hf)


def test_vocabulary_layout_is_open_clips(files):
    merges = files["merges"]
    vocab = ct.vocabulary_from_merges(merges)
    assert len(vocab) == 512 + len(merges) + 2
    chars = list(ct.byte_characters().values())
    assert len(set(chars)) == 256 and chars[0] == "!" and chars[93] == "~" and chars[188] == chr(256)
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["".join(merges[0])] == 512
    assert vocab[ct.SOT] == len(vocab) - 2 and vocab[ct.EOT] == len(vocab) - 1
    # The real file's size: 48,894 merges read -> 49,408 ids.
    assert 512 + ct.MAX_MERGES + 2 == 49408


def test_both_formats_and_hf_agree(files):
    transformers = pytest.importorskip("transformers")
    a = ct.load_clip_tokenizer(files["gz"])
    b = ct.load_clip_tokenizer(files["hf"])
    c = ct.load_clip_tokenizer(files["dir"])  # a folder holding the open_clip file
    hf = transformers.CLIPTokenizer(str(files["hf"] / "vocab.json"), str(files["hf"] / "merges.txt"))
    texts = CORPUS + ["Zebra   crossing, ünïcode €5", "it's the runway's end", "UPPER case\tand\nnewlines"]
    for t in texts:
        ids = a.encode_batch([t])[0]
        assert ids == b.encode_batch([t])[0] == c.encode_batch([t])[0], t
        assert ids == hf(t)["input_ids"], t
    assert a.decode(a.tokenize("A satellite photo of a parking lot.")[0]) == "a satellite photo of a parking lot ."


def test_tokenize_layout(files):
    tok = ct.load_clip_tokenizer(files["gz"])
    out = tok.tokenize(["a lake", "lake " * 100])
    assert out.shape == (2, 77) and out.dtype == np.int32
    n = len(tok.encode("a lake"))
    assert out[0, 0] == tok.sot_id and out[0, n + 1] == tok.eot_id and not out[0, n + 2:].any()
    assert out[1, -1] == tok.eot_id and (out[1] == tok.eot_id).sum() == 1  # cut, end-of-text kept last
    assert (out.argmax(1) == [n + 1, 76]).all()  # where the model pools
    assert tok.tokenize("a   LAKE &amp;amp; ").tolist() == tok.tokenize("a lake &").tolist()  # open_clip's cleaning


def test_user_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        ct.load_clip_tokenizer(tmp_path / "missing.txt.gz")
    with pytest.raises(UserError, match="no CLIP tokenizer here"):
        ct.load_clip_tokenizer(tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_text("#version\na b c\n")
    with pytest.raises(ct.TokenizerError, match=r"bad\.txt: line 2"):
        ct.load_clip_tokenizer(bad)
