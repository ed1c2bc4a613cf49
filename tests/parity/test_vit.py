"""CLIP ViT (BITA's image encoder): HF parity, the BITA fixture, key layouts, position resizing."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from rsvl_jax.convert import ConversionError, from_pytorch
from rsvl_jax.convert.core import module_variables
from rsvl_jax.models.layers import layer_norm
from rsvl_jax.models.vit import PRESETS, ViTConfig, bicubic_matrix, resize_positions

TOL = 1e-5
WIDTH, LAYERS, HEADS, MLP, IMAGE, PATCH = 32, 3, 4, 64, 16, 4
FULL = ViTConfig(image_size=IMAGE, patch_size=PATCH, width=WIDTH, layers=LAYERS, heads=HEADS, mlp_dim=MLP,
                 final_norm=True)
# BITA-style: fewer blocks than the checkpoint, no final LayerNorm.
CUT = dataclasses.replace(FULL, layers=2, final_norm=False)


def _np(t):
    return t.detach().numpy()


@pytest.fixture(scope="module")
def hf():
    """A tiny random HF CLIPVisionModel with randomised LayerNorm affine parameters."""
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS,
                                        num_attention_heads=HEADS, image_size=IMAGE, patch_size=PATCH,
                                        hidden_act="quick_gelu", layer_norm_eps=1e-5)
    model = transformers.CLIPVisionModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
        post = model.post_layernorm(out.last_hidden_state)  # HF applies it to CLS only (pooler)
    sd = {k: _np(v) for k, v in model.state_dict().items()}
    return dict(sd=sd, pixels=_np(pixels).transpose(0, 2, 3, 1), hidden=[_np(h) for h in out.hidden_states],
                post=_np(post), pooler=_np(out.pooler_output))


def _openai_visual(sd: dict, layers: int) -> dict:
    """HF CLIPVisionModel tensors renamed to the OpenAI/LAVIS visual-tower layout (fused in_proj)."""
    out = {
        "conv1.weight": sd["embeddings.patch_embedding.weight"],
        "class_embedding": sd["embeddings.class_embedding"],
        "positional_embedding": sd["embeddings.position_embedding.weight"],
        "ln_pre.weight": sd["pre_layrnorm.weight"], "ln_pre.bias": sd["pre_layrnorm.bias"],
        "ln_post.weight": sd["post_layernorm.weight"], "ln_post.bias": sd["post_layernorm.bias"],
        "proj": np.ones((WIDTH, 8), np.float32),
    }
    for i in range(layers):
        h, o = f"encoder.layers.{i}", f"transformer.resblocks.{i}"
        for kind in ("weight", "bias"):
            out[f"{o}.attn.in_proj_{kind}"] = np.concatenate([sd[f"{h}.self_attn.{n}_proj.{kind}"] for n in "qkv"])
            out[f"{o}.attn.out_proj.{kind}"] = sd[f"{h}.self_attn.out_proj.{kind}"]
            out[f"{o}.ln_1.{kind}"] = sd[f"{h}.layer_norm1.{kind}"]
            out[f"{o}.mlp.c_fc.{kind}"] = sd[f"{h}.mlp.fc1.{kind}"]
            out[f"{o}.mlp.c_proj.{kind}"] = sd[f"{h}.mlp.fc2.{kind}"]
            out[f"{o}.ln_2.{kind}"] = sd[f"{h}.layer_norm2.{kind}"]
    return out


def _params(module):
    return {k: np.asarray(v[...]) for k, v in module_variables(module).items()}


def _maxdiff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


# ----------------------------------------------------------------------------------------
# HF parity.
# ----------------------------------------------------------------------------------------
def test_hidden_states_match_hf(hf):
    vit = from_pytorch("clip_vit", hf["sd"], FULL)
    out, inter = vit(jnp.asarray(hf["pixels"]), return_hidden_states=True)
    assert len(inter["hidden_states"]) == LAYERS + 1
    for k, (ours, ref) in enumerate(zip(inter["hidden_states"], hf["hidden"])):
        assert _maxdiff(ours, ref) <= TOL, f"hidden_states[{k}]"
    for k in range(LAYERS + 1):  # the num_blocks switch gives the same states, without ln_post
        assert _maxdiff(vit(jnp.asarray(hf["pixels"]), num_blocks=k), hf["hidden"][k]) <= TOL
    # Final LayerNorm on every token vs HF post_layernorm(last_hidden_state); CLS vs pooler.
    assert _maxdiff(out, hf["post"]) <= TOL
    assert _maxdiff(out[:, 0], hf["pooler"]) <= TOL


def test_bita_cut_matches_hf_block(hf):
    """Fewer blocks than the checkpoint and no ln_post: output = HF hidden_states[layers]."""
    vit, report = from_pytorch("clip_vit", hf["sd"], CUT, with_report=True)
    assert report.skipped == {"blocks beyond config.layers (not built)": 16,
                              "final LayerNorm (config.final_norm is False)": 2}
    assert vit.ln_post is None
    assert _maxdiff(vit(jnp.asarray(hf["pixels"])), hf["hidden"][CUT.layers]) <= TOL


# ----------------------------------------------------------------------------------------
# BITA fixture (reference VisionTransformer, layers=3 -> 2 blocks, + ln_vision).
# ----------------------------------------------------------------------------------------
def test_bita_fixture(fixtures_dir):
    z = np.load(fixtures_dir / "bita" / "vit_tiny.npz")
    sd = {k[len("vit/"):]: z[k] for k in z.files if k.startswith("vit/")}
    vit = from_pytorch("clip_vit", sd, "vit_test")
    out = vit(jnp.asarray(z["in/pixels_nchw"].transpose(0, 2, 3, 1)))
    assert _maxdiff(out, z["out/vit"]) <= TOL
    ln = layer_norm(PRESETS["vit_test"].width, eps=1e-5, rngs=nnx.Rngs(0))
    ln.scale.set_value(jnp.asarray(z["ln_vision/weight"]))
    ln.bias.set_value(jnp.asarray(z["ln_vision/bias"]))
    assert _maxdiff(ln(out), z["out/ln_vision"]) <= TOL


# ----------------------------------------------------------------------------------------
# Layouts.
# ----------------------------------------------------------------------------------------
def test_layouts_give_identical_parameters(hf):
    visual = _openai_visual(hf["sd"], LAYERS)
    text_side = {"positional_embedding": np.zeros((7, 16), np.float32), "token_embedding.weight": np.zeros((9, 16)),
                 "transformer.resblocks.0.attn.in_proj_weight": np.zeros((48, 16)), "ln_final.weight": np.ones(16),
                 "ln_final.bias": np.zeros(16), "text_projection": np.zeros((16, 8)), "logit_scale": np.zeros(())}
    sources = {
        "hf bare (CLIPVisionModel)": hf["sd"],
        "hf vision_model. (CLIPModel)": {**{f"vision_model.{k}": v for k, v in hf["sd"].items()},
                                         "text_model.embeddings.token_embedding.weight": np.zeros((9, 16)),
                                         "visual_projection.weight": np.zeros((8, WIDTH)), "logit_scale": np.zeros(())},
        "lavis": visual,
        "openai visual.": {**{f"visual.{k}": v for k, v in visual.items()}, **text_side},
    }
    for cfg in (FULL, CUT):
        params = {name: _params(from_pytorch("clip_vit", sd, cfg)) for name, sd in sources.items()}
        ref = params.pop("hf bare (CLIPVisionModel)")
        for name, p in params.items():
            assert p.keys() == ref.keys(), name
            for k in ref:
                np.testing.assert_array_equal(p[k], ref[k], err_msg=f"{name}: {k}")


# ----------------------------------------------------------------------------------------
# Position-table resizing.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_in,n_out", [(4, 6), (6, 4), (5, 5), (16, 26), (3, 1), (1, 3)])
def test_bicubic_matches_torch(n_in, n_out):
    rng = np.random.default_rng(n_in * 31 + n_out)
    grid = rng.standard_normal((2, n_in, n_in)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(grid)[None], size=(n_out, n_out), mode="bicubic",
                                          align_corners=True)[0].numpy()
    ours = np.einsum("ih,chw,jw->cij", bicubic_matrix(n_in, n_out), grid, bicubic_matrix(n_in, n_out))
    assert np.abs(ours - ref).max() <= 1e-5


def test_resize_positions_keeps_cls_and_matches_torch():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((1 + 16, 8)).astype(np.float32)
    out = resize_positions(table, 6)
    assert out.shape == (37, 8) and out.dtype == table.dtype
    np.testing.assert_array_equal(out[0], table[0])
    grid = torch.from_numpy(table[1:].reshape(1, 4, 4, 8)).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=True)
    assert np.abs(out[1:] - ref.permute(0, 2, 3, 1).reshape(36, 8).numpy()).max() <= 1e-5
    np.testing.assert_array_equal(resize_positions(table, 4), table)
    with pytest.raises(ValueError, match="square"):
        resize_positions(table[:-1], 4)


def test_converter_resizes_positions_only_when_allowed(hf):
    big = dataclasses.replace(FULL, image_size=24)  # 6x6 grid, the checkpoint has 4x4
    with pytest.raises(ConversionError, match="resize_positions_on_load"):
        from_pytorch("clip_vit", hf["sd"], big)
    allowed = dataclasses.replace(big, resize_positions_on_load=True)
    with pytest.warns(UserWarning, match="resizing"):
        vit = from_pytorch("clip_vit", hf["sd"], allowed)
    want = resize_positions(hf["sd"]["embeddings.position_embedding.weight"], 6)
    np.testing.assert_allclose(np.asarray(vit.positional_embedding[...]), want, rtol=0, atol=1e-6)
    assert vit(jnp.zeros((1, 24, 24, 3))).shape == (1, 37, WIDTH)


# ----------------------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------------------
def _error(sd, cfg=FULL) -> str:
    with pytest.raises(ConversionError) as e:
        from_pytorch("clip_vit", sd, cfg)
    return str(e.value)


def test_missing_key(hf):
    sd = _openai_visual(hf["sd"], LAYERS)
    del sd["transformer.resblocks.1.mlp.c_fc.bias"]
    assert "missing keys" in (msg := _error(sd)) and "transformer.resblocks.1.mlp.c_fc.bias" in msg


def test_unexpected_key(hf):
    sd = {**hf["sd"], "encoder.layers.0.self_attn.qkv.weight": np.zeros((3, 3))}
    assert "unexpected keys" in (msg := _error(sd)) and "encoder.layers.0.self_attn.qkv.weight" in msg


def test_renamed_key(hf):
    sd = _openai_visual(hf["sd"], LAYERS)
    sd["ln_pre.gamma"] = sd.pop("ln_pre.weight")
    msg = _error(sd)
    assert "ln_pre.weight" in msg and "ln_pre.gamma" in msg


def test_wrong_shape(hf):
    sd = _openai_visual(hf["sd"], LAYERS)
    sd["transformer.resblocks.0.attn.in_proj_weight"] = sd["transformer.resblocks.0.attn.in_proj_weight"][:, :16]
    assert "shape mismatches" in (msg := _error(sd)) and "in_proj_weight" in msg


def test_final_norm_required_when_built(hf):
    sd = dict(hf["sd"])
    del sd["post_layernorm.weight"]
    assert "post_layernorm.weight" in _error(sd)


def test_unknown_layout():
    assert "unrecognised key layout" in _error({"patch_embed.proj.weight": np.zeros((2, 3, 4, 4))})
