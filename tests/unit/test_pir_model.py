"""PIR model behaviour: shapes, normalisation, batch size 1, baseline mode, jit, the quirk
flags (§7 Q3/Q5/Q8/Q14/Q15/Q18/Q19) and config validation.

A small full model is built once; everything that only needs the heads runs on a
heads-only model (encoder widths given instead of encoder configs), which is much cheaper.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rsvl_jax.models import swin as swin_lib
from rsvl_jax.models.bert import BertConfig
from rsvl_jax.models.pae import belief_order
from rsvl_jax.models.pir import PIR, PIRConfig, PRESETS
from rsvl_jax.models.resnet import ResNetConfig

# Smaller than the `pir_test` preset (one Swin stage with shifted windows, one BERT layer, one
# ResNet stage): building a model compiles one program per distinct initialiser shape, which
# dominates this file's run time.
SMALL = PIRConfig(
    swin=swin_lib.SwinConfig(image_size=16, embed_dim=8, depths=(2,), num_heads=(2,), window_size=2,
                             drop_path_rate=0.1),
    bert=BertConfig(vocab_size=20, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=16,
                    max_position_embeddings=16),
    resnet=ResNetConfig(layers=(1,), width=4), embed_dim=16, heads=2, filter_size=6, instru_num=2, cycle_num=2,
)

# Heads-only twin of SMALL (same widths and head shapes, so eager op compiles are shared).
HEADS = PIRConfig(vision_width=8, text_width=16, conv_width=16, embed_dim=16, heads=2, filter_size=6,
                  instru_num=2, cycle_num=2)


def _images(b, size, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((b, size, size, 3)), jnp.float32)


def _ids(rows, length):
    return jnp.asarray([r + [0] * (length - len(r)) for r in rows], jnp.int32)


@pytest.fixture(scope="module")
def model():
    return PIR(SMALL, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def encode_image():
    return nnx.jit(lambda m, x: m.encode_image(x))


@pytest.fixture(scope="module")
def encode_text():
    return nnx.jit(lambda m, ids: m.encode_text(ids))


@pytest.fixture(scope="module")
def heads():
    return PIR(HEADS, rngs=nnx.Rngs(0))


# Heads-only forwards run eagerly: the blocks share shapes, so op-by-op compiles are reused,
# which here is cheaper than one whole-graph compile per config.
def fuse_image(m, tokens, conv=None, det=True):
    return m.fuse_image(tokens, conv, deterministic=det)


def fuse_text(m, tokens, mask=None):
    return m.fuse_text(tokens, attention_mask=mask)


def _unit_norm(emb):
    np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=-1), 1.0, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Full model.
# ----------------------------------------------------------------------------------------
def test_encode_image(model, encode_image):
    cfg = model.config
    emb, inter = encode_image(model, _images(2, cfg.swin.image_size))
    assert emb.shape == (2, cfg.embed_dim) and emb.dtype == jnp.float32
    _unit_norm(emb)
    n = 1 + cfg.swin.num_tokens
    assert inter["vision_tokens"].shape == (2, n, cfg.swin.num_features)
    assert inter["belief_scores"].shape == (2, n)
    np.testing.assert_allclose(np.asarray(inter["belief_scores"]).sum(-1), 1.0, rtol=1e-5)
    order = np.asarray(inter["sorted_index"])
    assert (np.sort(order, axis=-1) == np.arange(n)).all()  # a permutation per sample
    scores = np.take_along_axis(np.asarray(inter["belief_scores"]), order, -1)
    assert (np.diff(scores, axis=-1) <= 0).all()  # descending belief
    np.testing.assert_array_equal(np.asarray(inter["selected_index"]), order[:, : cfg.filter_size])
    assert inter["tokens"].shape == (2, cfg.filter_size, cfg.embed_dim)
    assert inter["instruction"].shape == inter["local"].shape == inter["global"].shape == (2, cfg.embed_dim)


def test_encode_text(model, encode_text):
    cfg = model.config
    emb, inter = encode_text(model, _ids([[2, 5, 6, 7], [2, 8]], 6))
    assert emb.shape == (2, cfg.embed_dim)
    _unit_norm(emb)
    assert inter["text_tokens"].shape == (2, 6, cfg.bert.hidden_size)
    assert inter["tokens"].shape == (2, 6, cfg.embed_dim)


def test_batch_size_one(model, encode_image):
    """The reference crashes at B = 1 (`.squeeze()`, §7 Q4); in eval mode a sample's
    embedding does not depend on its batch-mates."""
    x = _images(2, model.config.swin.image_size)
    both, _ = encode_image(model, x)
    one, _ = encode_image(model, x[:1])
    np.testing.assert_allclose(np.asarray(one[0]), np.asarray(both[0]), atol=1e-5)


def test_train_mode(model, encode_image):
    """deterministic=False turns dropout/drop-path on, and, mirroring Q3 by default,
    train_prior_bn makes the frozen ResNet's BatchNorm use and update batch statistics."""
    assert model.conv_encoder.config.bn_mode == "pir_train"
    m = nnx.clone(model)
    x = _images(2, m.config.swin.image_size)
    before = np.asarray(m.conv_encoder.bn1.mean[...]).copy()
    step = nnx.jit(lambda m, x: m.encode_image(x, deterministic=False, train_prior_bn=True)[0])
    first, second = step(m, x), step(m, x)
    _unit_norm(first)
    assert not np.allclose(np.asarray(m.conv_encoder.bn1.mean[...]), before)
    assert np.abs(np.asarray(first) - np.asarray(second)).max() > 1e-4  # fresh dropout masks
    assert np.abs(np.asarray(first) - np.asarray(encode_image(model, x)[0])).max() > 1e-4


def test_baseline(encode_image):
    """VSE baseline (§2.9): projected [CLS]/mean token only; no prior, VIR or LCA modules."""
    cfg = dataclasses.replace(SMALL, is_baseline=True)
    base = PIR(cfg, rngs=nnx.Rngs(0))
    assert base.conv_encoder is None
    for name in ("conv_proj", "mapping_img", "mapping_txt", "head_img", "head_txt", "img_sa", "txt_ca"):
        assert not hasattr(base, name)
    emb, inter = encode_image(base, _images(2, cfg.swin.image_size))
    _unit_norm(emb)
    g = np.asarray(inter["global"])
    np.testing.assert_allclose(np.asarray(emb), g / np.linalg.norm(g, axis=-1, keepdims=True), atol=1e-6)
    assert "belief_scores" not in inter


# ----------------------------------------------------------------------------------------
# Heads-only model.
# ----------------------------------------------------------------------------------------
def _vision(b=2, n=17, seed=0):
    r = np.random.default_rng(seed)
    return (jnp.asarray(r.standard_normal((b, n, HEADS.vision_width)), jnp.float32),
            jnp.asarray(r.standard_normal((b, HEADS.conv_width, 1, 1)), jnp.float32))


def test_heads_only_model_refuses_encode(heads):
    with pytest.raises(ValueError, match="fuse_image"):
        heads.encode_image(_images(1, 8))
    with pytest.raises(ValueError, match="fuse_text"):
        heads.encode_text(_ids([[1]], 1))


def test_jit_matches_eager(model, encode_image):
    """The jitted full forward equals eager heads applied to its encoder outputs."""
    jitted, inter = encode_image(model, _images(2, model.config.swin.image_size))
    eager, _ = model.fuse_image(inter["vision_tokens"], inter["prior_features"])
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-6)


def test_prior_feature_layouts(heads):
    """Prior features may come as (B, C, 1, 1) (the reference's pooled map) or (B, C), and
    B = 1 works (the reference's `.squeeze()` crashes there, Q4)."""
    tokens, conv = _vision()
    full, _ = fuse_image(heads, tokens, conv)
    one, _ = fuse_image(heads, tokens[:1], conv[:1, :, 0, 0])
    np.testing.assert_allclose(np.asarray(one[0]), np.asarray(full[0]), atol=1e-6)


def test_clones_start_identical(heads):
    """Q18: the reference deep-copies one initialised module for each of N copies."""
    def params(m):
        return jax.tree.leaves(nnx.state(m, nnx.Param))

    for group in (heads.img_sa, heads.img_ca, heads.txt_sa, heads.txt_ca, heads.mapping_img, heads.mapping_txt):
        for other in group[1:]:
            for x, y in zip(params(group[0]), params(other)):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    distinct = PIR(dataclasses.replace(HEADS, identical_clones=False), rngs=nnx.Rngs(0))
    assert not np.allclose(np.asarray(distinct.txt_sa[0].mhatt.linear_q.kernel[...]),
                           np.asarray(distinct.txt_sa[1].mhatt.linear_q.kernel[...]))


def test_belief_order_ties_and_logit_sort():
    """Q14: ties (exactly equal softmax values) are broken by ascending token index; with
    `sort_on_logits` underflowed probabilities are still ordered by their logits."""
    instruction = jnp.ones((1, 2), jnp.float32)
    tokens = jnp.asarray([[[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [2.0, 0.0], [-200.0, 0.0], [-300.0, 0.0]]])
    scores, order = belief_order(tokens, instruction)
    # logits 0, 2, 0, 2, -200, -300: ties (1, 3) and (0, 2); the last two underflow to 0
    assert np.asarray(scores)[0, 4] == np.asarray(scores)[0, 5] == 0.0
    np.testing.assert_array_equal(np.asarray(order)[0], [1, 3, 0, 2, 4, 5])
    tokens = tokens.at[0, 4, 0].set(-300.0).at[0, 5, 0].set(-200.0)  # swap the underflowed pair
    _, order = belief_order(tokens, instruction)
    np.testing.assert_array_equal(np.asarray(order)[0], [1, 3, 0, 2, 4, 5])  # tie: by index
    _, order = belief_order(tokens, instruction, sort_on_logits=True)
    np.testing.assert_array_equal(np.asarray(order)[0], [1, 3, 0, 2, 5, 4])  # by logit


def test_token_count(heads):
    """Q15: the reference scores only the first 50 tokens; `use_token_count` scores all."""
    tokens, conv = _vision(n=60)
    _, inter = fuse_image(heads, tokens, conv)
    assert inter["belief_scores"].shape == (2, 50)
    fixed = PIR(dataclasses.replace(HEADS, use_token_count=True), rngs=nnx.Rngs(0))
    _, inter = fuse_image(fixed, tokens, conv)
    assert inter["belief_scores"].shape == (2, 60)


def test_text_mask_fix(heads):
    """Q5: by default padding positions take part in LCA; with `text_mask` they are masked,
    so appending padding leaves the embedding unchanged."""
    r = np.random.default_rng(3)
    real = jnp.asarray(r.standard_normal((2, 4, HEADS.text_width)), jnp.float32)
    padded = jnp.concatenate([real, jnp.asarray(r.standard_normal((2, 3, HEADS.text_width)), jnp.float32)], 1)
    mask = jnp.asarray([[1] * 4 + [0] * 3] * 2)
    ref_short, _ = fuse_text(heads, real)
    ref_long, _ = fuse_text(heads, padded, mask)  # ignored by default
    assert np.abs(np.asarray(ref_short) - np.asarray(ref_long)).max() > 1e-4
    masked = PIR(dataclasses.replace(HEADS, text_mask=True), rngs=nnx.Rngs(0))
    short, _ = fuse_text(masked, real)
    long, _ = fuse_text(masked, padded, mask)
    np.testing.assert_allclose(np.asarray(long), np.asarray(short), atol=1e-5)


def test_temperatures(heads):
    assert np.allclose([float(t) for t in heads.temperatures()], [0.07, 0.07])
    for clamp, want in ((None, 3.0), (True, 0.5), ((0.01, 0.2), 0.2)):
        m = PIR(dataclasses.replace(HEADS, temp_clamp=clamp, temp_init=3.0), rngs=nnx.Rngs(0))
        assert np.isclose(float(m.temperatures()[0]), want)
        assert np.isclose(float(m.temp[...]), 3.0)  # the parameter itself is never clamped
    base = dataclasses.replace(HEADS, is_baseline=True, use_triplet_loss=True, use_affil_loss=False)
    t, t2 = PIR(base, rngs=nnx.Rngs(0)).temperatures()
    assert t is None and t2 is None


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(instru_num=0), r"instru_num.*Q19"),
        (dict(cycle_num=0), r"cycle_num.*Q19"),
        (dict(filter_size=0), "filter_size"),
        (dict(heads=5), "divisible"),
        (dict(prior_bn_mode="train"), "prior_bn_mode"),
        (dict(vision_width=None), "vision_width"),
        (dict(temp_clamp=(0.1,)), "temp_clamp"),
    ],
)
def test_config_validation(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(HEADS, **change)


def test_baseline_needs_no_pae_config():
    cfg = dataclasses.replace(HEADS, is_baseline=True, instru_num=0, cycle_num=0, conv_width=None)
    m = PIR(cfg, rngs=nnx.Rngs(0))
    tokens, _ = _vision()
    emb, _ = fuse_image(m, tokens)
    _unit_norm(emb)
    text = jnp.asarray(np.random.default_rng(4).standard_normal((2, 5, HEADS.text_width)), jnp.float32)
    temb, inter = fuse_text(m, text)
    g = np.asarray(inter["global"])
    np.testing.assert_allclose(np.asarray(temb), g / np.linalg.norm(g, axis=-1, keepdims=True), atol=1e-6)
    assert set(inter) == {"text_tokens", "projected_tokens", "global"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_consistent(name):
    """Every preset's Swin geometry is valid and the heads fit its encoders."""
    cfg = PRESETS[name]
    for stage in range(len(cfg.swin.depths)):
        swin_lib.stage_window(cfg.swin, stage)
    assert cfg.vision_dim == cfg.swin.num_features and cfg.text_dim == cfg.bert.hidden_size
    assert cfg.conv_dim == cfg.resnet.features
    assert not cfg.is_baseline and cfg.text_mask is False and cfg.prior_bn_mode == "pir_train"
    if name == "pir_swin_t":
        assert (cfg.embed_dim, cfg.filter_size, cfg.instru_num, cfg.cycle_num, cfg.heads) == (512, 40, 2, 3, 8)
        assert 1 + cfg.swin.num_tokens == 50
    else:  # small presets still select a strict subset of the tokens
        assert cfg.filter_size < 1 + cfg.swin.num_tokens
