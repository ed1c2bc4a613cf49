"""Caption normalisation (golden cases) and BERT word-piece parity with HF's slow tokenizer."""
import json

import numpy as np
import pytest

from rsvl_jax.data.text import (bita_pre_caption, encode_pir, eval_text_batches, load_bert_tokenizer,
                                pad_batch, pre_caption)

# ----------------------------------------------------------------------------- pre_caption


def test_pre_caption_golden_cases(fixtures_dir):
    cases = json.loads((fixtures_dir / "pir" / "pre_caption.json").read_text())
    assert len(cases) == 209
    n_errors = 0
    for case in cases:
        if "error" in case:
            assert case["error"] == "ValueError"
            with pytest.raises(ValueError, match="empty after normalisation"):
                pre_caption(case["in"], case["max_words"])
            n_errors += 1
        else:
            assert pre_caption(case["in"], case["max_words"]) == case["out"], case["in"]
    assert n_errors >= 1


def test_pre_caption_max_words():
    assert pre_caption("One two, three.", max_words=2) == "one two"


def test_bita_pre_caption_rules():
    # '.' becomes a space, while ',', "'", '-', '/', '?' survive; runs collapse; 50-word cap.
    assert bita_pre_caption("There's a two-way road, 1/2 full?  Yes.(ok)") == \
        "there's a two-way road, 1/2 full? yes ok"
    assert bita_pre_caption(" A\tB.\n") == "a\tb"
    assert bita_pre_caption(" ".join(["w"] * 60)) == " ".join(["w"] * 50)
    assert bita_pre_caption("...") == ""  # no error, unlike PIR
    # The prompt is glued on with no separator (quirk Q7).
    assert bita_pre_caption("There is a lake.", prompt="a photo of") == "a photo ofthere is a lake"


# ----------------------------------------------------------------------------- tokenizer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "##a", "there", "'", "s", "green",
         "pool", ",", "like", "an", "air", "##plane", "!", "cafe", "naive", "resume", "un", "##aff",
         "##able", "河", "中", "50", "%", "3", ".", "5", "##km", "1", "000", "<", "person", ">", "&",
         "{", "}", "[", "]", "x", "y", "\\", "b", "c", "d", "istanbul", "ecole", "two", "-", "way",
         "’", "e", "token", "mask", "road", "##s", "is", "river", "strasse", "straße", "ß"]

CAPTIONS = [
    "There's a green pool, like an airplane!",
    "Café NAÏVE résumé",                       # accents stripped after lower-casing
    "unaffable xyzzyq roads",                  # pieces, an unknown word, ##s
    "a" * 100 + " " + "a" * 101,               # 100 pieces vs. >100 chars -> [UNK]
    "中国 河流 a河b",                            # CJK characters split individually
    "a\tb\nc\x00d\u200be\u00a0\u3000x",        # control / zero-width / odd spaces
    "a [MASK] token [mask]",                   # a literal special token stays whole
    "50% 3.5km 1,000",
    "<person> & {y} [x] a\\b",
    "İstanbul ÉCOLE Straße",
    "two-way road ’s",                         # curly quote is punctuation
    "e\u0301 a 🙂 river",                        # combining accent, emoji -> [UNK]
    "",
]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return path


def _slow_tokenizer(vocab_file, lower_case=True):
    """HF's slow, pure-Python BertTokenizer (named BertTokenizerLegacy in transformers 5)."""
    bert = pytest.importorskip("transformers.models.bert.tokenization_bert_legacy")
    return bert.BertTokenizerLegacy(str(vocab_file), do_lower_case=lower_case)


def test_word_pieces_match_slow_bert_tokenizer(vocab_file):
    slow = _slow_tokenizer(vocab_file)
    fast = load_bert_tokenizer(vocab_file.parent)  # a folder works too
    for text in CAPTIONS:
        want = slow.tokenize(text)
        got = fast.encode(text, add_special_tokens=False).tokens
        assert got == want, repr(text)
        ids = encode_pir([text], fast)[0]
        assert ids == [2] + slow.convert_tokens_to_ids(want)
    # The cases must exercise the tricky paths, not just whitespace splitting.
    all_pieces = [p for t in CAPTIONS for p in slow.tokenize(t)]
    assert {"[UNK]", "[MASK]", "##aff", "河", "cafe", "istanbul"} <= set(all_pieces)
    assert slow.tokenize("a" * 100) == ["a"] + ["##a"] * 99


def test_cased_tokenizer_matches_slow(vocab_file):
    slow = _slow_tokenizer(vocab_file, lower_case=False)
    fast = load_bert_tokenizer(vocab_file, lower_case=False)
    for text in ["There is a river", "the river, Straße naïve", "a [MASK] b"]:
        assert fast.encode(text, add_special_tokens=False).tokens == slow.tokenize(text)


def test_encode_pir_cls_no_sep_and_truncation(vocab_file):
    tok = load_bert_tokenizer(vocab_file)
    ids = encode_pir(["the river", "a" * 60], tok)
    assert ids[0] == [2, 5, 61]  # [CLS] the river, no [SEP]
    assert len(ids[1]) == 61  # training: never truncated
    long = encode_pir(["a" * 60], tok, max_len=47)[0]
    assert len(long) == 47 and long[0] == 2 and long[1:] == ids[1][1:47]  # 46 pieces kept
    assert 3 not in long
    assert encode_pir("the river", tok) == [ids[0]]


def test_pad_batch_buckets():
    ids = [[2, 5], [2, 5, 6, 7, 8], [2]]
    exact = pad_batch(ids)
    assert exact.dtype == np.int32 and exact.shape == (3, 5)
    np.testing.assert_array_equal(exact[0], [2, 5, 0, 0, 0])
    assert pad_batch(ids, bucket=4).shape == (3, 8)
    assert pad_batch(ids, bucket=(4, 16, 8)).shape == (3, 8)
    assert pad_batch(ids, bucket=(2, 3)).shape == (3, 5)  # longer than all buckets
    np.testing.assert_array_equal(pad_batch(ids, bucket=8, pad_id=-1)[2], [2] + [-1] * 7)


def test_eval_text_batches_chunks_in_file_order(vocab_file):
    tok = load_bert_tokenizer(vocab_file)
    # Chunks of 128 with different longest captions: 60 words (truncated), 20 and 5.
    n_words = [1 + k % 60 for k in range(128)] + [1 + k % 20 for k in range(128)] + [1 + k % 5 for k in range(44)]
    captions = [" ".join(["river"] * n) for n in n_words]
    batches = list(eval_text_batches(captions, tok, chunk=128, max_len=47))
    assert [b.shape[0] for b in batches] == [128, 128, 44]
    flat = encode_pir(captions, tok, max_len=47)
    for c, batch in enumerate(batches):
        chunk = flat[c * 128:(c + 1) * 128]
        assert batch.shape[1] == max(len(x) for x in chunk)  # padded per chunk, not globally
        np.testing.assert_array_equal(batch, pad_batch(chunk))
    assert batches[0].shape[1] == 47  # truncated to 46 pieces + [CLS]
    assert [b.shape[1] for b in batches] == [47, 21, 6]
