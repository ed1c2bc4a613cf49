"""Train the tiny byte-level BPE tokenizer shipped in data/synthetic_opt_tokenizer/ (OPT layout).

Why: BITA-OPT's demo and tests need an OPT-style tokenizer with no download; OPT's 50k GPT-2
BPE is far too big for a tiny decoder. The files follow facebook/opt-*: ``vocab.json`` +
``merges.txt`` (GPT-2 byte-level BPE, no prefix space), ``<s>``=0, ``<pad>``=1, ``</s>``=2
(bos = eos), ``<unk>``=3, and "\\n" is its own token "Ċ" (BITA's eos, spec §4.1), so
``rsvl_jax.data.bita_text.load_opt_tokenizer`` reads it like the real one.

The corpus is the synthetic captions after BITA's ``bita_caption`` processing, without and
with the fine-tune prompt "a photo of" (no space, quirk Q7). Newlines are not in the corpus,
so no merge ever swallows "Ċ". Training runs on one thread and the result is checked by
training twice, so the files are reproducible; rerun after changing the caption grammar:

    python tools/make_synthetic_opt_tokenizer.py [--out data/synthetic_opt_tokenizer]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before tokenizers starts its thread pool

from tokenizers import ByteLevelBPETokenizer  # noqa: E402

from rsvl_jax.data import synthetic  # noqa: E402
from rsvl_jax.data.text import bita_pre_caption  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as in OPT
PROMPT = "a photo of"

TOKENIZER_CONFIG = {
    "tokenizer_class": "GPT2Tokenizer",
    "add_bos_token": True,
    "add_prefix_space": False,
    "bos_token": "</s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "errors": "replace",
    "model_max_length": 2048,
    "padding_side": "right",
}
SPECIAL_TOKENS_MAP = {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>",
                      "unk_token": "<unk>"}


def corpus(num_images: int, seed: int) -> list[str]:
    lines = []
    for split in synthetic.SPLITS:
        for ex in synthetic.iter_examples(num_images, split, seed, image_size=32):
            for c in ex["captions"]:
                lines.append(bita_pre_caption(c))
                lines.append(bita_pre_caption(c, prompt=PROMPT))
    return lines


def train(lines: list[str], vocab_size: int, out: pathlib.Path) -> None:
    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=SPECIAL_TOKENS, show_progress=False)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_model(str(out))  # vocab.json + merges.txt
    vocab = json.loads((out / "vocab.json").read_text())
    for i, t in enumerate(SPECIAL_TOKENS):
        if vocab.get(t) != i:
            raise RuntimeError(f"{t} got id {vocab.get(t)}, expected {i}")
    if "Ċ" not in vocab:
        raise RuntimeError("the byte token for '\\n' (Ċ) is missing")
    # sorted keys: the same vocabulary always gives the same bytes
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, sort_keys=True) + "\n",
                                    encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=1) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=1) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "data" / "synthetic_opt_tokenizer"))
    ap.add_argument("--vocab-size", type=int, default=600)
    ap.add_argument("--num-images", type=int, default=400, help="per split")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    lines = corpus(args.num_images, args.seed)
    out = pathlib.Path(args.out)
    train(lines, args.vocab_size, out)
    with tempfile.TemporaryDirectory() as tmp:  # reproducibility check
        train(lines, args.vocab_size, pathlib.Path(tmp))
        for name in ("vocab.json", "merges.txt"):
            if (pathlib.Path(tmp) / name).read_bytes() != (out / name).read_bytes():
                raise RuntimeError(f"training twice gave different {name}")
    n = len(json.loads((out / "vocab.json").read_text()))
    print(f"wrote {out}: {n} tokens from {len(lines)} lines")


if __name__ == "__main__":
    main()
