"""Mixed precision and remat change memory and rounding, not the model.

Remat must give the float32 step's loss and gradients exactly (up to float32 reassociation);
bfloat16 compute must keep float32 parameters and float32 losses and stay within the tolerance
stated here of the float32 forward (tools/precision.py measures the deviations for README).
"""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rsvl_jax import losses
from rsvl_jax.models import bert, bita, pir, swin

TOOLS = pathlib.Path(__file__).resolve().parents[2] / "tools"
# bfloat16 has an 8-bit mantissa (relative rounding 2^-9 ~ 0.2%); a few layers of tiny random
# models compound it to about 1% (measured 0.4-1.2%). Allowed: 3% relative (L2) and on losses.
BF16_REL = 3e-2
BF16_LOSS_REL = 3e-2


def _precision_tool():
    spec = importlib.util.spec_from_file_location("tools_precision", TOOLS / "precision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def _param_dtypes(model):
    return {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))}


# ----------------------------------------------------------------------------------------
# remat
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["swin", "bert"])
def test_remat_flag_really_rematerialises(module):
    if module == "swin":
        cfg = swin.PRESETS["swin_test"]
        make, x = swin.Swin, jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
        call = lambda m, x: m(x)[0].sum()
    else:
        cfg = bert.PRESETS["bert_test"]
        make, x = bert.Bert, jnp.ones((1, 5), jnp.int32)
        call = lambda m, x: m(x).sum()
    for remat in (False, True):
        import dataclasses

        model = make(dataclasses.replace(cfg, remat=remat), rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda p: call(nnx.merge(graphdef, p, rest, copy=True), x)
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
        assert ("remat" in jaxpr or "checkpoint" in jaxpr) == remat


def test_remat_pir_step_gives_the_same_loss_and_gradients():
    """The trainer's PIR step (dropout on, BatchNorm in batch mode), with and without remat."""
    tool = _precision_tool()
    plain = tool.run("pir", "float32", batch=4)
    remat = tool.run("pir", "float32", batch=4, state=plain["state"], remat=True)
    np.testing.assert_allclose(remat["loss"], plain["loss"], rtol=1e-6)
    for (path, a), (_, b) in zip(plain["grads"].flat_state(), remat["grads"].flat_state()):
        np.testing.assert_allclose(np.asarray(b[...]), np.asarray(a[...]), rtol=1e-5, atol=1e-6, err_msg=str(path))


# ----------------------------------------------------------------------------------------
# bfloat16 compute
# ----------------------------------------------------------------------------------------
def test_pir_bfloat16_forward_keeps_float32_params_and_losses():
    cfg = pir.PRESETS["pir_test"]
    m32 = pir.PIR(cfg, rngs=nnx.Rngs(0))
    m16 = pir.PIR(cfg.with_precision("bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(m16, nnx.state(m32))
    assert _param_dtypes(m16) == {jnp.dtype(jnp.float32)}
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
    ids = rng.integers(1, cfg.bert.vocab_size, size=(4, 12)).astype(np.int32)
    # the encoders compute in bfloat16 ...
    for f in (lambda m: m.vision_encoder(images)[0], lambda m: m.text_encoder(ids), lambda m: m.conv_encoder(images)):
        a, b = f(m32), f(m16)
        assert b.dtype == jnp.bfloat16 and _rel(a, b) < BF16_REL
    # ... the embeddings and losses are float32
    (i32, inter32), (i16, inter16) = m32.encode_image(images), m16.encode_image(images)
    t32, t16 = m32.encode_text(ids)[0], m16.encode_text(ids)[0]
    assert i16.dtype == t16.dtype == jnp.float32
    assert _rel(t32, t16) < BF16_REL
    # VIR keeps the top-k tokens by belief score, a discrete choice that rounding can flip on
    # near-ties; where it kept the same tokens, the image embedding is as close as the text's.
    same = np.all(np.sort(inter32["selected_index"], -1) == np.sort(inter16["selected_index"], -1), axis=-1)
    assert same.any()
    assert _rel(np.asarray(i32)[same], np.asarray(i16)[same]) < BF16_REL
    temp = m32.temperatures()[0]
    l32 = losses.pir_contrastive_loss(i32, t32, temp)
    l16 = losses.pir_contrastive_loss(i16, t16, m16.temperatures()[0])
    assert l16.dtype == jnp.float32 and abs(float(l16 - l32)) / abs(float(l32)) < BF16_LOSS_REL


@pytest.mark.parametrize("preset", ["bita_stage1_test", "bita_opt_test"])
def test_bita_bfloat16_forward_keeps_float32_params_and_losses(preset):
    cfg = bita.PRESETS[preset]
    make = bita.BITAStage1 if cfg.opt is None else bita.BITAOPT
    m32 = make(cfg, rngs=nnx.Rngs(0))
    m16 = make(cfg.with_dtype(jnp.bfloat16), rngs=nnx.Rngs(0))
    nnx.update(m16, nnx.state(m32))
    assert _param_dtypes(m16) == {jnp.dtype(jnp.float32)}
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, cfg.vit.image_size, cfg.vit.image_size, 3)).astype(np.float32)
    vocab = cfg.qformer.vocab_size if cfg.opt is None else cfg.opt.vocab_size
    ids = rng.integers(3, vocab, size=(2, 8)).astype(np.int32)
    mask = np.ones_like(ids)
    if cfg.opt is None:
        (l32, o32), (l16, o16) = m32.itc_loss(images, ids, mask), m16.itc_loss(images, ids, mask)
        pairs = [(o32["image_feats"], o16["image_feats"]), (o32["text_feat"], o16["text_feat"])]
    else:
        (l32, o32), (l16, o16) = m32.lm_loss(images, ids, mask), m16.lm_loss(images, ids, mask)
        pairs = [(m32.prefix_embeds(images), m16.prefix_embeds(images)), (o32["logits"], o16["logits"])]
        assert o16["logits"].dtype == jnp.float32
    assert l16.dtype == jnp.float32
    assert abs(float(l16 - l32)) / abs(float(l32)) < BF16_LOSS_REL
    for a, b in pairs:
        assert _rel(a, b) < BF16_REL
