"""Swin checkpoints -> `rsvl_jax.models.swin.Swin` (family `swin`).

Accepted key layouts (detected from the keys):

* `microsoft`: the official release (`swin_tiny_patch4_window7_224_22k.pth` = `{'model': sd}`),
  `patch_embed.proj`, `layers.{s}.blocks.{b}.attn.qkv` (fused), `layers.{s}.downsample`, `norm`.
  Its classifier `head.*` is dropped (PIR builds none), as are the `relative_position_index` and
  `attn_mask` buffers (recomputed in code).
* the same under `vision_encoder.` (a PIR checkpoint); every other PIR tensor is dropped by a
  named rule, so a full PIR checkpoint yields its image encoder.
* `hf`: a transformers (>= 5) `SwinModel` state dict: `embeddings.patch_embeddings.projection`,
  `encoder.layers.{s}.blocks.{b}.attention.{q,k,v,o}_proj` (q/k/v fused here),
  `attention.relative_position_bias.relative_position_bias_table`, `layernorm_before/after`,
  `mlp.fc1/fc2`, `encoder.layers.{s}.downsample`, `layernorm`.
* `hf_legacy`: the same model as stored in Hub files / transformers 4
  (`attention.self.{query,key,value}`, `attention.self.relative_position_bias_table`,
  `attention.output.dense`, `intermediate.dense`, `output.dense`, plus the
  `relative_position_index` buffer). Both HF layouts may carry a `swin.` prefix and a
  `classifier.*` head (SwinForImageClassification), which is dropped.
"""
from __future__ import annotations

import dataclasses
import re

from flax import nnx

from rsvl_jax.convert import Family
from rsvl_jax.convert.core import (
    ConversionError,
    Entry,
    Skip,
    Tensors,
    concat_linear,
    conv,
    entry,
    linear,
    linear_entries,
    norm_entries,
)
from rsvl_jax.models.swin import PRESETS, Swin, SwinConfig

LAYOUTS = ("microsoft", "hf", "hf_legacy")


@dataclasses.dataclass(frozen=True)
class _Names:
    """Where each of our sub-modules lives in one source layout."""

    patch_proj: str
    patch_norm: str
    block: str  # format with s, b
    norm1: str
    norm2: str
    qkv: tuple[str, ...]  # one fused Linear, or q, k, v
    proj: str
    table: str
    fc1: str
    fc2: str
    downsample: str  # format with s
    norm: str
    skips: tuple[tuple[str, str], ...]  # (rule name, regex without prefix)


_NAMES = {
    "microsoft": _Names(
        patch_proj="patch_embed.proj", patch_norm="patch_embed.norm", block="layers.{s}.blocks.{b}",
        norm1="norm1", norm2="norm2", qkv=("attn.qkv",), proj="attn.proj",
        table="attn.relative_position_bias_table", fc1="mlp.fc1", fc2="mlp.fc2",
        downsample="layers.{s}.downsample", norm="norm",
        skips=(
            ("relative_position_index buffer", r"layers\.\d+\.blocks\.\d+\.attn\.relative_position_index"),
            ("attn_mask buffer", r"layers\.\d+\.blocks\.\d+\.attn_mask"),
            ("classifier head (not built)", r"head\.(weight|bias)"),
        ),
    ),
    "hf": _Names(
        patch_proj="embeddings.patch_embeddings.projection", patch_norm="embeddings.norm",
        block="encoder.layers.{s}.blocks.{b}", norm1="layernorm_before", norm2="layernorm_after",
        qkv=("attention.q_proj", "attention.k_proj", "attention.v_proj"), proj="attention.o_proj",
        table="attention.relative_position_bias.relative_position_bias_table", fc1="mlp.fc1", fc2="mlp.fc2",
        downsample="encoder.layers.{s}.downsample", norm="layernorm",
        skips=(
            ("relative_position_index buffer",
             r"encoder\.layers\.\d+\.blocks\.\d+\.attention\.relative_position_bias\.relative_position_index"),
            ("mask token (masked image modeling only)", r"embeddings\.mask_token"),
            ("pooler", r"pooler\..*"),
        ),
    ),
    "hf_legacy": _Names(
        patch_proj="embeddings.patch_embeddings.projection", patch_norm="embeddings.norm",
        block="encoder.layers.{s}.blocks.{b}", norm1="layernorm_before", norm2="layernorm_after",
        qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
        proj="attention.output.dense", table="attention.self.relative_position_bias_table",
        fc1="intermediate.dense", fc2="output.dense",
        downsample="encoder.layers.{s}.downsample", norm="layernorm",
        skips=(
            ("relative_position_index buffer",
             r"encoder\.layers\.\d+\.blocks\.\d+\.attention\.self\.relative_position_index"),
            ("mask token (masked image modeling only)", r"embeddings\.mask_token"),
            ("pooler", r"pooler\..*"),
        ),
    ),
}


def table(config: SwinConfig, layout: str, source_prefix: str = "") -> tuple[list[Entry], list[Skip]]:
    """Entries and skip rules for one layout; `source_prefix` (e.g. "vision_encoder.") is put in
    front of every source key and skip pattern, so composite converters can reuse the table."""
    if layout not in _NAMES:
        raise ValueError(f"unknown swin layout {layout!r}; known: {', '.join(LAYOUTS)}")
    n, p = _NAMES[layout], source_prefix
    out = [
        entry("patch_embed.proj.kernel", f"{p}{n.patch_proj}.weight", conv),
        entry("patch_embed.proj.bias", f"{p}{n.patch_proj}.bias"),
        *norm_entries("patch_embed.norm", f"{p}{n.patch_norm}"),
    ]
    for s, depth in enumerate(config.depths):
        for b in range(depth):
            ours, src = f"layers.{s}.blocks.{b}", p + n.block.format(s=s, b=b)
            out += norm_entries(f"{ours}.norm1", f"{src}.{n.norm1}")
            if len(n.qkv) == 1:
                out += linear_entries(f"{ours}.attn.qkv", f"{src}.{n.qkv[0]}", bias=config.qkv_bias)
            else:  # separate q, k, v -> our fused [q | k | v] kernel
                out.append(entry(f"{ours}.attn.qkv.kernel", [f"{src}.{q}.weight" for q in n.qkv], concat_linear))
                if config.qkv_bias:
                    out.append(entry(f"{ours}.attn.qkv.bias", [f"{src}.{q}.bias" for q in n.qkv], concat_linear))
            out += linear_entries(f"{ours}.attn.proj", f"{src}.{n.proj}")
            out.append(entry(f"{ours}.attn.relative_position_bias_table", f"{src}.{n.table}"))
            out += norm_entries(f"{ours}.norm2", f"{src}.{n.norm2}")
            out += linear_entries(f"{ours}.mlp.fc1", f"{src}.{n.fc1}")
            out += linear_entries(f"{ours}.mlp.fc2", f"{src}.{n.fc2}")
        if s < len(config.depths) - 1:
            src = p + n.downsample.format(s=s)
            out += norm_entries(f"layers.{s}.downsample.norm", f"{src}.norm")
            out.append(entry(f"layers.{s}.downsample.reduction.kernel", f"{src}.reduction.weight", linear))
    out += norm_entries("norm", f"{p}{n.norm}")
    skips = [Skip(name, re.escape(p) + pattern) for name, pattern in n.skips]
    return out, skips


def detect_layout(tensors: Tensors) -> tuple[str, str]:
    """(layout, source prefix) of a Swin checkpoint, from marker keys."""
    keys = set(tensors)
    for prefix in ("", "vision_encoder."):
        if f"{prefix}patch_embed.proj.weight" in keys:
            return "microsoft", prefix
    for prefix in ("", "swin."):
        if f"{prefix}embeddings.patch_embeddings.projection.weight" in keys:
            if any(".attention.q_proj." in k for k in keys):
                return "hf", prefix
            if any(".attention.self.query." in k for k in keys):
                return "hf_legacy", prefix
    raise ConversionError(
        "not a Swin checkpoint in a known layout: expected one of the keys 'patch_embed.proj.weight' "
        "(Microsoft), 'vision_encoder.patch_embed.proj.weight' (PIR) or "
        "'[swin.]embeddings.patch_embeddings.projection.weight' (HF, with attention.q_proj or "
        f"attention.self.query); first keys found: {sorted(keys)[:8]}"
    )


def plan(config: SwinConfig, tensors: Tensors):
    layout, prefix = detect_layout(tensors)
    entries, skips = table(config, layout, prefix)
    if prefix == "vision_encoder.":
        skips.append(Skip("other PIR modules (not the vision encoder)", r"(?!vision_encoder\.).*"))
    elif prefix == "swin.":
        skips.append(Skip("classifier head (not built)", r"classifier\.(weight|bias)"))
    return tensors, entries, skips


def build(config: SwinConfig, rngs: nnx.Rngs) -> Swin:
    return Swin(config, rngs=rngs)


FAMILY = Family(name="swin", presets=PRESETS, build=build, plan=plan)
