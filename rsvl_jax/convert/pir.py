"""PIR checkpoints -> `rsvl_jax.models.pir.PIR` (family `pir`).

Accepted layout: the reference's own state dict (`checkpoint_best.pth` = `{'model': sd,
'config': ...}`, 905 entries for the paper model, spec §6.1), optionally `module.`-prefixed
(the reader strips it). Keys: `temp`, `temp2`, `vision_encoder.*` (Microsoft Swin names),
`text_encoder.*` (HF BERT names), `conv_encoder.*` (PIR's re-indexed ResNet Sequential), the
projections, mappings, heads and PAE blocks. The encoder tables are the encoders' own
converters' tables, re-rooted; the buffers `relative_position_index`, `attn_mask` and
`num_batches_tracked` are dropped by named rules. `conv_encoder.*` is copied as stored (its
weights are whatever the reference had; see §7 Q1).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np

from rsvl_jax.convert import Family
from rsvl_jax.convert import bert as bert_conv
from rsvl_jax.convert import resnet as resnet_conv
from rsvl_jax.convert import swin as swin_conv
from rsvl_jax.convert.core import ConversionError, Entry, Skip, Tensors, linear_entries, norm_entries, prefixed
from rsvl_jax.models.pir import PIR, PIRConfig, PRESETS

LAYOUTS = ("pir",)
_ANCHORS = ("vision_proj.weight", "text_proj.weight")


def _scalar(t):
    """A 0-d temperature (a torch scalar tensor, or a 1-element array) -> shape ()."""
    t = np.asarray(t, dtype=np.float32)
    return t.reshape(()) if t.size == 1 else t


def _block_entries(target: str, source: str, att: str) -> list[Entry]:
    """One MHSA (`att`="mhatt") or CroSA (`att`="mhatt_cross") block."""
    out = []
    for name in ("linear_v", "linear_k", "linear_q", "linear_merge"):
        out += linear_entries(f"{target}.{att}.{name}", f"{source}.{att}.{name}")
    # build_mlp's Sequential: 0 Linear, 1 LayerNorm, 2 GELU, 3 Linear.
    out += linear_entries(f"{target}.ffn.fc1", f"{source}.ffn.0")
    out += norm_entries(f"{target}.ffn.norm", f"{source}.ffn.1")
    out += linear_entries(f"{target}.ffn.fc2", f"{source}.ffn.3")
    out += norm_entries(f"{target}.norm1", f"{source}.norm1")
    out += norm_entries(f"{target}.norm2", f"{source}.norm2")
    return out


def head_table(config: PIRConfig) -> list[Entry]:
    """Everything except the three encoders: temperatures, projections, mappings, heads, PAE."""
    out = []
    if config.has_temp:
        out.append(Entry("temp", ("temp",), _scalar))
    if config.has_temp2:
        out.append(Entry("temp2", ("temp2",), _scalar))
    out += linear_entries("vision_proj", "vision_proj") + linear_entries("text_proj", "text_proj")
    if config.is_baseline:
        return out
    out += linear_entries("conv_proj", "conv_proj")
    for name, n in (("mapping_img", config.instru_num), ("mapping_txt", config.cycle_num)):
        for i in range(n):
            out += linear_entries(f"{name}.{i}", f"{name}.{i}")
    out += linear_entries("head_img", "head_img") + linear_entries("head_txt", "head_txt")
    for name, n, att in (("img_sa", config.instru_num, "mhatt"), ("img_ca", config.instru_num, "mhatt_cross"),
                         ("txt_sa", config.cycle_num, "mhatt"), ("txt_ca", config.cycle_num, "mhatt_cross")):
        for i in range(n):
            out += _block_entries(f"{name}.{i}", f"{name}.{i}", att)
    return out


def _rooted_skips(skips, prefix: str) -> list[Skip]:
    return [Skip(s.name, re.escape(prefix) + s.pattern) for s in skips]


def table(config: PIRConfig, layout: str = "pir") -> tuple[list[Entry], list[Skip]]:
    """The full table for a reference PIR state dict (only layout: "pir")."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown PIR layout {layout!r} (known: {', '.join(LAYOUTS)})")
    entries, skips = [], []
    if config.swin is not None:
        e, s = swin_conv.table(config.swin, "microsoft", "vision_encoder.")
        entries += prefixed(e, "vision_encoder")
        skips += s  # already rooted at vision_encoder.
    if config.bert is not None:
        e, s = bert_conv.table(config.bert, "hf")
        entries += prefixed(e, "text_encoder", "text_encoder.")
        skips += _rooted_skips(s, "text_encoder.")
    if config.resnet is not None and not config.is_baseline:
        e, s = resnet_conv.table(config.resnet, "pir")
        entries += prefixed(e, "conv_encoder", "conv_encoder.")
        skips += _rooted_skips(s, "conv_encoder.")
    entries += head_table(config)
    return entries, skips


def reference_names(config: PIRConfig) -> dict[str, str]:
    """Our variable path -> the reference's state-dict key (e.g. for the optimizer's
    substring-based weight-decay rule, which is defined on reference names, §4.2 / Q12)."""
    entries, _ = table(config, "pir")
    return {e.target: e.sources[0] for e in entries}


def checkpoint_structure(tensors: Tensors) -> dict:
    """The structural config values a PIR state dict implies (from its key names/shapes)."""
    count = lambda name: len({k.split(".")[1] for k in tensors if k.startswith(f"{name}.")})  # noqa: E731
    return {
        "is_baseline": "conv_proj.weight" not in tensors,
        "instru_num": count("mapping_img"),
        "cycle_num": count("mapping_txt"),
        "embed_dim": int(np.shape(tensors["vision_proj.weight"])[0]),
    }


def config_from_reference(reference: Mapping[str, Any], base: PIRConfig | None = None) -> PIRConfig:
    """A PIRConfig from the reference's YAML dict (a checkpoint's `config` entry, §8.1):
    `embed_dim`, `filter_size`, `instru_num`, `cycle_num`, `dropout_r`, `head`, `is_baseline`,
    `temp1`, `temp2`, `use_affil_loss`, `use_triplet_loss`; encoders come from `base`
    (default: the paper preset). Keys it does not know are ignored."""
    base = PRESETS["pir_swin_t"] if base is None else base
    names = {"embed_dim": "embed_dim", "filter_size": "filter_size", "instru_num": "instru_num",
             "cycle_num": "cycle_num", "dropout_r": "dropout", "head": "heads", "is_baseline": "is_baseline",
             "temp1": "temp_init", "temp2": "temp2_init", "use_affil_loss": "use_affil_loss",
             "use_triplet_loss": "use_triplet_loss"}
    return dataclasses.replace(base, **{ours: reference[ref] for ref, ours in names.items() if ref in reference})


def plan(config: PIRConfig, tensors: Tensors):
    missing = [k for k in _ANCHORS if k not in tensors]
    if missing:
        sample = ", ".join(sorted(tensors)[:8])
        raise ConversionError(
            f"not a PIR checkpoint: missing {', '.join(missing)} (first keys: {sample}). "
            "For a bare Swin/BERT/ResNet checkpoint use the swin / bert / resnet50 families."
        )
    found = checkpoint_structure(tensors)
    if found["is_baseline"]:  # a baseline has no mappings: don't compare their counts
        found = {"is_baseline": True, "embed_dim": found["embed_dim"]}
    wrong = [f"{k}={v} (config: {getattr(config, k)})" for k, v in found.items() if getattr(config, k) != v]
    if wrong:
        raise ConversionError(
            f"the checkpoint's structure does not match the config: {', '.join(wrong)}; "
            "build the config from the checkpoint's 'config' entry (config_from_reference)"
        )
    entries, skips = table(config, "pir")
    return tensors, entries, skips


def build(config: PIRConfig, rngs) -> PIR:
    return PIR(config, rngs=rngs)


FAMILY = Family("pir", PRESETS, build, plan)

__all__ = ["FAMILY", "LAYOUTS", "checkpoint_structure", "config_from_reference", "head_table", "reference_names",
           "table", "plan", "build"]
