"""Train the small WordPiece vocabulary shipped in data/synthetic_vocab/vocab.txt.

Why: the demo and e2e tests need a tokenizer with no download; BERT's 30k vocabulary is
mostly dead weight for the synthetic captions. Special tokens come first, so [PAD]=0,
[UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4 -- code must read these ids from the vocabulary, never
assume BERT's 100-103.

The WordPiece trainer runs until every caption word is one token, but it breaks ties between
equally frequent merges differently from run to run, so the intermediate pieces it keeps vary.
The shipped file is made reproducible by keeping only the special tokens, every single
character (as a word start and as a ``##`` continuation, so any unseen word still splits
without [UNK]) and the whole words, in sorted order. Rerun after changing the caption grammar:

    python tools/make_demo_vocab.py [--out data/synthetic_vocab]
"""
from __future__ import annotations

import argparse
import pathlib
import string

from tokenizers import BertWordPieceTokenizer

from rsvl_jax.data import synthetic

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ROOT = pathlib.Path(__file__).resolve().parents[1]


def synthetic_captions(num_images: int, seed: int) -> list[str]:
    """Captions of all three splits (the grammar's words are what the demo will see)."""
    captions = []
    for split in synthetic.SPLITS:
        for ex in synthetic.iter_examples(num_images, split, seed, image_size=32):
            captions.extend(ex["captions"])
    return captions


def train_vocab(captions: list[str], vocab_size: int) -> BertWordPieceTokenizer:
    tok = BertWordPieceTokenizer(lowercase=True, strip_accents=True)
    tok.train_from_iterator(
        captions, vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS,
        # every letter and digit is in, so unseen words split into pieces instead of [UNK]
        initial_alphabet=list(string.ascii_lowercase + string.digits), limit_alphabet=1000,
        wordpieces_prefix="##", show_progress=False)
    return tok


def canonical_vocab(trained: dict[str, int], words: set[str]) -> list[str]:
    """Specials, then single characters, then ## characters, then the corpus words (sorted)."""
    chars = sorted(t for t in trained if len(t) == 1)
    cont = sorted(t for t in trained if t.startswith("##") and len(t) == 3)
    missing = words - set(trained)
    if missing:
        raise RuntimeError(f"the trainer did not learn these words as tokens: {sorted(missing)[:10]}")
    singles = set(chars)
    return SPECIAL_TOKENS + chars + cont + sorted(w for w in words if w not in singles)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "data" / "synthetic_vocab"))
    ap.add_argument("--vocab-size", type=int, default=4000, help="upper bound for the trainer")
    ap.add_argument("--num-images", type=int, default=1000, help="per split")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    captions = synthetic_captions(args.num_images, args.seed)
    tok = train_vocab(captions, args.vocab_size)
    pre = tok._tokenizer.pre_tokenizer  # the same word splitting the tokenizer uses
    words = {w for c in captions for w, _ in pre.pre_tokenize_str(tok.normalize(c))}
    vocab = canonical_vocab(tok.get_vocab(), words)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    print(f"wrote {out / 'vocab.txt'}: {len(vocab)} tokens ({len(words)} words)")


if __name__ == "__main__":
    main()
