"""BERT checkpoints -> `rsvl_jax.models.bert.Bert` (family `bert`).

Accepted key layouts (detected from the word-embedding key):

* Hugging Face `BertModel` state dict: `embeddings.*`, `encoder.layer.{l}.*`, LayerNorm
  `weight`/`bias`; `pooler.*` and the `embeddings.position_ids` / `token_type_ids` buffers
  are dropped by named rules.
* The hub `bert-base-uncased` file (`BertForPreTraining`): the same under a `bert.` prefix,
  with TF-legacy LayerNorm names `gamma`/`beta` (spec §6.4); `cls.*` heads and
  `bert.pooler.*` are dropped. The reference loads this file into a bare BertModel, where no
  key matches (quirk Q2); here it loads fully.
* PIR's `text_encoder.*` naming (and X-VLM's `text_encoder.bert.*`).
"""
from __future__ import annotations

from rsvl_jax.convert import Family
from rsvl_jax.convert.core import ConversionError, Entry, Skip, Tensors, linear_entries, norm_entries, strip_prefix
from rsvl_jax.models.bert import PRESETS, Bert, BertConfig

# Prefixes we strip, longest first; the word-embedding key tells which one a file uses.
_PREFIXES = ("text_encoder.bert.", "text_encoder.", "bert.", "")
_ANCHOR = "embeddings.word_embeddings.weight"

SKIPS = [
    Skip("pooler (not built: PIR's BERT has no pooler)", r"pooler\..*"),
    Skip("position/token-type id buffers", r"embeddings\.(position_ids|token_type_ids)"),
    Skip("pre-training heads (cls.*)", r"cls\..*"),
]


def table(config: BertConfig, layout: str = "hf") -> tuple[list[Entry], list[Skip]]:
    """Entries for un-prefixed keys. layout "hf": LayerNorm `weight`/`bias`; "legacy": `gamma`/`beta`.

    Composite converters re-root it with `core.prefixed(entries, "text_encoder", "text_encoder.")`;
    the skip patterns are un-prefixed (a PIR checkpoint has none of those keys anyway).
    """
    if layout not in ("hf", "legacy"):
        raise ValueError(f"unknown BERT layout {layout!r} (known: hf, legacy)")
    w, b = ("weight", "bias") if layout == "hf" else ("gamma", "beta")
    e = [
        Entry("embeddings.word.embedding", ("embeddings.word_embeddings.weight",)),
        Entry("embeddings.position.embedding", ("embeddings.position_embeddings.weight",)),
        Entry("embeddings.token_type.embedding", ("embeddings.token_type_embeddings.weight",)),
        *norm_entries("embeddings.norm", "embeddings.LayerNorm", w, b),
    ]
    for i in range(config.num_layers):
        t, s = f"layers.{i}", f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            e += linear_entries(f"{t}.attn.{name}", f"{s}.attention.self.{name}")
        e += linear_entries(f"{t}.attn_out", f"{s}.attention.output.dense")
        e += norm_entries(f"{t}.attn_norm", f"{s}.attention.output.LayerNorm", w, b)
        e += linear_entries(f"{t}.mlp_in", f"{s}.intermediate.dense")
        e += linear_entries(f"{t}.mlp_out", f"{s}.output.dense")
        e += norm_entries(f"{t}.mlp_norm", f"{s}.output.LayerNorm", w, b)
    return e, list(SKIPS)


def plan(config: BertConfig, tensors: Tensors):
    prefix = next((p for p in _PREFIXES if p + _ANCHOR in tensors), None)
    if prefix is None:
        sample = ", ".join(sorted(tensors)[:8])
        raise ConversionError(
            f"not a BERT checkpoint: no '{_ANCHOR}' under any of the prefixes "
            f"{[p for p in _PREFIXES if p]} or none (first keys: {sample})"
        )
    if prefix:
        tensors = strip_prefix(tensors, prefix)
    legacy = "embeddings.LayerNorm.gamma" in tensors
    entries, skips = table(config, "legacy" if legacy else "hf")
    return tensors, entries, skips


def build(config: BertConfig, rngs) -> Bert:
    return Bert(config, rngs=rngs)


FAMILY = Family("bert", PRESETS, build, plan)

__all__ = ["FAMILY", "SKIPS", "table", "plan", "build"]
