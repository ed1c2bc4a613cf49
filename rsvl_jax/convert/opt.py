"""HF OPT (`OPTForCausalLM`, `OPTModel`, or an HF OPT directory) -> `rsvl_jax.models.opt.OPT`.

Accepted layouts:
* ``causal_lm``: `OPTForCausalLM.state_dict()` keys, `model.decoder.*` (+ `lm_head.weight`);
* ``model``: `OPTModel.state_dict()` keys, `decoder.*` (also how the facebook/opt-* hub
  checkpoints are stored; `lm_head.weight` may or may not be present).

`lm_head.weight` is tied to the token embedding in every OPT release, so it is dropped, but
only after checking that it really equals the embedding: an untied head would otherwise load
silently as the wrong model.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np

from rsvl_jax.convert import Family, from_pytorch
from rsvl_jax.convert.core import ConversionError, Entry, Skip, entry, linear, linear_entries, norm_entries
from rsvl_jax.models.opt import OPT, PRESETS, OPTConfig, read_hf_config

LAYOUTS = {"causal_lm": "model.decoder.", "model": "decoder."}


def table(config: OPTConfig, layout: str = "causal_lm") -> tuple[list[Entry], list[Skip]]:
    """Entries (our path <- torch key) and skip rules for one key layout."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown OPT layout {layout!r}; known: {', '.join(LAYOUTS)}")
    p = LAYOUTS[layout]
    bias = config.enable_bias
    out = [
        entry("embed_tokens.embedding", f"{p}embed_tokens.weight"),
        entry("embed_positions.embedding", f"{p}embed_positions.weight"),
    ]
    if config.has_projection:
        out += [entry("project_in.kernel", f"{p}project_in.weight", linear),
                entry("project_out.kernel", f"{p}project_out.weight", linear)]
    if config.has_final_layer_norm:
        out += norm_entries("final_layer_norm", f"{p}final_layer_norm")
    for i in range(config.layers):
        src, dst = f"{p}layers.{i}", f"layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += linear_entries(f"{dst}.self_attn.{name}", f"{src}.self_attn.{name}", bias)
        out += norm_entries(f"{dst}.self_attn_layer_norm", f"{src}.self_attn_layer_norm")
        out += linear_entries(f"{dst}.fc1", f"{src}.fc1", bias)
        out += linear_entries(f"{dst}.fc2", f"{src}.fc2", bias)
        out += norm_entries(f"{dst}.final_layer_norm", f"{src}.final_layer_norm")
    skips = [Skip("tied lm_head (checked equal to embed_tokens)", r"lm_head\.weight")]
    return out, skips


def detect_layout(tensors) -> str:
    for layout, prefix in LAYOUTS.items():
        if f"{prefix}embed_tokens.weight" in tensors:
            return layout
    sample = ", ".join(sorted(tensors)[:8])
    raise ConversionError(
        "not an OPT checkpoint: expected 'model.decoder.embed_tokens.weight' (OPTForCausalLM) or "
        f"'decoder.embed_tokens.weight' (OPTModel); first keys: {sample}"
    )


def plan(config: OPTConfig, tensors):
    layout = detect_layout(tensors)
    head = tensors.get("lm_head.weight")
    if head is not None:
        emb = tensors[f"{LAYOUTS[layout]}embed_tokens.weight"]
        if head.shape != emb.shape or not np.array_equal(np.asarray(head), np.asarray(emb)):
            raise ConversionError(
                "lm_head.weight differs from embed_tokens.weight: an untied OPT head is not supported "
                "(our logits use the token embedding)"
            )
    entries, skips = table(config, layout)
    return tensors, entries, skips


def build(config: OPTConfig, rngs):
    return OPT(config, rngs=rngs)


def from_hf_dir(path: str | os.PathLike, **config_overrides):
    """(config, model) from an HF OPT directory (`config.json` + weights)."""
    config = read_hf_config(pathlib.Path(path))
    if config_overrides:
        config = dataclasses.replace(config, **config_overrides)
    return config, from_pytorch("opt", str(path), config)


FAMILY = Family("opt", PRESETS, build, plan, hf_config=read_hf_config)
