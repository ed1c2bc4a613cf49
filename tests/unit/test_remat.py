"""Rematerialising the IFT's layers changes memory, not numbers: same loss and gradients."""
import dataclasses

import jax
import numpy as np
from flax import nnx

from rsvl_jax.models import bita


def _loss_and_grads(remat: bool):
    cfg = bita.PRESETS["bita_opt_test"]
    cfg = dataclasses.replace(cfg, qformer=dataclasses.replace(cfg.qformer, remat=remat))
    model = bita.BITAOPT(cfg, rngs=nnx.Rngs(params=0, dropout=1))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, cfg.vit.image_size, cfg.vit.image_size, 3)).astype(np.float32)
    ids = rng.integers(3, cfg.opt.vocab_size, size=(2, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    graphdef, params, rest = nnx.split(model, model.trainable_filter(), ...)

    def loss_fn(params):
        m = nnx.merge(graphdef, params, rest, copy=True)
        return m.lm_loss(images, ids, mask, prompt_length=1, deterministic=False)[0]

    jaxpr = str(jax.make_jaxpr(jax.grad(loss_fn))(params))
    assert ("remat" in jaxpr or "checkpoint" in jaxpr) == remat  # the flag really rematerialises
    return jax.jit(jax.value_and_grad(loss_fn))(params)


def test_remat_gives_the_same_loss_and_gradients():
    (l0, g0), (l1, g1) = _loss_and_grads(False), _loss_and_grads(True)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for (k, a), (_, b) in zip(g0.flat_state(), g1.flat_state()):
        np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), atol=1e-6, err_msg=str(k))
