"""Converter family `clip`: a whole CLIP model -> `rsvl_jax.models.clip.CLIP`.

Accepted key layouts (detected from the tensors):

* `openai` - OpenAI `clip.load` and open_clip state dicts, the format of RemoteCLIP's and
  GeoRSCLIP's released `.pt` files: `visual.*` (the `clip_vit` table under `visual.`, plus
  `visual.proj`), `token_embedding.weight`, `positional_embedding`,
  `transformer.resblocks.{i}.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`,
  `ln_final`, `text_projection`, `logit_scale`. The fused `in_proj` is split into q/k/v.
* `hf`     - HF `CLIPModel`: `vision_model.*`, `text_model.{embeddings, encoder.layers,
  final_layer_norm}`, `visual_projection.weight`, `text_projection.weight`, `logit_scale`.

Strict: every tensor of the checkpoint is used or dropped by a named rule (only non-weight
metadata and buffers are), so a missing, renamed or extra key is an error naming it. The
activation (QuickGELU or GELU) is not in a state dict: it comes from the config.
"""
from __future__ import annotations

import json
import pathlib

from rsvl_jax.convert import Family
from rsvl_jax.convert import clip_vit
from rsvl_jax.convert.core import ConversionError, Entry, Skip, Tensors, entry, linear, linear_entries, \
    norm_entries, prefixed, rows
from rsvl_jax.models.clip import CLIP, PRESETS, CLIPConfig, CLIPTextConfig

LAYOUTS = ("openai", "hf")


def _vision(config: CLIPConfig, layout: str) -> tuple[list[Entry], list[Skip]]:
    """The image tower's entries from `clip_vit`, re-rooted under `visual`; its rules that drop
    extra blocks or the projection are left out (a whole CLIP loads every tensor)."""
    entries, skips = clip_vit.table(config.vision, layout)
    keep = [s for s in skips if not s.name.startswith(("blocks beyond", "proj "))]
    return prefixed(entries, "visual"), keep


def _text_openai(cfg: CLIPTextConfig) -> list[Entry]:
    w = cfg.width
    e = [entry("text.token_embedding.embedding", "token_embedding.weight"),
         entry("text.positional_embedding", "positional_embedding")]
    for i in range(cfg.layers):
        s, t = f"transformer.resblocks.{i}", f"text.blocks.{i}"
        for j, name in enumerate("qkv"):
            e.append(entry(f"{t}.attn.{name}.kernel", f"{s}.attn.in_proj_weight", rows(j * w, (j + 1) * w, linear)))
            e.append(entry(f"{t}.attn.{name}.bias", f"{s}.attn.in_proj_bias", rows(j * w, (j + 1) * w)))
        e += linear_entries(f"{t}.attn.out", f"{s}.attn.out_proj")
        e += norm_entries(f"{t}.ln_1", f"{s}.ln_1")
        e += linear_entries(f"{t}.mlp.c_fc", f"{s}.mlp.c_fc")
        e += linear_entries(f"{t}.mlp.c_proj", f"{s}.mlp.c_proj")
        e += norm_entries(f"{t}.ln_2", f"{s}.ln_2")
    e += norm_entries("text.ln_final", "ln_final")
    e += [entry("text_projection", "text_projection"), entry("visual_proj", "visual.proj"),
          entry("logit_scale", "logit_scale")]
    return e


def _text_hf(cfg: CLIPTextConfig) -> list[Entry]:
    p = "text_model"
    e = [entry("text.token_embedding.embedding", f"{p}.embeddings.token_embedding.weight"),
         entry("text.positional_embedding", f"{p}.embeddings.position_embedding.weight")]
    for i in range(cfg.layers):
        e += clip_vit.hf_layer_entries(f"text.blocks.{i}", f"{p}.encoder.layers.{i}")
    e += norm_entries("text.ln_final", f"{p}.final_layer_norm")
    # HF projections are bias-free Linears (out, in); ours are (in, out) matrices as OpenAI's.
    e += [entry("text_projection", "text_projection.weight", linear),
          entry("visual_proj", "visual_projection.weight", linear), entry("logit_scale", "logit_scale")]
    return e


_SKIPS = {
    "openai": [Skip("OpenAI metadata (input_resolution, context_length, vocab_size)",
                    r"(input_resolution|context_length|vocab_size)")],
    "hf": [Skip("text position_ids buffer", r"text_model\.embeddings\.position_ids")],
}


def table(config: CLIPConfig, layout: str) -> tuple[list[Entry], list[Skip]]:
    """Entries and skip rules of a whole CLIP in one layout (also used by `export`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown clip layout {layout!r}; known: {', '.join(LAYOUTS)}")
    entries, skips = _vision(config, layout)
    entries += _text_openai(config.text) if layout == "openai" else _text_hf(config.text)
    return entries, skips + _SKIPS[layout]


def detect(tensors: Tensors) -> str:
    if "visual.conv1.weight" in tensors:
        return "openai"
    if "vision_model.embeddings.patch_embedding.weight" in tensors:
        return "hf"
    if "visual.trunk.patch_embed.proj.weight" in tensors or any(k.startswith("text.") for k in tensors):
        raise ConversionError("clip: this is an open_clip timm/custom-text model (`visual.trunk.*` or `text.*` "
                              "keys), not the OpenAI layout; only OpenAI-layout and HF CLIPModel files are supported")
    raise ConversionError("clip: unrecognised key layout; expected `visual.conv1.weight` (OpenAI/open_clip: "
                          "RemoteCLIP, GeoRSCLIP) or `vision_model.embeddings.patch_embedding.weight` "
                          f"(HF CLIPModel). First keys: {sorted(tensors)[:8]}")


def plan(config: CLIPConfig, tensors: Tensors):
    entries, skips = table(config, detect(tensors))
    return tensors, entries, skips


def config_from_hf(d: dict) -> CLIPConfig:
    """`CLIPConfig` from an HF `CLIPConfig` dict (`config.json` of a CLIPModel)."""
    if "vision_config" not in d or "text_config" not in d:
        raise ConversionError("clip: the HF config has no vision_config/text_config (not a CLIPModel config)")
    v, t = d["vision_config"], d["text_config"]
    acts = {v.get("hidden_act", "quick_gelu"), t.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise ConversionError(f"clip: hidden_act {sorted(acts)} is not supported (one of quick_gelu, gelu)")
    vcfg = clip_vit.config_from_hf({**v, "hidden_act": "quick_gelu"})
    tcfg = CLIPTextConfig(vocab_size=t.get("vocab_size", 49408), context_length=t.get("max_position_embeddings", 77),
                          width=t.get("hidden_size", 512), layers=t.get("num_hidden_layers", 12),
                          heads=t.get("num_attention_heads", 8), mlp_dim=t.get("intermediate_size", 2048),
                          eps=t.get("layer_norm_eps", 1e-5))
    return CLIPConfig(vcfg, tcfg, embed_dim=d.get("projection_dim", 512), act=acts.pop())


def read_hf_config(path) -> CLIPConfig:
    path = pathlib.Path(path)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise ConversionError(f"{path}: HF config file not found")
    with open(path) as f:
        return config_from_hf(json.load(f))


def build(config: CLIPConfig, rngs):
    return CLIP(config, rngs=rngs)


FAMILY = Family(name="clip", presets=PRESETS, build=build, plan=plan, hf_config=read_hf_config)

__all__ = ["FAMILY", "LAYOUTS", "config_from_hf", "detect", "plan", "table"]
