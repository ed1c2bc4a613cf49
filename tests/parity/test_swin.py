"""Swin encoder: parity with HF `SwinModel`, the converter's key layouts and its errors,
drop-path, and the Swin-T preset against PIR's recorded state-dict key list."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from rsvl_jax.convert import ConversionError, from_pytorch, read_state_dict
from rsvl_jax.convert import swin as swin_convert
from rsvl_jax.convert.core import module_variables
from rsvl_jax.models import swin
from rsvl_jax.models.swin import PRESETS, Swin, SwinConfig

from ..torch_models import hf_swin

# A: the test preset (8x8 tokens, window 4: shifted 2x2 windows, then one 4x4 window).
# B: 12x12 tokens, window 3 (odd window, shift 1) over three stages: 16 then 4 shifted windows,
#    two merges, and a last stage whose 3x3 map is exactly one window.
CONFIGS = {
    "A": PRESETS["swin_test"],
    "B": SwinConfig(image_size=48, embed_dim=8, depths=(2, 2, 2), num_heads=(2, 2, 4), window_size=3,
                    drop_path_rate=0.0),
}


def hf_model(cfg: SwinConfig, seed: int = 0):
    """A random HF SwinModel with every LayerNorm, bias and bias table randomised."""
    return hf_swin(cfg, seed)


@pytest.fixture(scope="module")
def hf_models():
    return {name: hf_model(cfg) for name, cfg in CONFIGS.items()}


@pytest.fixture(scope="module")
def converted(hf_models):
    """Our models filled from the HF ones (built abstractly: no slow eager random init)."""
    return {name: from_pytorch("swin", hf_models[name].state_dict(), CONFIGS[name]) for name in CONFIGS}


@nnx.jit(static_argnames="deterministic")
def run(model, images, deterministic=True):
    """The forward pass, jitted (eager dispatch of every small op is slow on CPU)."""
    return model(images, deterministic=deterministic)


def images_for(cfg: SwinConfig) -> np.ndarray:
    """One fixed batch per config (same shapes everywhere, so jit compilations are reused)."""
    return np.random.RandomState(0).randn(2, cfg.image_size, cfg.image_size, cfg.in_chans).astype(np.float32)


def params_of(module):
    return {k: np.asarray(v[...]) for k, v in module_variables(module).items()}


# ----------------------------------------------------------------------------------------
# Parity with HF.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_parity(name, hf_models, converted):
    cfg, hf, ours = CONFIGS[name], hf_models[name], converted[name]
    images = images_for(cfg)
    with torch.no_grad():
        ref = hf(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    out, inter = run(ours, jnp.asarray(images))
    tokens, pooled = np.asarray(inter["tokens"]), np.asarray(inter["pooled"])
    want_tokens, want_pooled = ref.last_hidden_state.numpy(), ref.pooler_output.numpy()
    assert out.shape == (2, 1 + cfg.num_tokens, cfg.num_features)
    d_tok, d_pool = np.abs(tokens - want_tokens).max(), np.abs(pooled - want_pooled).max()
    print(f"config {name}: max |tokens - HF| = {d_tok:.2e}, max |mean token - HF pooler| = {d_pool:.2e}")
    assert d_tok <= 1e-5 and d_pool <= 1e-5
    np.testing.assert_array_equal(np.asarray(out[:, 0]), pooled)
    np.testing.assert_array_equal(np.asarray(out[:, 1:]), tokens)


def test_shifted_windows_matter(converted):
    """Guard that the parity configs exercise the shift: without it the output changes."""
    cfg = CONFIGS["A"]
    assert swin.stage_window(cfg, 0) == (4, 2) and swin.stage_window(cfg, 1) == (4, 0)
    ours = nnx.clone(converted["A"])
    x = jnp.asarray(images_for(cfg))
    ref = run(ours, x)[0]
    ours.layers[0].blocks[1].shift = 0
    assert np.abs(np.asarray(run(ours, x)[0] - ref)).max() > 0.1


# ----------------------------------------------------------------------------------------
# Geometry constants against independent re-derivations of the spec (PIR.md §2.2).
# ----------------------------------------------------------------------------------------
def test_relative_position_index_formula():
    idx = swin.relative_position_index(7)
    for i in (0, 8, 48):
        for j in (0, 13, 48):
            (hi, wi), (hj, wj) = divmod(i, 7), divmod(j, 7)
            assert idx[i, j] == (hi - hj + 6) * 13 + (wi - wj + 6)
    assert idx.shape == (49, 49) and idx.min() == 0 and idx.max() == 168


def test_shift_mask_matches_slices():
    res, w, s = 56, 7, 3
    labels = np.zeros((res, res), np.int64)
    n = 0
    for hs in (slice(0, res - w), slice(res - w, res - s), slice(res - s, res)):
        for ws in (slice(0, res - w), slice(res - w, res - s), slice(res - s, res)):
            labels[hs, ws] = n
            n += 1
    win = labels.reshape(res // w, w, res // w, w).transpose(0, 2, 1, 3).reshape(-1, w * w)
    want = np.where(win[:, None, :] - win[:, :, None] != 0, -100.0, 0.0)
    got = swin.shift_mask(res, w, s)
    assert got.shape == (64, 49, 49)
    np.testing.assert_array_equal(got, want)
    assert [swin.shift_mask(r, 7, 3).shape[0] for r in (28, 14)] == [16, 4]


# ----------------------------------------------------------------------------------------
# Key layouts.
# ----------------------------------------------------------------------------------------
def hf_to_microsoft(sd, cfg):
    """Rewrite an HF (transformers 5) SwinModel state dict in Microsoft naming, with the
    buffers and classifier head the Microsoft release carries (written independently of the
    converter's table)."""
    renames = [
        ("embeddings.patch_embeddings.projection", "patch_embed.proj"), ("embeddings.norm", "patch_embed.norm"),
        ("encoder.layers.", "layers."), ("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
        ("attention.o_proj", "attn.proj"),
        ("attention.relative_position_bias.relative_position_bias_table", "attn.relative_position_bias_table"),
    ]
    out = {}
    for k, v in sd.items():
        if ".attention.k_proj." in k or ".attention.v_proj." in k:
            continue
        v = v.numpy()
        if ".attention.q_proj." in k:  # fuse rows [q; k; v] as in Microsoft's Linear(C, 3C)
            v = np.concatenate([sd[k.replace("q_proj", p)].numpy() for p in ("q_proj", "k_proj", "v_proj")])
            k = k.replace("attention.q_proj", "attn.qkv")
        for a, b in renames:
            k = k.replace(a, b)
        out["norm." + k[len("layernorm."):] if k.startswith("layernorm.") else k] = v
    for s, depth in enumerate(cfg.depths):
        window, shift = swin.stage_window(cfg, s)
        for b in range(depth):
            out[f"layers.{s}.blocks.{b}.attn.relative_position_index"] = np.zeros((window**2,) * 2, np.int64)
            if b % 2 and shift:
                out[f"layers.{s}.blocks.{b}.attn_mask"] = swin.shift_mask(swin.stage_resolution(cfg, s), window, shift)
    out["head.weight"] = np.ones((5, cfg.num_features), np.float32)
    out["head.bias"] = np.ones((5,), np.float32)
    return out


@pytest.fixture(scope="module")
def reference_params(converted):
    return params_of(converted["A"])


def test_microsoft_and_pir_layouts(hf_models, reference_params, tmp_path):
    cfg = CONFIGS["A"]
    ms = hf_to_microsoft(hf_models["A"].state_dict(), cfg)
    path = tmp_path / "swin_release.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in ms.items()}, "epoch": 3}, path)
    pir = {f"vision_encoder.{k}": v for k, v in ms.items() if not k.startswith("head.")}
    pir |= {"temp": np.float32(0.07), "text_proj.weight": np.zeros((4, 4), np.float32)}
    for name, source in {"microsoft": ms, "microsoft .pth": str(path), "pir": pir}.items():
        module, report = from_pytorch("swin", source, cfg, with_report=True)
        got = params_of(module)
        assert got.keys() == reference_params.keys(), name
        for k in got:
            np.testing.assert_array_equal(got[k], reference_params[k], err_msg=f"{name}: {k}")
        assert report.parameters == sum(v.size for v in got.values())
    assert report.skipped == {"relative_position_index buffer": 4, "attn_mask buffer": 1,
                              "other PIR modules (not the vision encoder)": 2}


def test_hf_legacy_layout(hf_models, reference_params, tmp_path):
    """transformers' save_pretrained writes the Hub naming (attention.self.query, ...)."""
    hf_models["A"].save_pretrained(tmp_path)
    legacy = read_state_dict(tmp_path)
    assert swin_convert.detect_layout(legacy) == ("hf_legacy", "")
    with_head = {f"swin.{k}": v for k, v in legacy.items()}
    with_head |= {"classifier.weight": np.ones((3, 32), np.float32), "classifier.bias": np.ones(3, np.float32)}
    with_head |= {f"swin.encoder.layers.{s}.blocks.{b}.attention.self.relative_position_index": np.zeros((16, 16))
                  for s in range(2) for b in range(2)}
    for source in (str(tmp_path), with_head):
        got = params_of(from_pytorch("swin", source, CONFIGS["A"]))
        for k in reference_params:
            np.testing.assert_array_equal(got[k], reference_params[k], err_msg=k)


def test_table_prefix_for_composites():
    entries, skips = swin_convert.table(CONFIGS["A"], "microsoft", "vision_encoder.")
    assert all(s.startswith("vision_encoder.") for e in entries for s in e.sources)
    assert any(e.target == "layers.0.blocks.1.attn.qkv.kernel" for e in entries)
    assert {s.name for s in skips} == {"relative_position_index buffer", "attn_mask buffer", "classifier head (not built)"}


def test_pir_state_dict_key_list(fixtures_dir):
    """Every `vision_encoder.*` key PIR records converts into Swin-T (shapes included), the
    buffers are skipped by name, and the parameter count is the spec's 27,519,354."""
    tensors = {}
    for line in (fixtures_dir / "pir" / "pir_state_dict.txt").read_text().splitlines():
        key, shape, dtype = line.split("\t")
        # zero-stride arrays: the right shapes at no memory cost
        tensors[key] = np.broadcast_to(np.zeros((), np.float32), tuple(eval(shape)))
    assert len(tensors) == 905
    module, report = from_pytorch("swin", tensors, "swin_tiny_224", with_report=True)
    assert report.parameters == 27_519_354
    assert report.converted == 188 - 12 - 5
    assert report.skipped == {"relative_position_index buffer": 12, "attn_mask buffer": 5,
                              "other PIR modules (not the vision encoder)": 905 - 188}


# ----------------------------------------------------------------------------------------
# Converter errors.
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def microsoft_sd(hf_models):
    return hf_to_microsoft(hf_models["A"].state_dict(), CONFIGS["A"])


def test_missing_key(microsoft_sd):
    sd = dict(microsoft_sd)
    del sd["layers.1.blocks.0.mlp.fc2.bias"]
    with pytest.raises(ConversionError, match=r"missing keys[\s\S]*layers\.1\.blocks\.0\.mlp\.fc2\.bias"):
        from_pytorch("swin", sd, CONFIGS["A"])


def test_unexpected_key(microsoft_sd):
    sd = dict(microsoft_sd, **{"layers.0.blocks.0.attn.extra_gate": np.zeros(3, np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected keys[\s\S]*layers\.0\.blocks\.0\.attn\.extra_gate"):
        from_pytorch("swin", sd, CONFIGS["A"])


def test_wrong_shape(microsoft_sd):
    sd = dict(microsoft_sd)
    sd["layers.0.blocks.1.attn.relative_position_bias_table"] = np.zeros((169, 2), np.float32)  # window 7 table
    with pytest.raises(ConversionError, match=r"shape mismatches[\s\S]*layers\.0\.blocks\.1\.attn\.relative_position_bias_table"):
        from_pytorch("swin", sd, CONFIGS["A"])


def test_unknown_layout():
    with pytest.raises(ConversionError, match="not a Swin checkpoint"):
        from_pytorch("swin", {"conv1.weight": np.zeros((1, 1))}, CONFIGS["A"])


# ----------------------------------------------------------------------------------------
# Drop-path and the real-size preset.
# ----------------------------------------------------------------------------------------
def seed_rng_streams(model, seed: int):
    """A converted module is built with `nnx.eval_shape`, so its RNG streams are abstract too;
    give them concrete keys (an eager `Swin(...)` init would do, but is slow on CPU)."""
    state = nnx.state(model, nnx.RngState)
    for i, (_, var) in enumerate(state.flat_state()):
        var.set_value(jax.random.key(seed + i) if isinstance(var, nnx.RngKey) else jnp.zeros((), jnp.uint32))
    nnx.update(model, state)


def test_drop_path(hf_models):
    cfg = SwinConfig(**{**CONFIGS["A"].__dict__, "drop_path_rate": 0.5})
    assert swin.drop_path_rates(cfg) == pytest.approx([0.0, 0.5 / 3, 1.0 / 3, 0.5])
    model = from_pytorch("swin", hf_models["A"].state_dict(), cfg)
    seed_rng_streams(model, 1)
    x = jnp.asarray(images_for(cfg))
    det = np.asarray(run(model, x)[0])
    np.testing.assert_array_equal(det, np.asarray(run(model, x)[0]))
    saved = nnx.clone(nnx.state(model))
    first = np.asarray(run(model, x, deterministic=False)[0])
    second = np.asarray(run(model, x, deterministic=False)[0])  # the RNG streams moved on
    nnx.update(model, saved)
    again = np.asarray(run(model, x, deterministic=False)[0])
    assert np.abs(first - det).max() > 1e-3
    assert np.abs(first - second).max() > 1e-3
    np.testing.assert_array_equal(first, again)


def test_swin_tiny_preset_abstract():
    cfg = PRESETS["swin_tiny_224"]
    model = nnx.eval_shape(lambda: Swin(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    assert sum(math.prod(v.shape) for _, v in params.flat_state()) == 27_519_354  # PIR.md §2.1
    graphdef, state = nnx.split(model)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x)[0], state,
                         jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    assert out.shape == (2, 50, 768)
    assert [swin.stage_window(cfg, s) for s in range(4)] == [(7, 3), (7, 3), (7, 3), (7, 0)]
    assert swin.drop_path_rates(cfg)[-1] == pytest.approx(0.1) and swin.drop_path_rates(cfg)[0] == 0.0
