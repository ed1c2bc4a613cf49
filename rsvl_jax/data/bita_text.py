"""BITA tokenisation (spec BITA §2.7, §4.1-4.2, §5), host-side, from local files only.

* Stage 1: BERT-base-uncased word-pieces with `[DEC]` added (id 30522), every text exactly
  `max_len` = 32 ids `[CLS] w... [SEP] [PAD]...` ([SEP] kept on truncation). The IFT's Fourier
  mixing sees the pads (Q2), so this exact padding is part of the model.
* BITA-OPT: the OPT GPT-2 BPE tokenizer (an HF tokenizer directory, read offline). Ids are
  `</s>` (BOS, id 2) + tokens, truncated to `max_len` (BOS included, so a long caption loses its
  "\\n": Q17), right-padded with `<pad>` (1) to the batch's longest. eos = the id of "\\n".
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

from rsvl_jax.data.text import load_bert_tokenizer, pad_batch

DEC_TOKEN = "[DEC]"


# ----------------------------------------------------------------------------- stage 1 (BERT)
def load_bita_bert_tokenizer(vocab_dir_or_file: str | os.PathLike) -> Tokenizer:
    """bert-base-uncased word-pieces from a local vocab.txt, plus BITA's `[DEC]` (next free id)."""
    tok = load_bert_tokenizer(vocab_dir_or_file, lower_case=True)
    tok.add_special_tokens([DEC_TOKEN])
    return tok


def encode_stage1(captions: Sequence[str], tokenizer: Tokenizer, max_len: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) int32 (B, max_len): `[CLS] pieces [SEP]` padded with [PAD]=0 to exactly max_len
    (HF `padding="max_length", truncation=True`; right truncation keeps [SEP] last)."""
    if isinstance(captions, str):
        captions = [captions]
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    pad_id = tokenizer.token_to_id("[PAD]") or 0
    rows = [[cls_id] + e.ids[: max_len - 2] + [sep_id]
            for e in tokenizer.encode_batch(list(captions), add_special_tokens=False)]
    ids = np.full((len(rows), max_len), pad_id, np.int32)
    mask = np.zeros((len(rows), max_len), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


# ----------------------------------------------------------------------------- BITA-OPT (GPT-2 BPE)
def load_opt_tokenizer(path: str | os.PathLike):
    """The OPT tokenizer from a local HF directory (vocab.json + merges.txt or tokenizer.json)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)


def _pieces(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    # BOS is added by us, not by the tokenizer's post-processor, so any GPT-2/OPT tokenizer
    # config gives OPT's "</s> + tokens" (facebook/opt-* prepend </s> and append nothing).
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _pad(rows: list[list[int]], pad_id: int, bucket) -> tuple[np.ndarray, np.ndarray]:
    ids = pad_batch(rows, bucket=bucket, pad_id=pad_id)
    lengths = np.array([len(r) for r in rows])
    mask = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int32)
    return ids, mask


def encode_opt(tokenizer, texts: Sequence[str], max_len: int = 32, bucket=None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) int32 (B, T): BOS + tokens truncated to max_len, right-padded to the longest
    (or up to a bucket length, see `rsvl_jax.data.text.pad_batch`)."""
    if isinstance(texts, str):
        texts = [texts]
    bos = tokenizer.bos_token_id
    rows = [([bos] + p)[:max_len] for p in _pieces(tokenizer, texts)]
    return _pad(rows, tokenizer.pad_token_id, bucket)


def encode_opt_captions(tokenizer, texts: Sequence[str], max_len: int = 32, bucket=None, *,
                        prompt: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Training ids for BITA-OPT (§4.2 steps 3-4): each text + "\\n", encoded as `encode_opt`.

    Mirror (default): `texts` already carry the prompt (`bita_pre_caption(c, prompt=...)`), as
    in the reference, so BPE may merge across the prompt boundary (Q7). Fix: pass the bare
    captions and `prompt=`; prompt and caption are then tokenised separately, so the first
    `opt_prompt_length(tokenizer, prompt)` columns are exactly BOS + prompt.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = [t + "\n" for t in texts]
    if prompt is None:
        return encode_opt(tokenizer, texts, max_len, bucket)
    head = [tokenizer.bos_token_id] + (_pieces(tokenizer, [prompt])[0] if prompt else [])
    rows = [(head + p)[:max_len] for p in _pieces(tokenizer, texts)]
    return _pad(rows, tokenizer.pad_token_id, bucket)


def opt_prompt_length(tokenizer, prompt: str) -> int:
    """Leading text columns that are not LM targets: BOS + prompt tokens ("a photo of" -> 4),
    or 0 for an empty prompt, where BITA keeps BOS as a target (Q18)."""
    if not prompt:
        return 0
    return 1 + len(_pieces(tokenizer, [prompt])[0])


def opt_eos_id(tokenizer) -> int:
    """BITA's eos: the id of "\\n" without special tokens (50118 for OPT)."""
    ids = _pieces(tokenizer, ["\n"])[0]
    if len(ids) != 1:
        raise ValueError(f"'\\n' is not a single token for this tokenizer: {ids}")
    return ids[0]


def decode_captions(tokenizer, tokens, lengths=None) -> list[str]:
    """Generated ids (B, T) -> captions: cut at `lengths`, decode skipping special tokens, strip
    (which removes the "\\n" terminator and leading spaces, §5 step 5)."""
    tokens = np.asarray(tokens)
    if lengths is None:
        rows = [row.tolist() for row in tokens]
    else:
        rows = [row[: int(n)].tolist() for row, n in zip(tokens, np.asarray(lengths))]
    return [t.strip() for t in tokenizer.batch_decode(rows, skip_special_tokens=True)]


__all__ = ["DEC_TOKEN", "load_bita_bert_tokenizer", "encode_stage1", "load_opt_tokenizer", "encode_opt",
           "encode_opt_captions", "opt_prompt_length", "opt_eos_id", "decode_captions"]


def generate_captions(model, images, *, tokenizer, prompt: str | None = None, config=None,
                      rng=None) -> list[str]:
    """Captions as BITA returns them (§5) from a `models.bita.BITAOPT`: beam search from
    `[inputs_opt; embed(BOS + prompt)]`, decoded without special tokens and `.strip()`-ed
    (which drops the "\\n" terminator). `prompt`: default the model's; `config`: default
    `GenerationConfig.bita()` with eos = this tokenizer's "\\n". Lives here, not in the model,
    because it is text handling: models stay free of tokenizers."""
    from rsvl_jax import decoding

    prompt = model.config.prompt if prompt is None else prompt
    if config is None:
        opt = model.config.opt
        config = decoding.GenerationConfig.bita(eos_token_id=opt_eos_id(tokenizer), pad_token_id=opt.pad_token_id,
                                                bos_token_id=opt.bos_token_id)
    prompt_ids, _ = encode_opt(tokenizer, [prompt], max_len=model.config.max_txt_len)
    out = model.generate_ids(images, prompt_ids[0], config=config, rng=rng)
    return decode_captions(tokenizer, np.asarray(out.tokens), np.asarray(out.lengths))
