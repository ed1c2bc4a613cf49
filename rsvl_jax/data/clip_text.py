"""CLIP's byte-level BPE tokenizer, read from local files only (never the network).

Two file formats give the same tokenizer:

* open_clip's `bpe_simple_vocab_16e6.txt.gz` (or the plain `.txt`): a header line, then one
  merge (`a b`) per line. The vocabulary is built from it as open_clip's SimpleTokenizer
  does: the 256 byte characters (GPT-2's byte-to-unicode table, printable bytes first), the
  same with `</w>` appended, one token per merge (at most 48,894 merges are read), then
  `<|startoftext|>` and `<|endoftext|>`: 49,408 ids for the real file.
* an HF `CLIPTokenizer` directory: `vocab.json` (token -> id) and `merges.txt`.

Text is cleaned as open_clip's default (`ftfy.fix_text` when ftfy is installed, HTML
unescaped twice, whitespace runs collapsed, lowercased), split with CLIP's word pattern, each
word's UTF-8 bytes mapped to characters and merged by rank. `tokenize` gives OpenAI's layout:
start, tokens, end-of-text (the largest id, which the model pools at), zero padding, at most
`context_length` (77) ids, the last one forced to end-of-text when a text is cut.
"""
from __future__ import annotations

import collections
import gzip
import html
import json
import os
import pathlib
from typing import Iterable, Sequence

import numpy as np
import regex

from rsvl_jax.errors import UserError

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77
MAX_MERGES = 49152 - 256 - 2  # merges open_clip reads from its vocabulary file
OPEN_CLIP_FILE = "bpe_simple_vocab_16e6.txt.gz"
_WORDS = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)


class TokenizerError(ValueError, UserError):
    """A tokenizer file is missing or malformed; the message names it."""


def byte_characters() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves,
    the others to chr(256 + n) in byte order. Ordered as the vocabulary lists them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean(text: str) -> str:
    """open_clip's default cleaning: fix mojibake (ftfy, if installed), unescape HTML twice,
    collapse whitespace, strip, lowercase."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def _read_merges(lines: Sequence[str], origin: str) -> list[tuple[str, str]]:
    merges = []
    for n, line in enumerate(lines[1:MAX_MERGES + 1], start=2):
        if not line.strip():
            continue  # a trailing newline, not a merge
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"{origin}: line {n} is not a merge of two symbols: {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


class CLIPTokenizer:
    """Byte-level BPE with CLIP's vocabulary; `tokenize(texts)` -> int32 (N, context_length)."""

    def __init__(self, encoder: dict[str, int], merges: Sequence[tuple[str, str]], origin: str = "tokenizer"):
        for special in (SOT, EOT):
            if special not in encoder:
                raise TokenizerError(f"{origin}: the vocabulary has no {special} token")
        self.encoder = dict(encoder)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.ranks = {tuple(m): r for r, m in enumerate(merges)}
        self.bytes = byte_characters()
        self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
        if self.eot_id != max(self.encoder.values()):
            # The model pools at the largest id of each row; it must be the end-of-text token.
            raise TokenizerError(f"{origin}: {EOT} must have the largest id (has {self.eot_id} of "
                                 f"{max(self.encoder.values())})")
        self.origin = origin
        self._cache = {SOT: [SOT], EOT: [EOT]}

    @property
    def vocab_size(self) -> int:
        return max(self.encoder.values()) + 1

    def get_vocab_size(self) -> int:  # the name `tokenizers.Tokenizer` uses (PIR's checks)
        return self.vocab_size

    def _bpe(self, word: str) -> list[str]:
        """Merge one byte-encoded word by rank; the last symbol carries `</w>`."""
        if word in self._cache:
            return self._cache[word]
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._cache[word] = symbols
        return symbols

    def words(self, text: str) -> list[str]:
        """The cleaned text split into byte-encoded words (what the merges apply to)."""
        return ["".join(self.bytes[b] for b in w.encode("utf-8")) for w in _WORDS.findall(clean(text))]

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start/end tokens."""
        ids = []
        for word in self.words(text):
            for piece in self._bpe(word):
                if piece not in self.encoder:
                    raise TokenizerError(f"{self.origin}: the merges make {piece!r}, which the vocabulary lacks")
                ids.append(self.encoder[piece])
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids up to the end-of-text token (words separated by single spaces)."""
        inverse = {c: b for b, c in self.bytes.items()}
        pieces = []
        for i in ids:
            i = int(i)
            if i == self.eot_id:
                break
            if i != self.sot_id:
                pieces.append(self.decoder[i])
        text = "".join(pieces).replace("</w>", " ")
        raw = bytes(32 if c == " " else inverse[c] for c in text)
        return raw.decode("utf-8", errors="replace").strip()

    def encode_batch(self, texts: Sequence[str], context_length: int = CONTEXT_LENGTH) -> list[list[int]]:
        """[start] + ids + [end-of-text] per text, cut to `context_length` (end kept last)."""
        out = []
        for text in texts:
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = self.eot_id
            out.append(ids)
        return out

    def tokenize(self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
        """int32 (N, context_length): OpenAI/open_clip's `tokenize` (zero padding)."""
        if isinstance(texts, str):
            texts = [texts]
        rows = self.encode_batch(texts, context_length)
        out = np.zeros((len(rows), context_length), np.int32)
        for r, ids in enumerate(rows):
            out[r, :len(ids)] = ids
        return out

    __call__ = tokenize


def vocabulary_from_merges(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """open_clip's vocabulary: bytes, bytes + `</w>`, one token per merge, start, end."""
    chars = list(byte_characters().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
    return {t: i for i, t in enumerate(tokens)}


def load_clip_tokenizer(path: str | os.PathLike) -> CLIPTokenizer:
    """From open_clip's vocabulary file (`.txt.gz` or `.txt`, or a folder holding
    `bpe_simple_vocab_16e6.txt.gz`) or an HF CLIPTokenizer folder (vocab.json + merges.txt)."""
    path = pathlib.Path(path)
    if path.is_dir():
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return _load_hf(path)
        found = sorted(path.glob("*.txt.gz"))
        if not found:
            raise TokenizerError(f"{path}: no CLIP tokenizer here (expected {OPEN_CLIP_FILE} or "
                                 "vocab.json + merges.txt)")
        path = path / OPEN_CLIP_FILE if (path / OPEN_CLIP_FILE).is_file() else found[0]
    if not path.is_file():
        raise TokenizerError(f"{path}: CLIP tokenizer file not found")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read as a BPE merges file: {e}") from e
    merges = _read_merges(lines, str(path))
    return CLIPTokenizer(vocabulary_from_merges(merges), merges, origin=str(path))


def _load_hf(folder: pathlib.Path) -> CLIPTokenizer:
    try:
        with open(folder / "vocab.json", encoding="utf-8") as f:
            encoder = json.load(f)
        with open(folder / "merges.txt", encoding="utf-8") as f:
            lines = f.read().strip().split("\n")
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{folder}: cannot read vocab.json / merges.txt: {e}") from e
    return CLIPTokenizer(encoder, _read_merges(lines, str(folder / "merges.txt")), origin=str(folder))


# ----------------------------------------------------------------------------- small vocabularies
def learn_merges(texts: Iterable[str], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE merges over the words of `texts` (most frequent pair first, ties broken by
    the pair itself, so the result is deterministic). For the demo and the tests: a small
    vocabulary that covers a known corpus, built here rather than downloaded."""
    tok = CLIPTokenizer(vocabulary_from_merges([]), [])
    counts = collections.Counter(w for t in texts for w in tok.words(t))
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): n for w, n in counts.items()}
    merges = []
    while len(merges) < num_merges:
        pairs = collections.Counter()
        for symbols, n in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = {}
        for symbols, n in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            joined[tuple(out)] = joined.get(tuple(out), 0) + n
        words = joined
    return merges


def write_merges_file(path: str | os.PathLike, merges: Sequence[tuple[str, str]]) -> pathlib.Path:
    """An open_clip-format vocabulary file (gzip when the name ends in .gz)."""
    path = pathlib.Path(path)
    body = "#version: rsvl_jax learn_merges\n" + "".join(f"{a} {b}\n" for a, b in merges)
    if path.suffix == ".gz":
        with gzip.GzipFile(path, "wb", mtime=0) as f:  # mtime=0: the same merges, the same bytes
            f.write(body.encode("utf-8"))
    else:
        path.write_text(body, encoding="utf-8")
    return path
