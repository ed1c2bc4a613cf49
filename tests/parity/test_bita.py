"""BITA converters (families bita_stage1 / bita_opt, whole-model loaders) and stage-level parity.

* Key layouts written from spec BITA §10.2 / §10.3 (not from our tables): counted at real size
  (310 / 224 tensors) and dry-run through our plans; converted at tiny size under each accepted
  prefix (`Fformer.`, `IFformer.`, `Qformer.`) and from a `{'model': ...}` `.pth` file.
* Stage-1 ITC on `ift_tiny.npz` (from the IFT input, i.e. after `ln_vision`) and the vision path
  (ViT + `ln_vision`) on `vit_tiny.npz`, both recorded from the reference modules.
* BITA-OPT's LM loss against HF `OPTForCausalLM(inputs_embeds, labels=...)` with the targets
  built the reference's way (§4.2).
"""
import dataclasses
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from rsvl_jax.convert import ConversionError, from_pytorch, get_family
from rsvl_jax.convert import bita as bita_conv
from rsvl_jax.convert.core import module_variables
from rsvl_jax.models import bita
from rsvl_jax.models.vit import PRESETS as VIT_PRESETS

TOL = 1e-5
STAGE1 = bita.PRESETS["bita_stage1_test"]
OPTCFG = bita.PRESETS["bita_opt_test"]


def _maxdiff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ----------------------------------------------------------------------------------------
# Key lists from the spec's tables (§10.2, §10.3).
# ----------------------------------------------------------------------------------------
def _ift_layer(s, D, E, I, text):
    k = {f"{s}.fourier.output.LayerNorm.weight": (D,), f"{s}.fourier.output.LayerNorm.bias": (D,),
         f"{s}.crossattention.self.query.weight": (D, D), f"{s}.crossattention.self.query.bias": (D,),
         f"{s}.crossattention.self.key.weight": (D, E), f"{s}.crossattention.self.key.bias": (D,),
         f"{s}.crossattention.self.value.weight": (D, E), f"{s}.crossattention.self.value.bias": (D,),
         f"{s}.crossattention.output.dense.weight": (D, D), f"{s}.crossattention.output.dense.bias": (D,),
         f"{s}.crossattention.output.LayerNorm.weight": (D,), f"{s}.crossattention.output.LayerNorm.bias": (D,)}
    for suffix in ("_query", "") if text else ("_query",):
        k.update({f"{s}.intermediate{suffix}.dense.weight": (I, D), f"{s}.intermediate{suffix}.dense.bias": (I,),
                  f"{s}.output{suffix}.dense.weight": (D, I), f"{s}.output{suffix}.dense.bias": (D,),
                  f"{s}.output{suffix}.LayerNorm.weight": (D,), f"{s}.output{suffix}.LayerNorm.bias": (D,)})
    return k


def spec_keys(cfg: bita.BITAConfig, stage: str, prefix="Fformer."):
    """{key: shape} of a BITA checkpoint as the spec lists it."""
    q = cfg.qformer
    D, E, I, V, P = q.hidden, q.encoder_width, q.intermediate, q.vocab_size, q.max_position_embeddings
    text = stage == "stage1"
    b = f"{prefix}bert."
    k = {"query_tokens": (1, q.num_query_tokens, D), "ln_vision.weight": (E,), "ln_vision.bias": (E,),
         f"{b}embeddings.position_ids": (1, P),
         f"{b}embeddings.LayerNorm.weight": (D,), f"{b}embeddings.LayerNorm.bias": (D,)}
    if text:
        k[f"{b}embeddings.word_embeddings.weight"] = (V, D)
        k[f"{b}embeddings.position_embeddings.weight"] = (P, D)
    for l in range(q.layers):
        k.update(_ift_layer(f"{b}encoder.layer.{l}", D, E, I, text))
    if text:
        c = f"{prefix}cls.predictions."
        k.update({f"{c}bias": (V,), f"{c}transform.dense.weight": (D, D), f"{c}transform.dense.bias": (D,),
                  f"{c}transform.LayerNorm.weight": (D,), f"{c}transform.LayerNorm.bias": (D,),
                  f"{c}decoder.weight": (V, D), f"{c}decoder.bias": (V,),
                  "vision_proj.weight": (cfg.embed_dim, D), "vision_proj.bias": (cfg.embed_dim,),
                  "text_proj.weight": (cfg.embed_dim, D), "text_proj.bias": (cfg.embed_dim,),
                  "itm_head.weight": (2, D), "itm_head.bias": (2,), "temp": ()})
    else:
        k.update({"opt_proj.weight": (cfg.opt.embed_dim, D), "opt_proj.bias": (cfg.opt.embed_dim,)})
    return k


def random_checkpoint(cfg, stage, seed=0, prefix="Fformer."):
    """Tiny random tensors under the spec's keys (LayerNorm scales away from 1, temp 0.07)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in spec_keys(cfg, stage, prefix).items():
        if key.endswith("position_ids"):
            out[key] = np.arange(shape[1], dtype=np.int64)[None]
        elif key == "temp":
            out[key] = np.float32(0.07)
        elif "LayerNorm.weight" in key or key == "ln_vision.weight":
            out[key] = (1.0 + 0.3 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[key] = (0.2 * rng.standard_normal(shape)).astype(np.float32)
    c = f"{prefix}cls.predictions."
    if c + "decoder.weight" in out:  # tied / aliased tensors, as torch saves them
        out[c + "decoder.weight"] = out[f"{prefix}bert.embeddings.word_embeddings.weight"]
        out[c + "decoder.bias"] = out[c + "bias"]
    return out


def _flat(module):
    return {k: np.asarray(v.get_value()) for k, v in module_variables(module).items()}


# ----------------------------------------------------------------------------------------
# Real-size layouts, dry run (no arrays materialised).
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,preset,stage,count,skipped,n_params", [
    # Spec §2.11: stage-1 trainable 171,360,062 minus the unbuilt itm_head (1,538) and MLM head
    # (bias 30,523 + transform 590,592 + LN 1,536; its decoder is tied); stage 2: 91,788,288.
    ("bita_stage1", "bita_stage1_vitl", "stage1", 310,
     {"MLM head (not built)": 7, "position_ids buffer": 1, "itm_head (never trained, not built)": 2},
     171_360_062 - 1_538 - (30_523 + 590_592 + 1_536)),
    ("bita_opt", "bita_opt_2_7b", "opt", 224, {"position_ids buffer": 1}, 91_788_288),
])
def test_real_size_layout_is_covered(family, preset, stage, count, skipped, n_params):
    cfg = bita.PRESETS[preset]
    keys = spec_keys(cfg, stage)
    assert len(keys) == count
    fam = get_family(family)
    tensors = {k: np.broadcast_to(np.float32(0), s) for k, s in keys.items()}
    tensors, entries, skips = fam.plan(cfg, tensors)
    targets = module_variables(nnx.eval_shape(lambda: fam.build(cfg, nnx.Rngs(0))))
    assert sum(int(np.prod(v.get_value().shape)) for v in targets.values()) == n_params
    assert sorted(e.target for e in entries) == sorted(targets)  # one entry per variable
    consumed = set()
    for e in entries:
        assert e.hook(*[tensors[s] for s in e.sources]).shape == tuple(targets[e.target].shape), e.target
        consumed.update(e.sources)
    got = {}
    for key in set(tensors) - consumed:
        rules = [s.name for s in skips if re.fullmatch(s.pattern, key)]
        assert len(rules) == 1, (key, rules)
        got[rules[0]] = got.get(rules[0], 0) + 1
    assert got == skipped
    assert len(consumed) == count - sum(skipped.values())


# ----------------------------------------------------------------------------------------
# Tiny layouts: prefixes, the .pth wrapper, values.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,cfg,stage", [("bita_stage1", STAGE1, "stage1"), ("bita_opt", OPTCFG, "opt")])
def test_prefixes_and_pth_wrapper_give_identical_parameters(family, cfg, stage, tmp_path):
    base = random_checkpoint(cfg, stage)
    results = {}
    for prefix in bita_conv.PREFIXES:
        sd = {(prefix + k[len("Fformer."):] if k.startswith("Fformer.") else k): v for k, v in base.items()}
        results[prefix] = _flat(from_pytorch(family, sd, cfg))
    path = tmp_path / "checkpoint_4.pth"
    torch.save({"model": {k: torch.as_tensor(np.asarray(v)) for k, v in base.items()},
                "optimizer": {"state": {}}, "config": {"model": {"arch": family}}, "scaler": None, "epoch": 4}, path)
    bridge, report = from_pytorch(family, str(path), cfg, with_report=True)
    results["pth"] = _flat(bridge)
    ref = results["Fformer."]
    for name, got in results.items():
        assert got.keys() == ref.keys(), name
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{name}: {k}")
    # Values land where they should (transposes, LayerNorm weight -> scale, scalars).
    f, f0 = "Fformer.bert.encoder.layer.1", "Fformer.bert.encoder.layer.0"
    np.testing.assert_array_equal(ref["qformer.layers.1.cross_attn.key.kernel"],
                                  base[f"{f}.crossattention.self.key.weight"].T)
    np.testing.assert_array_equal(ref["qformer.layers.1.mixer.norm.scale"],
                                  base[f"{f}.fourier.output.LayerNorm.weight"])
    np.testing.assert_array_equal(ref["qformer.layers.0.query_ffn.fc2.kernel"],
                                  base[f"{f0}.output_query.dense.weight"].T)
    np.testing.assert_array_equal(ref["qformer.query_tokens"], base["query_tokens"])
    np.testing.assert_array_equal(ref["ln_vision.scale"], base["ln_vision.weight"])
    if stage == "stage1":
        np.testing.assert_array_equal(ref["vision_proj.kernel"], base["vision_proj.weight"].T)
        np.testing.assert_array_equal(ref["qformer.layers.0.text_ffn.fc1.kernel"],
                                      base[f"{f0}.intermediate.dense.weight"].T)
        assert ref["temp"].shape == () and ref["temp"] == np.float32(0.07)
        assert report.skipped == {"MLM head (not built)": 7, "position_ids buffer": 1,
                                  "itm_head (never trained, not built)": 2}
    else:
        np.testing.assert_array_equal(ref["opt_proj.kernel"], base["opt_proj.weight"].T)
        assert report.skipped == {"position_ids buffer": 1}
    assert report.converted == len(base) - sum(report.skipped.values())


@pytest.mark.parametrize("family,cfg,stage,victim", [
    ("bita_stage1", STAGE1, "stage1", "Fformer.bert.encoder.layer.1.crossattention.self.value.bias"),
    ("bita_stage1", STAGE1, "stage1", "text_proj.weight"),
    ("bita_opt", OPTCFG, "opt", "Fformer.bert.encoder.layer.0.fourier.output.LayerNorm.weight"),
    ("bita_opt", OPTCFG, "opt", "opt_proj.bias"),
])
def test_missing_renamed_and_misshapen_keys_are_named(family, cfg, stage, victim):
    base = random_checkpoint(cfg, stage)
    missing = {k: v for k, v in base.items() if k != victim}
    with pytest.raises(ConversionError, match="missing keys") as e:
        from_pytorch(family, missing, cfg)
    assert victim in str(e.value)
    renamed = dict(missing, **{victim + "_renamed": base[victim]})
    with pytest.raises(ConversionError) as e:
        from_pytorch(family, renamed, cfg)
    assert victim in str(e.value) and f"unexpected keys (in checkpoint, not used):\n  {victim}_renamed" in str(e.value)
    bad = dict(base, **{victim: np.zeros(base[victim].shape + (2,), np.float32)})
    with pytest.raises(ConversionError, match="shape mismatches") as e:
        from_pytorch(family, bad, cfg)
    assert victim in str(e.value)


def test_wrong_checkpoint_kinds_are_explained():
    s1, s2 = random_checkpoint(STAGE1, "stage1"), random_checkpoint(OPTCFG, "opt")
    with pytest.raises(ConversionError, match="stage-1 checkpoint"):
        from_pytorch("bita_opt", s1, OPTCFG)
    with pytest.raises(ConversionError, match="bita_opt"):
        from_pytorch("bita_stage1", s2, STAGE1)
    blip2 = dict(s2, **{"Qformer.bert.encoder.layer.0.attention.self.query.weight": np.zeros((64, 64))})
    blip2 = {k.replace("Fformer.", "Qformer."): v for k, v in blip2.items()}
    with pytest.raises(ConversionError, match="BLIP-2"):
        from_pytorch("bita_opt", blip2, OPTCFG)
    with pytest.raises(ConversionError, match="not a BITA checkpoint"):
        from_pytorch("bita_opt", {"opt_proj.weight": np.zeros((3, 3))}, OPTCFG)


# ----------------------------------------------------------------------------------------
# Stage-1 ITC on the reference fixture.
# ----------------------------------------------------------------------------------------
def test_stage1_itc_matches_reference_fixture(fixtures_dir):
    """ift_tiny.npz has IFT-input image features (ln_vision outputs), so the bridge runs from
    there: IFT queries/text -> projections -> query-max similarities -> smoothed ITC."""
    z = np.load(fixtures_dir / "bita" / "ift_tiny.npz")
    z = {k: z[k] for k in z.files}
    qf = dataclasses.replace(STAGE1.qformer, encoder_width=48)  # the fixture's IFT sizes
    cfg = dataclasses.replace(STAGE1, vit=dataclasses.replace(VIT_PRESETS["vit_test"], width=48), qformer=qf)
    sd = {f"Fformer.{k[len('ift/'):]}": v for k, v in z.items() if k.startswith("ift/")}
    sd.update({k[len("itc/"):]: v for k, v in z.items() if k.startswith("itc/")})
    sd.update({"query_tokens": z["in/query_tokens"], "ln_vision.weight": np.ones(48, np.float32),
               "ln_vision.bias": np.zeros(48, np.float32), "itm_head.weight": np.zeros((2, 64), np.float32),
               "itm_head.bias": np.zeros(2, np.float32)})
    bridge = from_pytorch("bita_stage1", sd, cfg)
    loss, aux = nnx.jit(lambda b: b.itc_loss_from_embeds(z["in/image_embeds"], z["in/input_ids"],
                                                         z["in/attention_mask"]))(bridge)
    assert _maxdiff(aux["sim_i2t"], z["out/sim_i2t"]) <= TOL
    assert _maxdiff(aux["sim_t2i"], z["out/sim_t2i"]) <= TOL
    assert abs(float(loss) - float(z["out/loss_itc"])) <= TOL
    assert abs(float(z["out/loss_itc"]) - 1.098893) < 1e-6


@pytest.fixture(scope="module")
def vit_sd(fixtures_dir):
    z = np.load(fixtures_dir / "bita" / "vit_tiny.npz")
    return {k: z[k] for k in z.files}


def test_stage1_vision_path_matches_reference_fixture(vit_sd):
    """load_bita_stage1 (ViT file + BITA checkpoint): ln_vision(ViT(pixels)) as recorded."""
    z = vit_sd
    ckpt = random_checkpoint(STAGE1, "stage1")
    ckpt["ln_vision.weight"], ckpt["ln_vision.bias"] = z["ln_vision/weight"], z["ln_vision/bias"]
    vit = {k[len("vit/"):]: v for k, v in z.items() if k.startswith("vit/")}
    model, reports = bita_conv.load_bita_stage1(ckpt, vit, STAGE1, with_report=True)
    out = model.image_embeds(jnp.asarray(z["in/pixels_nchw"].transpose(0, 2, 3, 1)))
    assert _maxdiff(out, z["out/ln_vision"]) <= TOL
    assert reports["vit"].converted == len(vit) and reports["bita"].converted == len(ckpt) - 10
    # The same model from a full state dict that carries the ViT itself.
    full = dict(ckpt, **{f"visual_encoder.{k}": v for k, v in vit.items()})
    again = bita_conv.load_bita_stage1(full, None, STAGE1)
    assert _maxdiff(again.image_embeds(jnp.asarray(z["in/pixels_nchw"].transpose(0, 2, 3, 1))), out) == 0.0
    with pytest.raises(ConversionError, match="both in"):
        bita_conv.load_bita_stage1(full, vit, STAGE1)
    with pytest.raises(ConversionError, match="pass vit_source"):
        bita_conv.load_bita_stage1(ckpt, None, STAGE1)


# ----------------------------------------------------------------------------------------
# BITA-OPT: whole-model loading and the LM loss against HF's.
# ----------------------------------------------------------------------------------------
def _hf_opt(seed=0):
    c = OPTCFG.opt
    torch.manual_seed(seed)
    hf = transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden, num_hidden_layers=c.layers, ffn_dim=c.ffn_dim,
        num_attention_heads=c.heads, max_position_embeddings=c.max_positions, word_embed_proj_dim=c.hidden,
        pad_token_id=1, bos_token_id=2, eos_token_id=2, attn_implementation="eager"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return hf.eval()


IDS = np.array([[2, 17, 33, 8, 41, 50, 60], [2, 17, 33, 70, 5, 1, 1]], np.int64)  # row 1 right-padded
PROMPT_LENGTHS = (0, 3)


@pytest.fixture(scope="module")
def opt_model(vit_sd):
    hf = _hf_opt()
    ckpt = random_checkpoint(OPTCFG, "opt", seed=1)
    vit = {k[len("vit/"):]: v for k, v in vit_sd.items() if k.startswith("vit/")}
    model, reports = bita_conv.load_bita_opt(ckpt, vit, hf.state_dict(), OPTCFG, with_report=True)
    pixels = vit_sd["in/pixels_nchw"].transpose(0, 2, 3, 1)
    mask = (IDS != 1).astype(np.int64)
    # One compiled program for everything the LM tests read.
    prefix, losses = nnx.jit(lambda m: (m.prefix_embeds(pixels), [
        m.lm_loss(pixels, IDS, mask, prompt_length=n) for n in PROMPT_LENGTHS]))(model)
    return dict(hf=hf, ckpt=ckpt, vit=vit, model=model, reports=reports, mask=mask, prefix=np.array(prefix),
                losses=dict(zip(PROMPT_LENGTHS, losses)))


def _reference_labels(ids, nq, prompt_length, pad=1):
    """Blip2OPT.forward's targets: pad -> -100, first prompt_length columns -> -100 (non-empty
    prompt only), then -100 for the query columns."""
    t = np.where(ids == pad, -100, ids)
    if prompt_length:
        t[:, :prompt_length] = -100
    return np.concatenate([np.full((ids.shape[0], nq), -100), t], axis=1)


@pytest.mark.parametrize("prompt_length", PROMPT_LENGTHS)
def test_lm_loss_matches_hf_opt_loss(opt_model, prompt_length):
    hf, inputs_opt, mask = opt_model["hf"], opt_model["prefix"], opt_model["mask"]
    loss, aux = opt_model["losses"][prompt_length]
    nq = inputs_opt.shape[1]
    with torch.no_grad():
        embeds = torch.cat([torch.from_numpy(inputs_opt), hf.model.decoder.embed_tokens(torch.from_numpy(IDS))], 1)
        att = torch.cat([torch.ones(2, nq, dtype=torch.long), torch.from_numpy(mask)], 1)
        labels = torch.from_numpy(_reference_labels(IDS, nq, prompt_length))
        out = hf(inputs_embeds=embeds, attention_mask=att, labels=labels)
    assert abs(float(loss) - float(out.loss)) <= TOL
    # Our text-column logits are HF's logits at positions nq-1 ... end-1.
    assert _maxdiff(aux["logits"], out.logits[:, nq - 1:-1].numpy()) <= TOL


def test_load_bita_opt_reports_and_errors(opt_model):
    r = opt_model["reports"]
    assert r["bita"].converted == len(opt_model["ckpt"]) - 1 and r["bita"].skipped == {"position_ids buffer": 1}
    assert r["opt"].converted == len(opt_model["hf"].state_dict()) - 1  # lm_head: tied, checked, skipped
    assert r["vit"].converted == len(opt_model["vit"])
    ckpt, vit, sd = opt_model["ckpt"], opt_model["vit"], opt_model["hf"].state_dict()
    with pytest.raises(ConversionError, match="pass opt_source"):
        bita_conv.load_bita_opt(ckpt, vit, None, OPTCFG)
    full = dict(ckpt, **{f"opt_model.{k}": v for k, v in sd.items()})
    with pytest.raises(ConversionError, match="both in"):
        bita_conv.load_bita_opt(full, vit, sd, OPTCFG)
    m = bita_conv.load_bita_opt(full, vit, None, OPTCFG)  # OPT from the checkpoint itself
    a = module_variables(m.opt_model)
    b = module_variables(opt_model["model"].opt_model)
    assert all(np.array_equal(a[k].get_value(), b[k].get_value()) for k in a)
    bad = dict(ckpt)
    del bad["opt_proj.weight"]
    with pytest.raises(ConversionError, match="opt_proj.weight"):
        bita_conv.load_bita_opt(bad, vit, sd, OPTCFG)


def test_stage2_init_from_stage1_checkpoint(opt_model):
    """§10.3: the query path and ln_vision come from stage 1, opt_proj stays freshly initialised,
    everything else of the stage-1 file is dropped by a named rule."""
    s1 = random_checkpoint(STAGE1, "stage1", seed=3)
    model, r = bita_conv.init_bita_opt_from_stage1(s1, opt_model["vit"], opt_model["hf"].state_dict(), OPTCFG,
                                                   seed=5, with_report=True)
    assert r["bita"].skipped == {"MLM head (not built)": 7, "position_ids buffer": 1,
                                 "text side (config.text is False)": 2 + 6 * STAGE1.qformer.layers,
                                 "stage-1 heads BITA-OPT does not use (spec 10.3)": 7}
    stage1 = from_pytorch("bita_stage1", s1, STAGE1)
    img = jnp.asarray(np.random.default_rng(0).standard_normal((2, 17, 32)), jnp.float32)
    assert _maxdiff(model.bridge.qformer.encode_queries(img), stage1.qformer.encode_queries(img)) == 0.0
    np.testing.assert_array_equal(model.bridge.ln_vision.scale.get_value(), s1["ln_vision.weight"])
    fresh = bita.OPTBridge(OPTCFG, rngs=nnx.Rngs(5))
    np.testing.assert_array_equal(model.bridge.opt_proj.kernel.get_value(), fresh.opt_proj.kernel.get_value())
    broken = {k: v for k, v in s1.items() if "crossattention.output.dense.bias" not in k}
    with pytest.raises(ConversionError, match="crossattention.output.dense.bias"):
        bita_conv.init_bita_opt_from_stage1(broken, opt_model["vit"], opt_model["hf"].state_dict(), OPTCFG)


def test_reference_names():
    names = bita_conv.reference_names(STAGE1)
    assert names["bridge.qformer.query_tokens"] == "query_tokens"
    assert names["bridge.temp"] == "temp"
    assert names["bridge.qformer.layers.1.cross_attn.out.kernel"] == \
        "Fformer.bert.encoder.layer.1.crossattention.output.dense.weight"
    params = nnx.state(nnx.eval_shape(lambda: bita.BITAStage1(STAGE1, rngs=nnx.Rngs(0))), nnx.Param)
    trainable = {".".join(map(str, p)) for p, _ in params.flat_state() if p[0] == "bridge"}
    assert trainable == set(names)
