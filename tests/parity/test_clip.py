"""CLIP (models/clip.py) through the `clip` converter: HF CLIPModel parity, the open_clip layout
of the same weights, strict key checks."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from rsvl_jax.convert import ConversionError, from_pytorch
from rsvl_jax.convert import clip as clip_convert
from rsvl_jax.convert.core import module_variables
from rsvl_jax.models.clip import CLIPConfig, CLIPTextConfig
from rsvl_jax.models.vit import ViTConfig
from tests.torch_models import randomise

TOL = 1e-5
VOCAB, CTX = 99, 16
CONFIG = CLIPConfig(
    ViTConfig(image_size=16, patch_size=4, width=32, layers=2, heads=4, mlp_dim=64, final_norm=True),
    CLIPTextConfig(vocab_size=VOCAB, context_length=CTX, width=24, layers=2, heads=4, mlp_dim=48),
    embed_dim=20)


def _np(t):
    return t.detach().numpy()


def _hf_model(act: str):
    torch.manual_seed(0)
    v, t = CONFIG.vision, CONFIG.text
    cfg = transformers.CLIPConfig(
        vision_config=dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.layers,
                           num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                           hidden_act=act, layer_norm_eps=1e-5),
        text_config=dict(vocab_size=VOCAB, hidden_size=t.width, intermediate_size=t.mlp_dim,
                         num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=CTX,
                         hidden_act=act, layer_norm_eps=1e-5, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1,
                         pad_token_id=0),
        projection_dim=CONFIG.embed_dim)
    cfg._attn_implementation = "eager"
    model = randomise(transformers.CLIPModel(cfg).eval(), "norm")
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
    return model


def _texts():
    """Rows: start, words, end-of-text (the largest id), then zero padding."""
    rng = np.random.default_rng(1)
    lengths = [CTX - 2, 3, 7, 1]
    ids = np.zeros((len(lengths), CTX), np.int64)
    for r, n in enumerate(lengths):
        ids[r, 0] = VOCAB - 2
        ids[r, 1:n + 1] = rng.integers(1, VOCAB - 2, n)
        ids[r, n + 1] = VOCAB - 1
    return ids


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def hf(request, one_torch_thread):
    act = request.param
    model = _hf_model(act)
    pixels = torch.randn(3, 3, CONFIG.vision.image_size, CONFIG.vision.image_size)
    ids = _texts()
    out = {}
    with torch.no_grad():
        full = model(input_ids=torch.as_tensor(ids), pixel_values=pixels)  # no padding: every row 16 long
        out["full"] = {k: _np(getattr(full, k)) for k in ("image_embeds", "text_embeds", "logits_per_image")}
        # Padding in the batch: the rows of the short texts, cut to the longest of them and masked.
        short = ids[1:, :9]
        mask = torch.as_tensor((np.arange(9)[None] <= np.argmax(short, 1)[:, None]).astype(np.int64))
        padded = model(input_ids=torch.as_tensor(short), attention_mask=mask, pixel_values=pixels)
        out["padded"] = {k: _np(getattr(padded, k)) for k in ("image_embeds", "text_embeds", "logits_per_image")}
        # The same short texts one by one, unpadded (each its own exact length).
        out["alone"] = [_np(model.get_text_features(input_ids=torch.as_tensor(row[None, :np.argmax(row) + 1]))
                            .pooler_output) for row in short]
    sd = {k: _np(v) for k, v in model.state_dict().items()}
    return dict(act=act, sd=sd, pixels=_np(pixels).transpose(0, 2, 3, 1), ids=ids, short=short, **out)


def _cfg(act):
    return dataclasses.replace(CONFIG, act=act)


def _maxdiff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_matches_hf_without_padding(hf):
    model = from_pytorch("clip", hf["sd"], _cfg(hf["act"]))
    img, _ = model.encode_image(jnp.asarray(hf["pixels"]))
    txt, _ = model.encode_text(jnp.asarray(hf["ids"], jnp.int32))
    logits, inter = model(jnp.asarray(hf["pixels"]), jnp.asarray(hf["ids"], jnp.int32))
    ref = hf["full"]
    assert _maxdiff(img, ref["image_embeds"]) <= TOL
    assert _maxdiff(txt, ref["text_embeds"]) <= TOL
    assert _maxdiff(logits, ref["logits_per_image"]) <= TOL * 10  # logits are x10 (exp(2.3))
    assert _maxdiff(inter["text_embeds"], ref["text_embeds"]) <= TOL


def test_matches_hf_with_padding(hf):
    """Zero padding after the end-of-text token changes nothing (the causal mask hides it):
    equal to HF with its attention mask, and to each text encoded alone."""
    model = from_pytorch("clip", hf["sd"], _cfg(hf["act"]))
    short = jnp.asarray(hf["short"], jnp.int32)
    txt, inter = model.encode_text(short)
    logits, _ = model(jnp.asarray(hf["pixels"]), short)
    assert _maxdiff(txt, hf["padded"]["text_embeds"]) <= TOL
    assert _maxdiff(logits, hf["padded"]["logits_per_image"]) <= TOL * 10
    for r, alone in enumerate(hf["alone"]):
        assert _maxdiff(inter["features"][r], alone[0]) <= TOL
    # And padded out to the full context length.
    wide = jnp.zeros((short.shape[0], CTX), jnp.int32).at[:, :short.shape[1]].set(short)
    assert _maxdiff(model.encode_text(wide)[0], hf["padded"]["text_embeds"]) <= TOL


# ----------------------------------------------------------------------------------------
# Layouts and strictness.
# ----------------------------------------------------------------------------------------
def openai_layout(sd: dict, cfg: CLIPConfig) -> dict:
    """HF CLIPModel tensors renamed to the OpenAI/open_clip layout (fused in_proj, (in, out)
    projections), as RemoteCLIP's and GeoRSCLIP's `.pt` files are."""
    out = {
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.proj": sd["visual_projection.weight"].T.copy(),
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "text_projection": sd["text_projection.weight"].T.copy(),
        "logit_scale": sd["logit_scale"],
    }
    for kind in ("weight", "bias"):
        out[f"visual.ln_pre.{kind}"] = sd[f"vision_model.pre_layrnorm.{kind}"]
        out[f"visual.ln_post.{kind}"] = sd[f"vision_model.post_layernorm.{kind}"]
        out[f"ln_final.{kind}"] = sd[f"text_model.final_layer_norm.{kind}"]
    towers = (("vision_model", "visual.transformer", cfg.vision.layers), ("text_model", "transformer", cfg.text.layers))
    for hf_root, oa_root, layers in towers:
        for i in range(layers):
            h, o = f"{hf_root}.encoder.layers.{i}", f"{oa_root}.resblocks.{i}"
            for kind in ("weight", "bias"):
                out[f"{o}.attn.in_proj_{kind}"] = np.concatenate([sd[f"{h}.self_attn.{n}_proj.{kind}"] for n in "qkv"])
                out[f"{o}.attn.out_proj.{kind}"] = sd[f"{h}.self_attn.out_proj.{kind}"]
                out[f"{o}.ln_1.{kind}"] = sd[f"{h}.layer_norm1.{kind}"]
                out[f"{o}.mlp.c_fc.{kind}"] = sd[f"{h}.mlp.fc1.{kind}"]
                out[f"{o}.mlp.c_proj.{kind}"] = sd[f"{h}.mlp.fc2.{kind}"]
                out[f"{o}.ln_2.{kind}"] = sd[f"{h}.layer_norm2.{kind}"]
    return out


@pytest.fixture(scope="module")
def hf_sd(one_torch_thread):
    return {k: _np(v) for k, v in _hf_model("quick_gelu").state_dict().items()}


def _params(module):
    return {k: np.asarray(v[...]) for k, v in module_variables(module).items()}


def test_openai_and_hf_layouts_give_identical_parameters(hf_sd):
    oa = openai_layout(hf_sd, CONFIG)
    assert len(oa) < len(hf_sd)  # fused in_proj: fewer tensors
    a, rep_a = from_pytorch("clip", hf_sd, CONFIG, with_report=True)
    b, rep_b = from_pytorch("clip", {**oa, "input_resolution": 16, "context_length": CTX, "vocab_size": VOCAB},
                            CONFIG, with_report=True)
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    assert rep_b.converted == len(oa) and sum(rep_b.skipped.values()) == 3
    assert rep_a.parameters == rep_b.parameters


def test_missing_key_is_rejected_by_name(hf_sd):
    oa = openai_layout(hf_sd, CONFIG)
    del oa["transformer.resblocks.1.attn.in_proj_weight"]
    with pytest.raises(ConversionError, match=r"missing keys[^\n]*\n\s+transformer\.resblocks\.1\.attn\.in_proj_weight"):
        from_pytorch("clip", oa, CONFIG)
    hf_missing = dict(hf_sd)
    del hf_missing["text_projection.weight"]
    with pytest.raises(ConversionError, match=r"text_projection\.weight"):
        from_pytorch("clip", hf_missing, CONFIG)


def test_renamed_key_is_rejected_by_name(hf_sd):
    oa = openai_layout(hf_sd, CONFIG)
    oa["ln_final.gamma"] = oa.pop("ln_final.weight")
    with pytest.raises(ConversionError) as err:
        from_pytorch("clip", oa, CONFIG)
    msg = str(err.value)
    assert "missing keys" in msg and "ln_final.weight" in msg
    assert "unexpected keys" in msg and "ln_final.gamma" in msg


def test_extra_block_and_wrong_shape_are_rejected(hf_sd):
    """A whole CLIP is strict: a checkpoint with more blocks than the config is not cut."""
    small = dataclasses.replace(CONFIG, text=dataclasses.replace(CONFIG.text, layers=1))
    with pytest.raises(ConversionError, match=r"unexpected keys[\s\S]*transformer\.resblocks\.1\.attn\.in_proj_weight"):
        from_pytorch("clip", openai_layout(hf_sd, CONFIG), small)
    wider = dataclasses.replace(CONFIG, embed_dim=CONFIG.embed_dim + 1)
    with pytest.raises(ConversionError, match=r"shape mismatches[\s\S]*text_projection"):
        from_pytorch("clip", hf_sd, wider)
    with pytest.raises(ConversionError, match="unrecognised key layout"):
        from_pytorch("clip", {"foo.weight": np.zeros(3)}, CONFIG)


def test_hf_config_is_read(tmp_path):
    model = _hf_model("gelu")
    model.config.save_pretrained(tmp_path)
    cfg = clip_convert.read_hf_config(tmp_path)
    assert cfg == dataclasses.replace(CONFIG, act="gelu")
