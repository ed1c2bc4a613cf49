"""Converter family `clip_vit`: CLIP ViT image tower -> `rsvl_jax.models.vit.VisionTransformer`.

Accepted key layouts (detected from the tensors):

* `lavis`  - LAVIS `clip_vit_L.pth` (what BITA loads): `conv1.weight`, `class_embedding`,
  `positional_embedding`, `ln_pre.*`, `transformer.resblocks.{i}.{attn.in_proj_*,
  attn.out_proj.*, ln_1.*, mlp.c_fc.*, mlp.c_proj.*, ln_2.*}`, `ln_post.*`, `proj`.
* `openai` - an OpenAI CLIP state dict (`clip.load`): the same under `visual.`; the text
  tower's keys are dropped by a named rule.
* `hf`     - HF `CLIPVisionModel` (bare keys in transformers >= 5) or `CLIPModel` /
  hub checkpoints (`vision_model.` prefix): `embeddings.*`, `pre_layrnorm`,
  `encoder.layers.{i}.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2, layer_norm2}`,
  `post_layernorm`; a CLIPModel's text side is dropped by a named rule.

Blocks beyond `config.layers` and, without `final_norm`, the final LayerNorm are dropped by
named rules (BITA keeps 21 of 24 blocks and loads with strict=False, spec §1.6). `proj` is a
CLIP projection head we never build. A position table for another image size is resized
(spec §1.2, with a warning) if `config.resize_positions_on_load`, else it is an error.
"""
from __future__ import annotations

import re
import warnings

from rsvl_jax.convert import Family
from rsvl_jax.convert.core import (
    ConversionError,
    Entry,
    Skip,
    Tensors,
    conv,
    entry,
    linear,
    linear_entries,
    norm_entries,
    rows,
)
from rsvl_jax.models.vit import PRESETS, ViTConfig, VisionTransformer, resize_positions

LAYOUTS = ("lavis", "openai", "hf")



def hf_layer_entries(ours: str, hf: str) -> list[Entry]:
    """One HF CLIP encoder layer `hf` -> our residual block `ours` (both towers are alike)."""
    e = []
    for name in "qkv":
        e += linear_entries(f"{ours}.attn.{name}", f"{hf}.self_attn.{name}_proj")
    e += linear_entries(f"{ours}.attn.out", f"{hf}.self_attn.out_proj")
    e += norm_entries(f"{ours}.ln_1", f"{hf}.layer_norm1")
    e += linear_entries(f"{ours}.mlp.c_fc", f"{hf}.mlp.fc1")
    e += linear_entries(f"{ours}.mlp.c_proj", f"{hf}.mlp.fc2")
    e += norm_entries(f"{ours}.ln_2", f"{hf}.layer_norm2")
    return e

def int_at_least(n: int) -> str:
    """Regex matching the decimal integers >= n (no leading zeros)."""
    d = len(str(n))
    same = "|".join(str(i) for i in range(n, 10**d))
    return f"(?:{same}|[1-9]\\d{{{d},}})"


def _positions_hook(config: ViTConfig, resize: bool):
    if not resize:
        return lambda t: t

    def hook(t):
        return resize_positions(t, config.grid)

    hook.__name__ = f"resize_positions[{config.grid}x{config.grid}]"
    return hook


def table(config: ViTConfig, layout: str, *, prefix: str | None = None,
          resize: bool = False) -> tuple[list[Entry], list[Skip]]:
    """Entries and skip rules for one layout. `prefix` defaults to the layout's usual one
    (`visual.` for openai, `vision_model.` for hf, none for lavis). `resize` makes the position
    entry resample any square table to `config.grid` (a no-op when it already fits)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown clip_vit layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if prefix is None:
        prefix = {"lavis": "", "openai": "visual.", "hf": "vision_model."}[layout]
    p = prefix
    w = config.width
    e: list[Entry] = []
    skips: list[Skip] = []
    beyond = int_at_least(config.layers)
    pos = _positions_hook(config, resize)
    if layout in ("lavis", "openai"):
        e += [
            entry("conv1.kernel", f"{p}conv1.weight", conv),
            entry("class_embedding", f"{p}class_embedding"),
            entry("positional_embedding", f"{p}positional_embedding", pos),
            *norm_entries("ln_pre", f"{p}ln_pre"),
        ]
        for i in range(config.layers):
            s = f"{p}transformer.resblocks.{i}"
            for j, name in enumerate("qkv"):
                lo, hi = j * w, (j + 1) * w  # fused in_proj rows: q, k, v
                e.append(entry(f"blocks.{i}.attn.{name}.kernel", f"{s}.attn.in_proj_weight", rows(lo, hi, linear)))
                e.append(entry(f"blocks.{i}.attn.{name}.bias", f"{s}.attn.in_proj_bias", rows(lo, hi)))
            e += linear_entries(f"blocks.{i}.attn.out", f"{s}.attn.out_proj")
            e += norm_entries(f"blocks.{i}.ln_1", f"{s}.ln_1")
            e += linear_entries(f"blocks.{i}.mlp.c_fc", f"{s}.mlp.c_fc")
            e += linear_entries(f"blocks.{i}.mlp.c_proj", f"{s}.mlp.c_proj")
            e += norm_entries(f"blocks.{i}.ln_2", f"{s}.ln_2")
        post = f"{p}ln_post"
        skips.append(Skip("blocks beyond config.layers (not built)",
                          rf"{re.escape(p)}transformer\.resblocks\.{beyond}\..*"))
        skips.append(Skip("proj (CLIP projection head, not built)", rf"{re.escape(p)}proj"))
    else:
        emb = f"{p}embeddings"
        e += [
            entry("conv1.kernel", f"{emb}.patch_embedding.weight", conv),
            entry("class_embedding", f"{emb}.class_embedding"),
            entry("positional_embedding", f"{emb}.position_embedding.weight", pos),
            *norm_entries("ln_pre", f"{p}pre_layrnorm"),
        ]
        for i in range(config.layers):
            e += hf_layer_entries(f"blocks.{i}", f"{p}encoder.layers.{i}")
        post = f"{p}post_layernorm"
        skips.append(Skip("blocks beyond config.layers (not built)", rf"{re.escape(p)}encoder\.layers\.{beyond}\..*"))
        skips.append(Skip("position_ids buffer", rf"{re.escape(emb)}\.position_ids"))
    if config.final_norm:
        e += norm_entries("ln_post", post)
    else:
        skips.append(Skip("final LayerNorm (config.final_norm is False)", rf"{re.escape(post)}\.(weight|bias)"))
    return e, skips


# Keys of a full CLIP file that belong to the text tower / the joint head, by layout.
_OPENAI_TEXT = Skip(
    "CLIP text tower and logit scale (not part of the image encoder)",
    r"(positional_embedding|text_projection|logit_scale|token_embedding\.weight|ln_final\.(weight|bias)"
    r"|transformer\.resblocks\.\d+\..*|input_resolution|context_length|vocab_size)",
)
_HF_TEXT = Skip(
    "CLIP text tower and projections (not part of the image encoder)",
    r"(text_model\..*|visual_projection\.weight|text_projection\.weight|logit_scale)",
)


def detect(tensors: Tensors) -> tuple[str, str]:
    """(layout, prefix) of a CLIP image-tower state dict, or a ConversionError."""
    if "visual.conv1.weight" in tensors:
        return "openai", "visual."
    if "conv1.weight" in tensors:
        return "lavis", ""
    for key in tensors:
        if key.endswith("embeddings.patch_embedding.weight"):
            return "hf", key[: -len("embeddings.patch_embedding.weight")]
    raise ConversionError(
        "clip_vit: unrecognised key layout; expected `conv1.weight` (LAVIS), `visual.conv1.weight` (OpenAI) "
        f"or `[vision_model.]embeddings.patch_embedding.weight` (HF). First keys: {sorted(tensors)[:8]}"
    )


def plan(config: ViTConfig, tensors: Tensors):
    layout, prefix = detect(tensors)
    pos_key = f"{prefix}positional_embedding" if layout != "hf" else f"{prefix}embeddings.position_embedding.weight"
    resize = False
    if pos_key in tensors and tuple(tensors[pos_key].shape) != (config.num_positions, config.width):
        shape = tuple(tensors[pos_key].shape)
        if not config.resize_positions_on_load:
            raise ConversionError(
                f"clip_vit: {pos_key} has shape {shape} but a {config.image_size}px / patch {config.patch_size} "
                f"model needs ({config.num_positions}, {config.width}); set ViTConfig.resize_positions_on_load=True "
                "to resize it bicubically (BITA's interpolate_pos_embed)"
            )
        resize = True
        warnings.warn(f"clip_vit: resizing {pos_key} {shape} -> ({config.num_positions}, {config.width}) "
                      "(bicubic, align_corners=True, CLS row kept)", stacklevel=2)
    entries, skips = table(config, layout, prefix=prefix, resize=resize)
    if layout == "openai":
        skips.append(_OPENAI_TEXT)
    elif layout == "hf" and prefix:
        skips.append(_HF_TEXT)
    return tensors, entries, skips


def config_from_hf(d: dict) -> ViTConfig:
    """`ViTConfig` of the whole image tower (every block, `post_layernorm` kept) from an HF
    `CLIPVisionConfig` dict, or a `CLIPConfig` dict (its `vision_config`). For BITA's 21-block
    tower without the final norm use the preset `clip_vit_l14_bita` instead."""
    d = d.get("vision_config", d) if d.get("model_type") == "clip" or "vision_config" in d else d
    act = d.get("hidden_act", "quick_gelu")
    if act != "quick_gelu":
        raise ConversionError(f"clip_vit: hidden_act {act!r} is not supported (our CLIP ViT uses QuickGELU)")
    if d.get("num_channels", 3) != 3:
        raise ConversionError(f"clip_vit: num_channels {d['num_channels']} is not supported (RGB only)")
    return ViTConfig(image_size=d.get("image_size", 224), patch_size=d.get("patch_size", 32),
                     width=d["hidden_size"], layers=d["num_hidden_layers"], heads=d["num_attention_heads"],
                     mlp_dim=d["intermediate_size"], eps=d.get("layer_norm_eps", 1e-5), final_norm=True)


def read_hf_config(path) -> ViTConfig:
    """`config_from_hf` of an HF model directory's `config.json` (or the file itself)."""
    import json
    import pathlib

    path = pathlib.Path(path)
    path = path / "config.json" if path.is_dir() else path
    with open(path) as f:
        return config_from_hf(json.load(f))


def build(config: ViTConfig, rngs):
    return VisionTransformer(config, rngs=rngs)


FAMILY = Family(name="clip_vit", presets=PRESETS, build=build, plan=plan, hf_config=read_hf_config)
