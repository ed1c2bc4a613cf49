"""Converter family `blip2_qformer`: Q-Former / IFT -> `rsvl_jax.models.qformer.QFormer`.

Accepted key layouts (detected from the tensors):

* `lavis` - LAVIS / BITA naming under a module prefix (`Qformer.` in BLIP-2, `Fformer.` or
  the older `IFformer.` in BITA, none for a bare BertModel state dict):
  `{prefix}bert.embeddings.{word_embeddings, position_embeddings, LayerNorm}`,
  `{prefix}bert.encoder.layer.{l}.{attention.self.*, attention.output.*` (attention mixer) or
  `fourier.output.LayerNorm` (Fourier mixer)`, crossattention.{self,output}.*,
  intermediate, output, intermediate_query, output_query}`, and `query_tokens` at top level.
  `{prefix}cls.*` (the MLM head) and the `position_ids` buffer are dropped by named rules.
* `hf` - HF BLIP-2 (attention mixer only): the `Blip2QFormerModel` keys (`layernorm` fills our
  `embeddings.layer_norm`, `encoder.layer.{l}.{attention,crossattention}.{attention.*,output.*}`,
  FFNs as above), bare or under `qformer.` (Blip2Model & co.). HF's Q-Former owns no word or
  position embeddings and no query tokens: `query_tokens` must be at top level (Blip2Model
  has it; add it yourself for a bare Blip2QFormerModel) and, when the config builds the text
  side, `embeddings.{word,position}_embeddings.weight` at top level
  (Blip2ForImageTextRetrieval / Blip2TextModelWithProjection).

Whole-model checkpoints also hold modules outside the Q-Former (vision tower, `ln_vision`,
projections, LM): `plan` drops those by a named rule; composite converters reuse `table()`
and consume them themselves. With `config.text=False` the text-side tensors of a full
checkpoint are dropped by a named rule (BITA's stage-1 -> stage-2 load, spec §10.3).
"""
from __future__ import annotations

import re

from rsvl_jax.convert import Family
from rsvl_jax.convert.core import ConversionError, Entry, Skip, Tensors, entry, linear_entries, norm_entries
from rsvl_jax.models.qformer import PRESETS, QFormer, QFormerConfig

LAYOUTS = ("lavis", "hf")


def _attention(target: str, src: str, inner: str) -> list[Entry]:
    """A BERT attention block: `{src}.{inner}.{query,key,value}` + `{src}.output.{dense,LayerNorm}`."""
    e = []
    for name in ("query", "key", "value"):
        e += linear_entries(f"{target}.{name}", f"{src}.{inner}.{name}")
    e += linear_entries(f"{target}.out", f"{src}.output.dense")
    e += norm_entries(f"{target}.norm", f"{src}.output.LayerNorm")
    return e


def _ffn(target: str, src: str, suffix: str) -> list[Entry]:
    return [
        *linear_entries(f"{target}.fc1", f"{src}.intermediate{suffix}.dense"),
        *linear_entries(f"{target}.fc2", f"{src}.output{suffix}.dense"),
        *norm_entries(f"{target}.norm", f"{src}.output{suffix}.LayerNorm"),
    ]


def table(config: QFormerConfig, layout: str = "lavis", *, prefix: str | None = None,
          query_key: str = "query_tokens") -> tuple[list[Entry], list[Skip]]:
    """Entries and skip rules for one layout. `prefix` is the Q-Former's module prefix
    (default `Qformer.` for lavis, none for hf); `query_key` names the query-token tensor."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown blip2_qformer layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if layout == "hf" and config.mixer != "attention":
        raise ValueError("the hf layout holds BLIP-2 Q-Formers only (mixer='attention')")
    p = ("Qformer." if layout == "lavis" else "") if prefix is None else prefix
    rp = re.escape(p)
    e = [entry("query_tokens", query_key)]
    skips: list[Skip] = []
    if layout == "lavis":
        emb, enc, inner = f"{p}bert.embeddings", f"{p}bert.encoder.layer", "self"
        e += norm_entries("embeddings.layer_norm", f"{emb}.LayerNorm")
        skips.append(Skip("position_ids buffer", rf"{re.escape(emb)}\.position_ids"))
        skips.append(Skip("MLM head (not built)", rf"{rp}cls\..*"))
    else:
        emb, enc, inner = "embeddings", f"{p}encoder.layer", "attention"
        e += norm_entries("embeddings.layer_norm", f"{p}layernorm")
        skips.append(Skip("position_ids buffer", r"embeddings\.position_ids"))
    if config.text:
        e.append(entry("embeddings.word_embeddings.embedding", f"{emb}.word_embeddings.weight"))
        e.append(entry("embeddings.position_embeddings.embedding", f"{emb}.position_embeddings.weight"))
    else:
        skips.append(Skip("text side (config.text is False)",
                          rf"({re.escape(emb)}\.(word|position)_embeddings\.weight"
                          rf"|{re.escape(enc)}\.\d+\.(intermediate|output)\.(dense|LayerNorm)\.(weight|bias))"))
    for l in range(config.layers):
        s, t = f"{enc}.{l}", f"layers.{l}"
        if config.mixer == "fourier":
            e += norm_entries(f"{t}.mixer.norm", f"{s}.fourier.output.LayerNorm")
        else:
            e += _attention(f"{t}.mixer", f"{s}.attention", inner)
        if config.has_cross_attention(l):
            e += _attention(f"{t}.cross_attn", f"{s}.crossattention", inner)
        e += _ffn(f"{t}.query_ffn", s, "_query")
        if config.text:
            e += _ffn(f"{t}.text_ffn", s, "")
    return e, skips


# Modules of whole BLIP-2 / BITA checkpoints that are not part of the Q-Former.
_OUTSIDE = {
    "lavis": Skip(
        "BLIP-2/BITA modules outside the Q-Former",
        r"(visual_encoder\..*|ln_vision\.(weight|bias)|(vision|text)_proj\.(weight|bias)|itm_head\.(weight|bias)"
        r"|temp|(opt|t5)_proj\.(weight|bias)|(opt|t5)_model\..*)",
    ),
    "hf": Skip(
        "BLIP-2 modules outside the Q-Former",
        r"(vision_model\..*|language_model\..*|language_projection\.(weight|bias)"
        r"|(vision|text)_projection\.(weight|bias)|itm_head\.(weight|bias))",
    ),
}


def detect(tensors: Tensors) -> tuple[str, str]:
    """(layout, Q-Former prefix) of a state dict, or a ConversionError."""
    for key in tensors:
        m = re.match(r"(.*)bert\.encoder\.layer\.0\.", key)
        if m:
            return "lavis", m.group(1)
    for key in tensors:
        m = re.match(r"(.*)encoder\.layer\.0\.", key)
        if m and f"{m.group(1)}layernorm.weight" in tensors:
            return "hf", m.group(1)
    raise ConversionError(
        "blip2_qformer: unrecognised key layout; expected `[prefix.]bert.encoder.layer.0.*` (LAVIS/BITA) or "
        f"`[qformer.]layernorm.weight` + `encoder.layer.0.*` (HF BLIP-2). First keys: {sorted(tensors)[:8]}"
    )


def plan(config: QFormerConfig, tensors: Tensors):
    layout, prefix = detect(tensors)
    if layout == "hf" and config.mixer != "attention":
        raise ConversionError("blip2_qformer: an HF BLIP-2 checkpoint has self-attention; use mixer='attention'")
    entries, skips = table(config, layout, prefix=prefix)
    return tensors, entries, skips + [_OUTSIDE[layout]]


def build(config: QFormerConfig, rngs):
    return QFormer(config, rngs=rngs)


FAMILY = Family(name="blip2_qformer", presets=PRESETS, build=build, plan=plan)
