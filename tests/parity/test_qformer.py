"""Q-Former: BITA's Fourier IFT against the reference fixture, the attention mixer against HF
BLIP-2, key layouts and converter errors."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.models.blip_2 import modeling_blip_2

from rsvl_jax.convert import ConversionError, from_pytorch
from rsvl_jax.convert.core import module_variables
from rsvl_jax.models.qformer import PRESETS, QFormerConfig

TOL = 1e-5
# Tiny BLIP-2 Q-Former: 3 layers so cross-attention (freq 2) is present in 0, 2 and absent in 1.
HF_CFG = QFormerConfig(vocab_size=50, hidden=32, layers=3, heads=4, intermediate=64, max_position_embeddings=20,
                       encoder_width=24, num_query_tokens=6, cross_attention_freq=2, mixer="attention")
B, NI, L = 3, 7, 9


def _np(t):
    return t.detach().numpy()


def _maxdiff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def _params(module):
    return {k: np.asarray(v[...]) for k, v in module_variables(module).items()}


# ----------------------------------------------------------------------------------------
# BITA IFT fixture (Fourier mixer, reference modules).
# ----------------------------------------------------------------------------------------
def _run(model, **kw):
    """All paths of `model` in one jitted call (one compilation instead of per-op dispatch)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, img, ids, mask, image_mask):
        m = nnx.merge(graphdef, state)
        out = dict(query=m.encode_queries(img, image_mask=image_mask), text=m.encode_text(ids, mask),
                   joint=m.encode_joint(img, ids, mask))
        if kw.get("full_mask"):  # a (B, S, S) mask equal to the key-padding mask
            full = jnp.broadcast_to(jnp.asarray(mask, bool)[:, None, :], (ids.shape[0],) + ids.shape[1:] * 2)
            out["text_full_mask"] = m.encode_text(ids, full)
        if kw.get("train"):
            out["query_train"] = m.encode_queries(img, deterministic=False)
        return out

    return run(state, kw["img"], kw["ids"], kw["mask"], kw.get("image_mask"))


@pytest.fixture(scope="module")
def ift(fixtures_dir):
    z = np.load(fixtures_dir / "bita" / "ift_tiny.npz")
    z = {k: z[k] for k in z.files}
    sd = {k[len("ift/"):]: v for k, v in z.items() if k.startswith("ift/")}
    sd["query_tokens"] = z["in/query_tokens"]
    model, report = from_pytorch("blip2_qformer", sd, "qformer_test", with_report=True)
    nnx.reseed(model, default=1)  # dropout streams of a converted (abstractly built) model
    out = _run(model, img=z["in/image_embeds"], ids=z["in/input_ids"], mask=z["in/attention_mask"], train=True)
    return dict(z=z, sd=sd, model=model, report=report, out=out)


def test_ift_fixture_outputs(ift):
    z, out = ift["z"], ift["out"]
    assert ift["report"].skipped == {"MLM head (not built)": 7, "position_ids buffer": 1}
    assert _maxdiff(out["query"], z["out/query_hidden"]) <= TOL
    assert _maxdiff(out["text"], z["out/text_hidden"]) <= TOL
    assert _maxdiff(out["joint"], z["out/joint_hidden"]) <= TOL
    # Dropout is live with deterministic=False.
    assert _maxdiff(out["query_train"], out["query"]) > 1e-3


def test_ift_fixture_similarities(ift):
    """BITA's ITC similarities: max over queries of cosine(query feature, text CLS) / temp."""
    z, out = ift["z"], ift["out"]

    def proj(x, name):
        y = x @ z[f"itc/{name}.weight"].T + z[f"itc/{name}.bias"]
        return y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-12)

    img_feats = proj(np.asarray(out["query"]), "vision_proj")  # (B, Nq, E)
    text_feat = proj(np.asarray(out["text"])[:, 0], "text_proj")  # (B, E)
    temp = z["itc/temp"]
    sim_i2t = np.einsum("bqe,je->bjq", img_feats, text_feat).max(-1) / temp
    sim_t2i = np.einsum("be,jqe->bjq", text_feat, img_feats).max(-1) / temp
    assert _maxdiff(sim_i2t, z["out/sim_i2t"]) <= TOL
    assert _maxdiff(sim_t2i, z["out/sim_t2i"]) <= TOL


def test_ift_without_text_side(ift):
    """BITA stage-2 IFT (text=False) loads a full stage-1 state dict and gives the same queries."""
    cfg = dataclasses.replace(PRESETS["qformer_test"], text=False)
    sd = {f"Fformer.{k}": v for k, v in ift["sd"].items() if k != "query_tokens"}
    sd.update({"query_tokens": ift["sd"]["query_tokens"], "ln_vision.weight": np.ones(48),
               "opt_proj.weight": np.ones(3)})
    m, report = from_pytorch("blip2_qformer", sd, cfg, with_report=True)
    assert report.skipped["text side (config.text is False)"] == 2 + 2 * 6
    assert report.skipped["BLIP-2/BITA modules outside the Q-Former"] == 2
    img = jnp.asarray(ift["z"]["in/image_embeds"])
    assert _maxdiff(m.encode_queries(img), ift["z"]["out/query_hidden"]) <= TOL
    with pytest.raises(ValueError, match="text side"):
        m.encode_text(jnp.zeros((1, 4), jnp.int32))


def test_ift_prefixes_give_identical_parameters(ift):
    ref = _params(ift["model"])
    for prefix in ("Fformer.", "IFformer.", "Qformer."):
        sd = {(k if k == "query_tokens" else prefix + k): v for k, v in ift["sd"].items()}
        p = _params(from_pytorch("blip2_qformer", sd, "qformer_test"))
        assert p.keys() == ref.keys()
        for k in ref:
            np.testing.assert_array_equal(p[k], ref[k], err_msg=f"{prefix}: {k}")


def test_fourier_padding_quirk_and_fix(ift):
    """Mirror (default): pad ids leak into real tokens. Fix flag: they do not."""
    z = ift["z"]
    ids, mask = z["in/input_ids"], z["in/attention_mask"]
    other = np.where(mask == 1, ids, 7)  # different ids at padded positions
    real = mask[1] == 1
    m = ift["model"]
    a, b = m.encode_text(jnp.asarray(ids), mask), m.encode_text(jnp.asarray(other), mask)
    assert _maxdiff(a[1][real], b[1][real]) > 1e-3
    fixed = from_pytorch("blip2_qformer", ift["sd"], dataclasses.replace(PRESETS["qformer_test"],
                                                                        fourier_mask_padding=True))
    a, b = fixed.encode_text(jnp.asarray(ids), mask), fixed.encode_text(jnp.asarray(other), mask)
    assert _maxdiff(a[1][real], b[1][real]) <= 1e-6


# ----------------------------------------------------------------------------------------
# Attention mixer vs HF Blip2QFormerModel.
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    c = HF_CFG
    cfg = transformers.Blip2QFormerConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden, num_hidden_layers=c.layers, num_attention_heads=c.heads,
        intermediate_size=c.intermediate, max_position_embeddings=c.max_position_embeddings,
        encoder_hidden_size=c.encoder_width, cross_attention_frequency=c.cross_attention_freq,
        use_qformer_text_input=True, layer_norm_eps=c.eps, hidden_act="gelu")
    cfg._attn_implementation = "eager"
    qformer = transformers.Blip2QFormerModel(cfg).eval()
    emb = modeling_blip_2.Blip2TextEmbeddings(cfg).eval()
    with torch.no_grad():
        for name, p in qformer.named_parameters():
            if "LayerNorm" in name or "layernorm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
        for p in emb.parameters():
            p.normal_(0, 0.5)
    query_tokens = torch.randn(1, c.num_query_tokens, c.hidden)
    img = torch.randn(B, NI, c.encoder_width)
    img_mask = torch.ones(B, NI, dtype=torch.long)
    img_mask[1, -3:] = 0
    ids = torch.randint(1, c.vocab_size, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, -4:] = 0
    mask[2, -1:] = 0
    nq = c.num_query_tokens
    q = query_tokens.expand(B, -1, -1)
    with torch.no_grad():
        query = qformer(query_embeds=q, encoder_hidden_states=img, encoder_attention_mask=img_mask).last_hidden_state
        text = qformer(query_embeds=emb(input_ids=ids), query_length=0, attention_mask=mask).last_hidden_state
        joint = qformer(query_embeds=emb(input_ids=ids, query_embeds=q), query_length=nq,
                        attention_mask=torch.cat([torch.ones(B, nq, dtype=torch.long), mask], 1),
                        encoder_hidden_states=img).last_hidden_state  # HF 5.x mis-shapes an image mask here
    # The tensors a whole HF BLIP-2 model holds for its Q-Former (Blip2ForImageTextRetrieval).
    sd = {f"qformer.{k}": _np(v) for k, v in qformer.state_dict().items()}
    sd.update({f"embeddings.{k}": _np(v) for k, v in emb.state_dict().items()})
    sd["query_tokens"] = _np(query_tokens)
    return dict(sd=sd, bare={k: _np(v) for k, v in qformer.state_dict().items()},
                img=_np(img), img_mask=_np(img_mask).astype(bool), ids=_np(ids), mask=_np(mask).astype(bool),
                query=_np(query), text=_np(text), joint=_np(joint))


def test_attention_mixer_matches_hf(hf):
    m, report = from_pytorch("blip2_qformer", hf["sd"], HF_CFG, with_report=True)
    assert m.layers[1].cross_attn is None and m.layers[2].cross_attn is not None
    out = _run(m, img=hf["img"], ids=hf["ids"], mask=hf["mask"], image_mask=hf["img_mask"], full_mask=True)
    assert _maxdiff(out["text_full_mask"], hf["text"]) <= TOL
    for path in ("query", "text", "joint"):
        assert _maxdiff(out[path], hf[path]) <= TOL, path


def _lavis_from_hf(sd: dict, prefix="Qformer.") -> dict:
    """HF BLIP-2 Q-Former tensors renamed to the LAVIS layout."""
    out = {}
    for k, v in sd.items():
        if k == "query_tokens":
            out[k] = v
        elif k.startswith("embeddings."):
            out[f"{prefix}bert.{k}"] = v
        elif k == "qformer.layernorm.weight" or k == "qformer.layernorm.bias":
            out[f"{prefix}bert.embeddings.LayerNorm.{k.rsplit('.', 1)[1]}"] = v
        else:
            k = k[len("qformer."):].replace(".attention.attention.", ".attention.self.")
            out[f"{prefix}bert.{k.replace('.crossattention.attention.', '.crossattention.self.')}"] = v
    return out


def test_hf_and_lavis_layouts_give_identical_parameters(hf):
    ref = _params(from_pytorch("blip2_qformer", hf["sd"], HF_CFG))
    lavis = _lavis_from_hf(hf["sd"])
    lavis.update({"Qformer.cls.predictions.bias": np.zeros(50), "Qformer.bert.embeddings.position_ids": np.zeros(20),
                  "vision_proj.weight": np.zeros((4, 32)), "temp": np.zeros(()), "ln_vision.weight": np.ones(24)})
    bare = {**hf["bare"], "query_tokens": hf["sd"]["query_tokens"]}  # a bare Blip2QFormerModel + query tokens
    cases = {"lavis": (lavis, HF_CFG), "hf bare": (bare, dataclasses.replace(HF_CFG, text=False))}
    for name, (sd, cfg) in cases.items():
        p = _params(from_pytorch("blip2_qformer", sd, cfg))
        assert p.keys() <= ref.keys(), name
        for k in p:
            np.testing.assert_array_equal(p[k], ref[k], err_msg=f"{name}: {k}")


# ----------------------------------------------------------------------------------------
# Converter errors.
# ----------------------------------------------------------------------------------------
def _error(sd, cfg) -> str:
    with pytest.raises(ConversionError) as e:
        from_pytorch("blip2_qformer", sd, cfg)
    return str(e.value)


def test_missing_key(ift):
    sd = dict(ift["sd"])
    del sd["bert.encoder.layer.1.crossattention.self.key.bias"]
    msg = _error(sd, "qformer_test")
    assert "missing keys" in msg and "bert.encoder.layer.1.crossattention.self.key.bias" in msg


def test_renamed_key(ift):
    sd = dict(ift["sd"])
    sd["bert.encoder.layer.0.fourier.output.LN.weight"] = sd.pop("bert.encoder.layer.0.fourier.output.LayerNorm.weight")
    msg = _error(sd, "qformer_test")
    assert "bert.encoder.layer.0.fourier.output.LayerNorm.weight" in msg
    assert "bert.encoder.layer.0.fourier.output.LN.weight" in msg


def test_unexpected_key(hf):
    sd = {**hf["sd"], "qformer.encoder.layer.1.crossattention.attention.query.weight": np.zeros((32, 32))}
    msg = _error(sd, HF_CFG)  # layer 1 has no cross-attention at freq 2
    assert "unexpected keys" in msg and "qformer.encoder.layer.1.crossattention.attention.query.weight" in msg


def test_wrong_shape(ift):
    sd = dict(ift["sd"])
    sd["query_tokens"] = sd["query_tokens"][:, :4]
    assert "shape mismatches" in (msg := _error(sd, "qformer_test")) and "query_tokens" in msg


def test_blip2_weights_into_fourier_model(hf):
    """LAVIS BLIP-2 -> IFT is not a silent load: self-attention unexpected, Fourier LNs missing."""
    msg = _error(_lavis_from_hf(hf["sd"]), dataclasses.replace(HF_CFG, mixer="fourier"))
    assert "fourier.output.LayerNorm.weight" in msg and "attention.self.query.weight" in msg
    assert "mixer='attention'" in _error(hf["sd"], dataclasses.replace(HF_CFG, mixer="fourier"))


def test_unknown_layout():
    assert "unrecognised key layout" in _error({"encoder.layers.0.weight": np.zeros(3)}, "qformer_test")
