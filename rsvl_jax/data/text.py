"""Caption normalisation and BERT word-piece tokenisation (spec PIR §1.2, §1.4, §5;
BITA §6.3).

Everything here is host-side Python/NumPy; it feeds the grain pipeline and the eval loop.
Tokenizers are read from a local ``vocab.txt`` only, never from the network.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

# ----------------------------------------------------------------------------- captions

_PIR_DELETED = re.compile(r"[,.'!?\"()*#:;~]")   # 13 characters, removed outright
_BITA_SPACED = re.compile(r"[.!\"()*#:;~]")      # 10 characters, replaced by a space
_MULTI_SPACE = re.compile(r"\s{2,}")             # 2+ whitespace chars; a lone \t or \n stays


def _truncate_words(caption: str, max_words: int) -> str:
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def pre_caption(caption: str, max_words: int = 30) -> str:
    """PIR caption normalisation, in the reference's order (spec PIR §1.2).

    Raises ``ValueError`` when nothing is left: the reference crashes on such a sample
    rather than skipping it; callers should add the file and row to the message.
    """
    text = _PIR_DELETED.sub("", caption.lower())
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = _MULTI_SPACE.sub(" ", text).rstrip("\n").strip(" ")
    text = _truncate_words(text, max_words)
    if not text:
        raise ValueError(f"caption is empty after normalisation: {caption!r}")
    return text


def bita_pre_caption(caption: str, max_words: int = 50, prompt: str = "") -> str:
    """BITA's ``bita_caption`` processor (spec BITA §6.3).

    Unlike PIR, punctuation becomes a space (commas, apostrophes, hyphens, slashes and
    '?' are kept) and an empty result is returned, not raised. The prompt is prepended
    with no separator: the shipped fine-tune prompt "a photo of" yields
    "a photo ofthere is ..." (quirk Q7, mirrored; pass "a photo of " to fix it).
    """
    text = _BITA_SPACED.sub(" ", caption.lower())
    text = _MULTI_SPACE.sub(" ", text).rstrip("\n").strip(" ")
    return prompt + _truncate_words(text, max_words)


# ----------------------------------------------------------------------------- tokenizer

_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _read_vocab(path: str) -> dict[str, int]:
    """Token -> line index, read like HF's slow ``load_vocab`` (only '\\n' is stripped)."""
    vocab = {}
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            vocab[line.rstrip("\n")] = index
    return vocab


def load_bert_tokenizer(vocab_dir_or_file: str | os.PathLike, lower_case: bool = True) -> Tokenizer:
    """Fast BERT word-piece tokenizer from a local ``vocab.txt`` (or a folder holding one).

    Configured to split like HF's slow ``BertTokenizer`` used by PIR: clean text, CJK
    characters split, lower-case + accent stripping when ``lower_case``, whitespace and
    punctuation split, greedy longest-match word-pieces with '##' continuations, words
    over 100 characters -> [UNK]. No post-processor: callers add special ids themselves
    (PIR wants [CLS] without [SEP]).
    """
    path = os.fspath(vocab_dir_or_file)
    if os.path.isdir(path):
        path = os.path.join(path, "vocab.txt")
    vocab = _read_vocab(path)
    for needed in ("[UNK]", "[CLS]"):
        if needed not in vocab:
            raise ValueError(f"{path}: vocabulary has no {needed} token")
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lower_case, lowercase=lower_case)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    # Literal special tokens in the text stay whole, as in the slow tokenizer.
    tok.add_special_tokens([t for t in _SPECIAL if t in vocab])
    return tok


def encode_pir(captions: Sequence[str], tokenizer: Tokenizer, max_len: int | None = None) -> list[list[int]]:
    """PIR ids per caption: [CLS] + word-pieces, with NO trailing [SEP] (spec §1.4, Q6).

    ``max_len`` counts the [CLS]: eval uses 47, i.e. at most 46 pieces. Training passes
    None, because the reference's training call never truncates (Q7).
    """
    if isinstance(captions, str):
        captions = [captions]
    cls_id = tokenizer.token_to_id("[CLS]")
    keep = None if max_len is None else max_len - 1
    encodings = tokenizer.encode_batch(list(captions), add_special_tokens=False)
    return [[cls_id] + enc.ids[:keep] for enc in encodings]


def padded_length(longest: int, bucket) -> int:
    """The padded length of a batch whose longest sequence has `longest` ids (see `pad_batch`)."""
    if bucket is None:
        return longest
    if isinstance(bucket, (int, np.integer)):
        return -(-longest // int(bucket)) * int(bucket)
    fits = [b for b in sorted(bucket) if b >= longest]
    # Longer than every bucket: pad to the batch's own longest (one more compiled shape)
    # rather than truncating text or crashing a training run.
    return fits[0] if fits else longest


def pad_batch(id_lists: Sequence[Sequence[int]], bucket=None, pad_id: int = 0) -> np.ndarray:
    """Right-pad to the batch's longest sequence, then up to a bucket length, as int32.

    ``bucket``: None (exact longest), an int (next multiple of it) or a tuple of allowed
    lengths (the smallest one that fits), so jit sees few shapes. PIR passes no mask to
    its text encoder, so extra padding changes its embeddings (Q5): use ``bucket=None``
    where reference numbers matter (evaluation always does, see ``eval_text_batches``).
    """
    longest = max((len(ids) for ids in id_lists), default=0)
    out = np.full((len(id_lists), padded_length(longest, bucket)), pad_id, np.int32)
    for row, ids in enumerate(id_lists):
        out[row, :len(ids)] = ids
    return out


def eval_text_batches(captions: Sequence[str], tokenizer: Tokenizer, chunk: int = 128,
                      max_len: int = 47) -> Iterator[np.ndarray]:
    """PIR eval text batches: consecutive chunks of ``chunk`` captions in file order, each
    truncated to ``max_len`` ids and padded to its own longest caption (spec PIR §5).

    Embeddings depend on this padding (no attention mask), so the chunking must match the
    reference's ``batch_size_test_text`` = 128 to reproduce its numbers.
    """
    captions = list(captions)
    for start in range(0, len(captions), chunk):
        yield pad_batch(encode_pir(captions[start:start + chunk], tokenizer, max_len))
