"""BITA's optimiser (spec BITA §8): the per-(epoch, iteration) schedule with quirk Q12, the
decay / no-decay groups decided on the reference names (§8.1, Q14) at real size, and AdamW
against torch.optim.AdamW step by step."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rsvl_jax import optim
from rsvl_jax.convert import bita as bita_conv
from rsvl_jax.models import bita


# ----------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------
def reference_lr(epoch, it, *, init_lr, min_lr, warmup_lr, warmup_steps, max_epoch):
    """Spec §8.2 read literally: warm-up only in epoch 0 (capped at init_lr); from epoch 1 a
    cosine that depends only on the epoch."""
    if epoch == 0:
        return min(init_lr, warmup_lr + (init_lr - warmup_lr) * it / max(warmup_steps, 1))
    return min_lr + (init_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * epoch / max_epoch))


@pytest.mark.parametrize("warmup_steps,ipe", [(5, 8), (20, 8), (0, 3), (8, 8)])
def test_schedule_equals_reference_at_every_epoch_and_iteration(warmup_steps, ipe):
    kw = dict(init_lr=1e-4, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=warmup_steps, max_epoch=5)
    sched = jax.jit(optim.linear_warmup_cosine_lr(iters_per_epoch=ipe, **kw))
    for epoch in range(5):
        for it in range(ipe):
            got = float(sched(epoch * ipe + it))
            assert got == pytest.approx(reference_lr(epoch, it, **kw), rel=1e-6), (epoch, it)


def test_warmup_longer_than_an_epoch_is_cut_short_then_jumps():
    """Q12: stage 1 (5000 warm-up steps, ~463 iterations per epoch) ends epoch 0 near 1e-5
    and jumps to the epoch-1 cosine value."""
    sched = optim.linear_warmup_cosine_lr(1e-4, 1e-5, 1e-6, 5000, 5, 463)
    last = float(sched(462))
    assert last == pytest.approx(1e-6 + (1e-4 - 1e-6) * 462 / 5000, rel=1e-6)
    assert last < 1.1e-5 and float(sched(463)) == pytest.approx(9.141e-5, rel=1e-4)


def test_spot_values_from_the_spec():
    """§8.3: stages 1/2 epochs 1-4 and caption epochs 1, 25, 49."""
    for warmup, ipe in ((5000, 463), (2000, 927)):
        sched = optim.linear_warmup_cosine_lr(1e-4, 1e-5, 1e-6, warmup, 5, ipe)
        got = [float(sched(e * ipe + 17)) for e in (1, 2, 3, 4)]
        np.testing.assert_allclose(got, [9.141e-5, 6.891e-5, 4.109e-5, 1.859e-5], rtol=1e-3)
        assert float(sched(0)) == pytest.approx(1e-6)
    cap = optim.linear_warmup_cosine_lr(1e-5, 0.0, 1e-8, 1000, 50, 43)
    np.testing.assert_allclose([float(cap(e * 43)) for e in (1, 25, 49)], [9.990e-6, 5.0e-6, 9.9e-9], rtol=1e-2)
    assert float(cap(42)) == pytest.approx(1e-8 + (1e-5 - 1e-8) * 42 / 1000, rel=1e-5)  # ~4.3e-7


# ----------------------------------------------------------------------------------------
# Parameter groups at real size
# ----------------------------------------------------------------------------------------
D, DV, FF, V, P, L = 768, 1024, 3072, 30523, 512, 12


def spec_checkpoint(stage):
    """The reference's checkpoint tensors {name: shape}, written out from spec §10.2 / §10.3."""
    t = {"query_tokens": (1, 32, D), "ln_vision.weight": (DV,), "ln_vision.bias": (DV,),
         "Fformer.bert.embeddings.LayerNorm.weight": (D,), "Fformer.bert.embeddings.LayerNorm.bias": (D,)}
    for l in range(L):
        s = f"Fformer.bert.encoder.layer.{l}"
        linears = {"crossattention.self.query": (D, D), "crossattention.self.key": (D, DV),
                   "crossattention.self.value": (D, DV), "crossattention.output.dense": (D, D),
                   "intermediate_query.dense": (FF, D), "output_query.dense": (D, FF)}
        if stage == 1:
            linears |= {"intermediate.dense": (FF, D), "output.dense": (D, FF)}
        for name, shape in linears.items():
            t[f"{s}.{name}.weight"], t[f"{s}.{name}.bias"] = shape, shape[:1]
        norms = ["fourier.output.LayerNorm", "crossattention.output.LayerNorm", "output_query.LayerNorm"]
        for name in norms + (["output.LayerNorm"] if stage == 1 else []):
            t[f"{s}.{name}.weight"] = t[f"{s}.{name}.bias"] = (D,)
    if stage == 1:
        t |= {"Fformer.bert.embeddings.word_embeddings.weight": (V, D),
              "Fformer.bert.embeddings.position_embeddings.weight": (P, D),
              "Fformer.cls.predictions.bias": (V,), "Fformer.cls.predictions.transform.dense.weight": (D, D),
              "Fformer.cls.predictions.transform.dense.bias": (D,),
              "Fformer.cls.predictions.transform.LayerNorm.weight": (D,),
              "Fformer.cls.predictions.transform.LayerNorm.bias": (D,),
              "vision_proj.weight": (256, D), "vision_proj.bias": (256,), "text_proj.weight": (256, D),
              "text_proj.bias": (256,), "itm_head.weight": (2, D), "itm_head.bias": (2,), "temp": ()}
    else:
        t |= {"opt_proj.weight": (2560, D), "opt_proj.bias": (2560,)}
    return t


def reference_groups(stage):
    """{group: (tensors, params)} by the runner's rule over the tensors that get a gradient
    (stage 1's itm_head and MLM head get none, so torch AdamW never touches them)."""
    groups = {}
    for name, shape in spec_checkpoint(stage).items():
        if name.startswith(("itm_head.", "Fformer.cls.")):
            continue
        g = "no_decay" if len(shape) < 2 or any(s in name for s in ("bias", "ln", "bn")) else "decay"
        n, size = groups.get(g, (0, 0))
        groups[g] = (n + 1, size + math.prod(shape))
    return groups


def groups_of(labels, params):
    counts = {}
    for (_, label), (_, var) in zip(labels.flat_state(), params.flat_state()):
        n, size = counts.get(label, (0, 0))
        counts[label] = (n + 1, size + math.prod(var.shape))
    return counts


def abstract_trainable(preset):
    """The trainable tree as the trainer hands it over: the model's `bridge` only (abstract)."""
    cfg = bita.PRESETS[preset]
    model_cls = bita.BITAStage1 if cfg.opt is None else bita.BITAOPT
    # only the bridge is built for real-size shapes; the ViT/OPT would be split off anyway
    bridge_cls = bita.Stage1Bridge if cfg.opt is None else bita.OPTBridge
    _, state = jax.eval_shape(lambda: nnx.split(bridge_cls(cfg, rngs=nnx.Rngs(0))))
    assert model_cls  # both model classes keep their bridge under `bridge`
    return cfg, state.filter(nnx.Param)


@pytest.mark.parametrize("preset,stage", [("bita_stage1_vitl", 1), ("bita_opt_2_7b", 2),
                                          ("bita_caption_opt_2_7b", 2)])
def test_groups_match_the_reference_rule_at_real_size(preset, stage):
    cfg, params = abstract_trainable(preset)
    labels = optim.bita_labels(params, bita_conv.reference_names(cfg))
    got = groups_of(labels, params)
    want = reference_groups(stage)
    print(preset, got)
    assert got == want
    # §2.11's trainable totals, minus what never trains in stage 1 (MLM head 622,651 incl.
    # its bias, itm_head 1,538), which our model does not build.
    total = sum(n for _, n in got.values())
    assert total == (171_360_062 - 622_651 - 1_538 if stage == 1 else 91_788_288)
    flat = {".".join(map(str, p)): v for p, v in labels.flat_state()}
    assert flat["qformer.query_tokens"] == "decay"
    assert flat["ln_vision.scale"] == flat["ln_vision.bias"] == "no_decay"
    assert flat["qformer.layers.3.cross_attn.key.kernel"] == "decay"
    assert flat["qformer.layers.3.query_ffn.norm.scale"] == "no_decay"
    if stage == 1:
        assert flat["temp"] == "no_decay"
        assert flat["qformer.embeddings.word_embeddings.embedding"] == "decay"
        assert flat["vision_proj.kernel"] == "decay" and flat["text_proj.bias"] == "no_decay"
    else:
        assert flat["opt_proj.kernel"] == "decay" and flat["opt_proj.bias"] == "no_decay"


def test_labels_accept_model_paths_unused_and_reject_unknown():
    cfg = bita.PRESETS["bita_stage1_test"]
    model = nnx.eval_shape(lambda: bita.BITAStage1(cfg, rngs=nnx.Rngs(0)))
    names = bita_conv.reference_names(cfg)
    trainable = nnx.state(model, model.trainable_filter())
    labels = optim.bita_labels(trainable, names, unused=("bridge.text_proj",))
    flat = {".".join(map(str, p)): v for p, v in labels.flat_state()}
    assert flat["bridge.qformer.query_tokens"] == "decay" and flat["bridge.temp"] == "no_decay"
    assert flat["bridge.text_proj.kernel"] == flat["bridge.text_proj.bias"] == "frozen"
    n_vit = len(nnx.state(model.visual_encoder, nnx.Param).flat_state())
    with pytest.raises(ValueError, match=rf"(?s){n_vit} parameters have no reference name.*visual_encoder\.blocks"):
        optim.bita_labels(nnx.state(model, nnx.Param), names)


# ----------------------------------------------------------------------------------------
# AdamW against torch
# ----------------------------------------------------------------------------------------
def test_adamw_matches_torch_adamw_with_the_schedule():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    init = {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32),
            "u": rng.standard_normal((2, 2)).astype(np.float32)}
    params = nnx.State({k: nnx.Param(jnp.asarray(v)) for k, v in init.items()})
    labels = nnx.State({"w": "decay", "b": "no_decay", "u": "frozen"})
    sched = optim.linear_warmup_cosine_lr(1e-2, 1e-3, 1e-4, 4, 3, 3)
    tx = optim.bita_optimizer(labels, sched, weight_decay=0.05)
    state = tx.init(params)

    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init.items()}
    topt = torch.optim.AdamW([{"params": [tp["w"]], "weight_decay": 0.05},
                              {"params": [tp["b"]], "weight_decay": 0.0}], lr=1.0, betas=(0.9, 0.999), eps=1e-8)
    for step in range(9):
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in init.items()}
        for g in topt.param_groups:  # LAVIS sets the lr before each step
            g["lr"] = float(sched(step))
        for k in ("w", "b"):
            tp[k].grad = torch.tensor(grads[k])
        topt.step()
        g_state = nnx.State({k: nnx.Param(jnp.asarray(v)) for k, v in grads.items()})
        updates, state = tx.update(g_state, state, params)
        params = optax.apply_updates(params, updates)
    for k in ("w", "b"):
        np.testing.assert_allclose(np.asarray(params[k][...]), tp[k].detach().numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(params["u"][...]), init["u"])
