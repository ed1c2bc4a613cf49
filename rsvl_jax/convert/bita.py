"""BITA checkpoints (spec BITA §10) -> `rsvl_jax.models.bita` (families `bita_stage1`, `bita_opt`).

A BITA checkpoint (`{'model': state_dict, 'optimizer': ..., ...}`, §10.1) holds only what BITA
trains: the frozen ViT (`visual_encoder.*`) and OPT (`opt_model.*`) are not saved. So:

* the families convert the *bridge* (`Stage1Bridge` / `OPTBridge`), whose variables are exactly
  the checkpoint's trainable tensors - `python -m rsvl_jax.convert bita_opt ckpt.pth out/` works
  and stays strict;
* `load_bita_stage1(ckpt, vit_source)` and `load_bita_opt(ckpt, vit_source, opt_source)` build
  the whole model from the separate files. Each part is converted strictly by its own family
  (`clip_vit`, `opt`, `bita_*`): every tensor of every file is consumed or dropped by a named
  rule, and the parts are disjoint subtrees, so every variable is filled by exactly one file.
  A checkpoint that does hold `visual_encoder.*` / `opt_model.*` (a run with an unfrozen part,
  or a full `model.state_dict()`) supplies that part itself; giving the same part twice is an error.
* `init_bita_opt_from_stage1(stage1_ckpt, vit_source, opt_source)` is BITA's stage-2
  initialisation (§10.3): the IFT query path and `ln_vision` from stage 1, `opt_proj` fresh.

Accepted stage-1 keys (§10.2, 310 tensors): `query_tokens`, `ln_vision.*`, `{P}bert.*` (IFT),
`{P}cls.*` (MLM head, dropped: never trained), `vision_proj.*`, `text_proj.*`, `itm_head.*`
(dropped: never trained), `temp`. Stage 2 / caption (§10.3, 224 tensors): `query_tokens`,
`ln_vision.*`, `{P}bert.embeddings.{position_ids, LayerNorm.*}`, the 12 layers' Fourier LN,
cross-attention and query FFN, `opt_proj.*`. `{P}` is `Fformer.` (released checkpoints),
`IFformer.` (code before commit 8666b2d) or `Qformer.`; `position_ids` is dropped.
"""
from __future__ import annotations

import re
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from rsvl_jax.convert import Family, get_family, materialize_rngs, resolve_config
from rsvl_jax.convert import qformer as qformer_conv
from rsvl_jax.convert.core import (
    ConversionError,
    Entry,
    Report,
    Skip,
    Tensors,
    convert,
    export as core_export,
    linear_entries,
    norm_entries,
    path_str,
    prefixed,
    read_state_dict,
)
from rsvl_jax.models.bita import PRESETS, BITAConfig, BITAOPT, BITAStage1, OPTBridge, Stage1Bridge

PREFIXES = ("Fformer.", "IFformer.", "Qformer.")
FROZEN = {"vit": "visual_encoder.", "opt": "opt_model."}

_ITM = Skip("itm_head (never trained, not built)", r"itm_head\.(weight|bias)")
_FROZEN_PARTS = Skip("frozen ViT / OPT weights (not in the bridge; load_bita_* converts them)",
                     r"(visual_encoder|opt_model)\..*")
# The reference's save code keeps every state-dict key whose parameter is not frozen; OPT's
# `lm_head.weight` is tied to `embed_tokens` and so is not one of `named_parameters()`, which
# lets it through: a BITA-OPT checkpoint written by the original code has 225 tensors (§10.3's
# 224 + this one). It is the OPT embedding, not a bridge weight.
TIED_LM_HEAD = "opt_model.lm_head.weight"
_TIED_HEAD = Skip("opt_model.lm_head.weight (OPT's tied LM head, written by the reference's save)",
                  re.escape(TIED_LM_HEAD))
_STAGE1_ONLY = Skip("stage-1 heads BITA-OPT does not use (spec 10.3)",
                    r"(vision_proj|text_proj|itm_head)\.(weight|bias)|temp")


def _scalar(t):
    """`temp`: a 0-d tensor (or a 1-element array) -> shape ()."""
    t = np.asarray(t, dtype=np.float32)
    return t.reshape(()) if t.size == 1 else t


def _qformer(config: BITAConfig, prefix: str) -> tuple[list[Entry], list[Skip]]:
    entries, skips = qformer_conv.table(config.qformer, "lavis", prefix=prefix)
    return prefixed(entries, "qformer"), skips


def stage1_table(config: BITAConfig, prefix: str = "Fformer.") -> tuple[list[Entry], list[Skip]]:
    """`Stage1Bridge` <- a stage-1 checkpoint whose IFT lives under `prefix`."""
    entries, skips = _qformer(config, prefix)
    entries += norm_entries("ln_vision", "ln_vision")
    entries += linear_entries("vision_proj", "vision_proj") + linear_entries("text_proj", "text_proj")
    entries.append(Entry("temp", ("temp",), _scalar))
    return entries, skips + [_ITM]


def opt_table(config: BITAConfig, prefix: str = "Fformer.") -> tuple[list[Entry], list[Skip]]:
    """`OPTBridge` <- a stage-2 / caption checkpoint whose IFT lives under `prefix`."""
    entries, skips = _qformer(config, prefix)
    entries += norm_entries("ln_vision", "ln_vision") + linear_entries("opt_proj", "opt_proj")
    return entries, skips


def table(config: BITAConfig, layout: str = "stage1", *, prefix: str = "Fformer.") -> tuple[list[Entry], list[Skip]]:
    """Layouts: "stage1" (§10.2) or "opt" (§10.3)."""
    if layout == "stage1":
        return stage1_table(config, prefix)
    if layout == "opt":
        return opt_table(config, prefix)
    raise ValueError(f"unknown BITA layout {layout!r}; known: stage1, opt")


def reference_names(config: BITAConfig) -> dict[str, str]:
    """Our full-model path (`bridge.…`) -> the reference's state-dict name, for BITA's
    name-based weight-decay rule (§8.1: no decay if ndim < 2 or "bias"/"ln"/"bn" in the name)."""
    entries, _ = table(config, "stage1" if config.opt is None else "opt")
    return {f"bridge.{e.target}": e.sources[0] for e in entries}


# ----------------------------------------------------------------------------------------
# Layout detection and the two families.
# ----------------------------------------------------------------------------------------
def detect_prefix(tensors: Tensors) -> str:
    """The IFT's module prefix (`Fformer.`, `IFformer.` or `Qformer.`), or a ConversionError."""
    for p in PREFIXES:
        if any(k.startswith(f"{p}bert.encoder.layer.0.") for k in tensors):
            if any(re.match(rf"{re.escape(p)}bert\.encoder\.layer\.\d+\.attention\.self\.", k) for k in tensors):
                raise ConversionError(
                    f"{p}bert.encoder.layer.*.attention.self.* found: this is a BLIP-2 Q-Former (self-attention), "
                    "not BITA's Fourier IFT; BITA never loads these weights (spec 10.4) - use family blip2_qformer")
            return p
    raise ConversionError(
        "not a BITA checkpoint: expected the IFT under one of "
        f"{', '.join(p + 'bert.encoder.layer.0.*' for p in PREFIXES)}; first keys: {sorted(tensors)[:8]}")


def plan_stage1(config: BITAConfig, tensors: Tensors):
    prefix = detect_prefix(tensors)
    if "opt_proj.weight" in tensors:
        raise ConversionError("this is a BITA-OPT checkpoint (it has opt_proj.weight): use family bita_opt")
    entries, skips = stage1_table(config, prefix)
    return tensors, entries, skips + [_FROZEN_PARTS]


def plan_opt(config: BITAConfig, tensors: Tensors):
    prefix = detect_prefix(tensors)
    if "opt_proj.weight" not in tensors and "text_proj.weight" in tensors:
        raise ConversionError(
            "this is a stage-1 checkpoint (text_proj, no opt_proj): use family bita_stage1, or "
            "rsvl_jax.convert.bita.init_bita_opt_from_stage1 to start stage 2 from it (spec 10.3)")
    entries, skips = opt_table(config, prefix)
    return tensors, entries, skips + [_TIED_HEAD, _FROZEN_PARTS]


def _stage1_presets():
    return {k: v for k, v in PRESETS.items() if v.opt is None}


def _opt_presets():
    return {k: v for k, v in PRESETS.items() if v.opt is not None}


FAMILIES = {
    "bita_stage1": Family("bita_stage1", _stage1_presets(), lambda c, rngs: Stage1Bridge(c, rngs=rngs), plan_stage1),
    "bita_opt": Family("bita_opt", _opt_presets(), lambda c, rngs: OPTBridge(c, rngs=rngs), plan_opt),
}


# ----------------------------------------------------------------------------------------
# Whole models from several files.
# ----------------------------------------------------------------------------------------
def _name(source) -> str:
    return "state dict" if isinstance(source, Mapping) else str(source)


def _convert_family(family: str, tensors: Tensors, config, source: str, seed: int) -> tuple[nnx.Module, Report]:
    """Strict conversion of one part (abstract build, then fill), with real dropout keys."""
    fam = get_family(family)
    tensors, entries, skips = fam.plan(config, tensors)
    module = nnx.eval_shape(lambda: fam.build(config, nnx.Rngs(0)))
    report = convert(module, tensors, entries, skips, source=f"{source} ({family})")
    materialize_rngs(module, seed)
    return module, report


def _split(tensors: Tensors) -> tuple[dict, dict, dict]:
    """(ViT tensors, OPT tensors, the rest) of a BITA state dict, prefixes removed."""
    parts = {name: {} for name in FROZEN}
    rest = {}
    for k, v in tensors.items():
        for name, p in FROZEN.items():
            if k.startswith(p):
                parts[name][k[len(p):]] = v
                break
        else:
            rest[k] = v
    return parts["vit"], parts["opt"], rest


def _frozen_part(own: dict, source, what: str, arg: str, bita_name: str):
    """The tensors of a frozen part: from the BITA checkpoint or from `source`, never both."""
    if own and source is not None:
        raise ConversionError(
            f"the {what} weights are both in {bita_name} ({len(own)} `{FROZEN[what]}*` tensors) and in "
            f"{_name(source)}; pass {arg}=None to use the checkpoint's, or remove them from it")
    if not own and source is None:
        raise ConversionError(f"{bita_name} holds no {what} weights (BITA does not save frozen parts, spec 10.1): "
                              f"pass {arg}")
    return (own, f"{bita_name}:{FROZEN[what]}*") if own else (read_state_dict(source), _name(source))


def load_bita_stage1(bita_source, vit_source=None, config: BITAConfig | str = "bita_stage1_vitl", *, seed: int = 0,
                     with_report: bool = False):
    """`BITAStage1` from a stage-1 checkpoint + the CLIP ViT file (LAVIS `clip_vit_L.pth`, an
    OpenAI/HF CLIP state dict, see family clip_vit). Returns the model (and {part: Report})."""
    config = resolve_config(FAMILIES["bita_stage1"], config)
    name = _name(bita_source)
    vit_t, opt_t, rest = _split(read_state_dict(bita_source))
    if opt_t:
        raise ConversionError(f"{name}: unexpected keys for a stage-1 model:\n  " +
                              "\n  ".join(sorted(f"opt_model.{k}" for k in opt_t)[:20]))
    bridge, r_bita = _convert_family("bita_stage1", rest, config, name, seed)  # first: fail fast on the BITA file
    vit_t, vit_name = _frozen_part(vit_t, vit_source, "vit", "vit_source", name)
    vit, r_vit = _convert_family("clip_vit", vit_t, config.vit, vit_name, seed)
    model = BITAStage1(config, rngs=nnx.Rngs(seed), visual_encoder=vit, bridge=bridge)
    return (model, {"vit": r_vit, "bita": r_bita}) if with_report else model


def check_tied_lm_head(head, opt_tensors: Tensors, bita_name: str, opt_name: str) -> None:
    """The tied-head rule: a BITA checkpoint's `opt_model.lm_head.weight` must equal the OPT
    weights' `embed_tokens` (compared in float32: the reference stores OPT in float16), else
    the checkpoint was trained on another OPT and loading would be silently wrong."""
    key = next((f"{p}embed_tokens.weight" for p in ("model.decoder.", "decoder.")
                if f"{p}embed_tokens.weight" in opt_tensors), None)
    if key is None:
        raise ConversionError(f"{opt_name}: no embed_tokens.weight to check {bita_name}'s {TIED_LM_HEAD} against")
    emb = np.asarray(opt_tensors[key], np.float32)
    head = np.asarray(head, np.float32)
    if head.shape != emb.shape or not np.array_equal(head, emb):
        what = (f"shape {head.shape} vs {emb.shape}" if head.shape != emb.shape
                else f"max |difference| {np.abs(head - emb).max():.3g}")
        raise ConversionError(
            f"{bita_name}'s {TIED_LM_HEAD} differs from {opt_name}'s {key} ({what}): OPT ties its LM head to the "
            "token embedding, so this checkpoint was saved with other OPT weights; pass the OPT it was trained with")


def load_bita_opt(bita_source, vit_source=None, opt_source=None, config: BITAConfig | str = "bita_opt_2_7b", *,
                  seed: int = 0, with_report: bool = False):
    """`BITAOPT` from a stage-2 / caption checkpoint + the CLIP ViT file + the OPT weights (an
    HF `facebook/opt-2.7b` directory or state dict). Returns the model (and {part: Report})."""
    config = resolve_config(FAMILIES["bita_opt"], config)
    name = _name(bita_source)
    vit_t, opt_t, rest = _split(read_state_dict(bita_source))
    tied = opt_t.pop("lm_head.weight", None) if set(opt_t) == {"lm_head.weight"} else None
    vit_t, vit_name = _frozen_part(vit_t, vit_source, "vit", "vit_source", name)
    if tied is not None and opt_source is None:
        raise ConversionError(f"{name} holds only OPT's tied {TIED_LM_HEAD} (the reference writes it), not the OPT "
                              "weights (spec 10.1): pass opt_source")
    opt_t, opt_name = _frozen_part(opt_t, opt_source, "opt", "opt_source", name)
    if tied is not None:
        check_tied_lm_head(tied, opt_t, name, opt_name)
    bridge, r_bita = _convert_family("bita_opt", rest, config, name, seed)  # first: fail fast on the BITA file
    if tied is not None:
        r_bita.skipped[_TIED_HEAD.name] = 1
    vit, r_vit = _convert_family("clip_vit", vit_t, config.vit, vit_name, seed)
    opt, r_opt = _convert_family("opt", opt_t, config.opt, opt_name, seed + 1)
    model = BITAOPT(config, rngs=nnx.Rngs(seed), visual_encoder=vit, bridge=bridge, opt_model=opt)
    return (model, {"vit": r_vit, "opt": r_opt, "bita": r_bita}) if with_report else model


class _Parts(nnx.Module):
    """A temporary view of some bridge submodules, so `convert` can fill just those strictly."""

    def __init__(self, **modules):
        for k, v in modules.items():
            setattr(self, k, v)


def init_bita_opt_from_stage1(stage1_source, vit_source=None, opt_source=None,
                              config: BITAConfig | str = "bita_opt_2_7b", *, seed: int = 0,
                              with_report: bool = False):
    """BITA's stage-2 start (§9, §10.3): `query_tokens`, `ln_vision` and the IFT query path
    (embedding LN, Fourier LNs, cross-attention, query FFNs) from a stage-1 checkpoint; the
    text side, MLM head, ITC heads and `temp` dropped by named rules; `opt_proj` freshly
    initialised (torch default init, `seed`). Unlike the reference's `strict=False` load,
    a missing query-path tensor is an error (Q20: stage 2 must start from stage-1 weights)."""
    config = resolve_config(FAMILIES["bita_opt"], config)
    name = _name(stage1_source)
    vit_t, opt_t, rest = _split(read_state_dict(stage1_source))
    if opt_t:
        raise ConversionError(f"{name} has opt_model.* tensors: not a stage-1 checkpoint")
    vit_t, vit_name = _frozen_part(vit_t, vit_source, "vit", "vit_source", name)
    opt_t, opt_name = _frozen_part({}, opt_source, "opt", "opt_source", name)
    bridge = OPTBridge(config, rngs=nnx.Rngs(seed))  # opt_proj keeps this init
    r_bita = init_opt_bridge_from_stage1(bridge, rest, name)
    vit, r_vit = _convert_family("clip_vit", vit_t, config.vit, vit_name, seed)
    opt, r_opt = _convert_family("opt", opt_t, config.opt, opt_name, seed + 1)
    model = BITAOPT(config, rngs=nnx.Rngs(seed), visual_encoder=vit, bridge=bridge, opt_model=opt)
    return (model, {"vit": r_vit, "opt": r_opt, "bita": r_bita}) if with_report else model


def init_opt_bridge_from_stage1(bridge: OPTBridge, stage1_source, name: str | None = None) -> Report:
    """Fills `bridge`'s `ln_vision` and IFT query path from a stage-1 checkpoint (a `.pth` or
    its tensors; §10.3), strictly; `opt_proj` keeps its init. The frozen ViT is ignored."""
    name = name or _name(stage1_source)
    vit_t, opt_t, rest = _split(read_state_dict(stage1_source))
    if opt_t:
        raise ConversionError(f"{name} has opt_model.* tensors: not a stage-1 checkpoint")
    entries, skips = _qformer(bridge.config, detect_prefix(rest))  # text=False: the text side is skipped
    entries += norm_entries("ln_vision", "ln_vision")
    return convert(_Parts(ln_vision=bridge.ln_vision, qformer=bridge.qformer), rest, entries,
                   skips + [_STAGE1_ONLY], source=f"{name} (stage 1 -> bita_opt)")


# ----------------------------------------------------------------------------------------
# The way back: a BITA model -> the reference's checkpoint (§10).
# ----------------------------------------------------------------------------------------
_NEVER_TRAINED = re.compile(r"itm_head\.(weight|bias)")


def bita_state_dict(model, *, prefix: str = "Fformer.", lm_head=None, heads_from=None) -> dict[str, np.ndarray]:
    """The reference's `state_dict` of what BITA trains (§10.2 / §10.3), as numpy arrays with
    exactly its key names and PyTorch layouts.

    `model`: `BITAStage1` / `BITAOPT` or their bridge (`Stage1Bridge` / `OPTBridge`). Adds the
    `{prefix}bert.embeddings.position_ids` buffer (int64) the reference saves. For BITA-OPT it
    also writes `opt_model.lm_head.weight`, OPT's tied head, as the reference's save does (225
    tensors): taken from `model.opt_model`, or pass `lm_head` (the OPT `embed_tokens` array)
    with a bare `OPTBridge`.

    Stage 1: the reference also saves its never-trained heads (`Fformer.cls.*`, the MLM head
    with `decoder.weight` tied to the word embeddings, and `itm_head.*`), which we do not build.
    Their values never change in training, so `heads_from` (a path or state dict holding them
    under the reference names, e.g. the stage-1 checkpoint a run started from) copies them,
    with the decoder re-tied to our word embeddings: 310 tensors. Without it they are left out
    (301); the reference's `load_state_dict(strict=False)` then lists them as missing.
    """
    bridge = getattr(model, "bridge", model)
    if not isinstance(bridge, (Stage1Bridge, OPTBridge)):
        raise TypeError(f"expected a BITA model or bridge, got {type(model).__name__}")
    config = bridge.config
    stage1 = isinstance(bridge, Stage1Bridge)
    entries, _ = (stage1_table if stage1 else opt_table)(config, prefix)
    out = core_export(bridge, entries)
    out[f"{prefix}bert.embeddings.position_ids"] = np.arange(config.qformer.max_position_embeddings,
                                                             dtype=np.int64)[None]
    if stage1:
        if heads_from is not None:
            heads = {}
            for k, v in read_state_dict(heads_from).items():
                old = next((p for p in PREFIXES if k.startswith(f"{p}cls.")), None)
                k = prefix + k[len(old):] if old else k
                if k.startswith(f"{prefix}cls.") or _NEVER_TRAINED.fullmatch(k):
                    heads[k] = np.asarray(v)
            if not heads:
                raise ConversionError(f"{_name(heads_from)} holds no {prefix}cls.* / itm_head.* tensors")
            heads[f"{prefix}cls.predictions.decoder.weight"] = out[f"{prefix}bert.embeddings.word_embeddings.weight"]
            out.update(heads)
    else:
        if lm_head is None:
            opt = getattr(model, "opt_model", None)
            if opt is None:
                raise ValueError("a bare OPTBridge: pass lm_head (the OPT's embed_tokens), which the reference's "
                                 f"checkpoint holds as {TIED_LM_HEAD}")
            lm_head = opt.embed_tokens.embedding.get_value()
        out[TIED_LM_HEAD] = np.asarray(lm_head)
    return out


def save_bita_pth(model, path, *, epoch: int = 0, config: Mapping | None = None, prefix: str = "Fformer.",
                  lm_head=None, heads_from=None) -> dict[str, np.ndarray]:
    """Write `model`'s trainable part as the reference writes a checkpoint (§10.1):
    `torch.save({"model": state_dict, "optimizer": None, "config": config or {}, "scaler": None,
    "epoch": epoch}, path)`, loadable by BITA's `load_checkpoint` / `load_from_pretrained` and by
    our `load_bita_*` / families. Returns the numpy state dict (see `bita_state_dict`)."""
    import torch

    sd = bita_state_dict(model, prefix=prefix, lm_head=lm_head, heads_from=heads_from)
    torch_sd = {k: torch.from_numpy(np.array(v, order="C")) for k, v in sd.items()}  # a writable copy
    torch.save({"model": torch_sd, "optimizer": None, "config": dict(config or {}), "scaler": None,
                "epoch": int(epoch)}, str(path))
    return sd




# ----------------------------------------------------------------------------------------
# Stage 1's start: the IFT from BERT-base (§2.8, Q4).
# ----------------------------------------------------------------------------------------
def _fill_available(bridge, entries, tensors: Tensors, source_of, what: str) -> tuple[int, list[str]]:
    """Sets every bridge variable of `entries` whose source (`source_of(entry source)`) is in
    `tensors`; the others keep their init. Embedding tables with fewer rows fill the first ones
    (BERT's 30522 rows into the IFT's 30523). Returns (set, names of those kept)."""
    variables = {path_str(p): v for p, v in nnx.state(bridge, nnx.Param).flat_state()}
    loaded, kept = 0, []
    for e in entries:
        name = source_of(e.sources[0]) if len(e.sources) == 1 else None
        if e.target not in variables:
            continue
        if name is None or name not in tensors:
            kept.append(e.target)
            continue
        value, var = np.asarray(e.hook(tensors[name])), variables[e.target]
        if "word_embeddings" in name and value.ndim == 2 and value.shape[0] < var.shape[0]:
            value = np.concatenate([value, np.asarray(var.get_value())[value.shape[0]:]])
        if value.shape != tuple(var.shape):
            raise ConversionError(f"{what}: {name} has shape {value.shape}, the bridge's {e.target} "
                                  f"{tuple(var.shape)}")
        var.set_value(jnp.asarray(value, var.dtype))
        loaded += 1
    return loaded, kept


def init_stage1_from_bert(bridge, bert_source) -> str:
    """Fills a `Stage1Bridge`'s IFT from BERT weights as the reference's `init_IFT` does:
    word and position embeddings, the embedding LayerNorm and every layer's FFN, each FFN
    copied into its `_query` twin as well; BERT's extra rows are taken up to our vocabulary
    (the `[DEC]` row keeps its N(0, 0.02) init). Cross-attention, the Fourier LayerNorms,
    `query_tokens`, the projections and `temp` keep their fresh init. Returns a summary line."""
    tensors = read_state_dict(bert_source)
    bert = {(k if k.startswith("bert.") else f"bert.{k}"): v for k, v in tensors.items()}
    entries, _ = _qformer(bridge.config, "Fformer.")

    def source_of(src):  # the query FFN starts from its text twin
        return src[len("Fformer."):].replace("_query", "") if src.startswith("Fformer.bert.") else None

    loaded, _ = _fill_available(bridge, entries, bert, source_of, _name(bert_source))
    needed = 3 + 6 * bridge.config.qformer.layers  # embeddings + (text and query FFN) x layers
    if loaded < needed:
        raise ConversionError(f"{_name(bert_source)}: only {loaded} of the {needed} BERT tensors the IFT "
                              "starts from were found (bert.embeddings.*, bert.encoder.layer.*.intermediate/output.*)")
    return f"stage-1 IFT <- {_name(bert_source)} (BERT: {loaded} tensors; cross-attention and Fourier LNs fresh)"


def warm_start_from_blip2(bridge, blip2_source) -> str:
    """A deviation from the reference, offered on request (§10.4, Q4): a `Stage1Bridge` from a
    LAVIS BLIP-2 checkpoint (`Qformer.*` renamed to the IFT's `Fformer.*`): query tokens,
    ln_vision, the projections, temp, the embeddings, every FFN and the cross-attention of the
    even layers. The odd layers' cross-attention and the Fourier LayerNorms (BLIP-2 has neither)
    keep their init; BLIP-2's self-attention is unused."""
    tensors = read_state_dict(blip2_source)
    entries, _ = stage1_table(bridge.config, "Fformer.")

    def source_of(src):
        return "Qformer." + src[len("Fformer."):] if src.startswith("Fformer.") else src

    loaded, kept = _fill_available(bridge, entries, tensors, source_of, _name(blip2_source))
    if not any(k.startswith("Qformer.bert.") for k in tensors):
        raise ConversionError(f"{_name(blip2_source)}: no Qformer.bert.* tensors: not a LAVIS BLIP-2 checkpoint")
    return (f"stage-1 bridge <- BLIP-2 {_name(blip2_source)} (a deviation from BITA, which starts from "
            f"BERT-base): {loaded} tensors; {len(kept)} kept at init (odd-layer cross-attention, Fourier LNs)")


__all__ = ["FAMILIES", "PREFIXES", "table", "stage1_table", "opt_table", "reference_names", "detect_prefix",
           "load_bita_stage1", "load_bita_opt", "init_bita_opt_from_stage1", "check_tied_lm_head", "bita_state_dict",
           "save_bita_pth", "TIED_LM_HEAD", "init_stage1_from_bert", "init_opt_bridge_from_stage1",
           "warm_start_from_blip2"]
