"""Export of a BITA model to the reference's `.pth` layout (spec §10) and back, at tiny size:
exactly the spec's key names and shapes (keys written from the spec in test_bita.spec_keys),
PyTorch layouts, and identical parameters after import (stage 1 and BITA-OPT). Also the
reference's extra `opt_model.lm_head.weight` (OPT's tied head, 225 tensors) on import."""
import jax
import numpy as np
import pytest
import torch
from flax import nnx

from rsvl_jax.convert import ConversionError, from_pytorch
from rsvl_jax.convert import bita as bita_conv
from rsvl_jax.convert import opt as opt_conv
from rsvl_jax.convert.core import export, module_variables
from rsvl_jax.models import bita

from .test_bita import OPTCFG, STAGE1, random_checkpoint, spec_keys


def randomise(module, seed):
    """Every parameter random (LayerNorm scales away from 1), so a swapped or untransposed
    tensor would show."""
    state = nnx.state(module, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(module, jax.tree.unflatten(tree, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))
    return module


def flat(module):
    return {k: np.asarray(v.get_value()) for k, v in module_variables(module).items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def vit_tensors(model):
    from rsvl_jax.convert import clip_vit
    return export(model.visual_encoder, clip_vit.table(model.config.vit, "lavis")[0])


def opt_file(model, tmp_path, name="opt.bin", edit=None):
    """The frozen OPT as an HF OPTForCausalLM state dict file (tied lm_head included)."""
    sd = export(model.opt_model, opt_conv.table(model.config.opt, "causal_lm")[0])
    sd["lm_head.weight"] = sd["model.decoder.embed_tokens.weight"]
    if edit:
        sd = edit(sd)
    path = tmp_path / name
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, path)
    return path


def test_stage1_export_then_import(tmp_path):
    bridge = randomise(bita.Stage1Bridge(STAGE1, rngs=nnx.Rngs(0)), 1)
    path = tmp_path / "checkpoint_4.pth"
    sd = bita_conv.save_bita_pth(bridge, path, epoch=4, config={"model": {"arch": "bita_former"}})
    want = spec_keys(STAGE1, "stage1")
    unbuilt = {k for k in want if k.startswith("Fformer.cls.") or k.startswith("itm_head.")}
    assert set(sd) == set(want) - unbuilt
    assert all(tuple(sd[k].shape) == want[k] for k in sd)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model", "optimizer", "config", "scaler", "epoch"} and raw["epoch"] == 4
    assert raw["model"]["Fformer.bert.embeddings.position_ids"].dtype == torch.int64
    assert raw["model"]["temp"].shape == ()
    # PyTorch layouts: Linear (out, in), LayerNorm weight = our scale.
    np.testing.assert_array_equal(raw["model"]["vision_proj.weight"].numpy(), np.asarray(bridge.vision_proj.kernel).T)
    np.testing.assert_array_equal(raw["model"]["Fformer.bert.encoder.layer.1.crossattention.self.key.weight"].numpy(),
                                  np.asarray(bridge.qformer.layers[1].cross_attn.key.kernel).T)
    assert_same(flat(from_pytorch("bita_stage1", str(path), STAGE1)), flat(bridge))

    # With the never-trained heads copied from the run's start: exactly the reference's 310-style set.
    start = random_checkpoint(STAGE1, "stage1", seed=3)
    full = bita_conv.bita_state_dict(bridge, heads_from=start)
    assert set(full) == set(want)
    c = "Fformer.cls.predictions."
    np.testing.assert_array_equal(full[c + "decoder.weight"], full["Fformer.bert.embeddings.word_embeddings.weight"])
    np.testing.assert_array_equal(full[c + "transform.dense.weight"], start[c + "transform.dense.weight"])
    np.testing.assert_array_equal(full["itm_head.weight"], start["itm_head.weight"])
    assert_same(flat(from_pytorch("bita_stage1", full, STAGE1)), flat(bridge))


@pytest.fixture(scope="module")
def opt_model():
    return randomise(bita.BITAOPT(OPTCFG, rngs=nnx.Rngs(0)), 2)


def test_opt_export_then_import(opt_model, tmp_path):
    path = tmp_path / "checkpoint_best.pth"
    sd = bita_conv.save_bita_pth(opt_model, path)
    want = spec_keys(OPTCFG, "opt")
    assert set(sd) == set(want) | {bita_conv.TIED_LM_HEAD}  # the reference writes 224 + 1
    assert all(tuple(sd[k].shape) == want[k] for k in want)
    np.testing.assert_array_equal(sd[bita_conv.TIED_LM_HEAD], np.asarray(opt_model.opt_model.embed_tokens.embedding))
    np.testing.assert_array_equal(sd["opt_proj.weight"], np.asarray(opt_model.bridge.opt_proj.kernel).T)

    # The bridge family reads it (the tied head dropped by its named rule) ...
    bridge, report = from_pytorch("bita_opt", str(path), OPTCFG, with_report=True)
    assert_same(flat(bridge), flat(opt_model.bridge))
    assert report.skipped == {"position_ids buffer": 1,
                              "opt_model.lm_head.weight (OPT's tied LM head, written by the reference's save)": 1}
    # ... and so does the whole-model loader, which checks the tied head against the OPT file.
    vit, opt_path = vit_tensors(opt_model), opt_file(opt_model, tmp_path)
    model, reports = bita_conv.load_bita_opt(str(path), vit, str(opt_path), OPTCFG, with_report=True)
    assert_same(flat(model), flat(opt_model))
    assert reports["bita"].converted == len(want) - 1 and sum(reports["bita"].skipped.values()) == 2

    # A checkpoint trained with another OPT: an error naming both files.
    def other(sd):
        sd = dict(sd)
        sd["model.decoder.embed_tokens.weight"] = sd["model.decoder.embed_tokens.weight"] + 1.0
        sd["lm_head.weight"] = sd["model.decoder.embed_tokens.weight"]
        return sd

    wrong = opt_file(opt_model, tmp_path, "other_opt.bin", other)
    with pytest.raises(ConversionError) as e:
        bita_conv.load_bita_opt(str(path), vit, str(wrong), OPTCFG)
    msg = str(e.value)
    assert str(path) in msg and str(wrong) in msg and "lm_head.weight" in msg and "embed_tokens" in msg
    with pytest.raises(ConversionError, match="pass opt_source"):
        bita_conv.load_bita_opt(str(path), vit, None, OPTCFG)


def test_opt_bridge_export_needs_the_tied_head(opt_model):
    with pytest.raises(ValueError, match="lm_head"):
        bita_conv.bita_state_dict(opt_model.bridge)
    emb = np.asarray(opt_model.opt_model.embed_tokens.embedding)
    sd = bita_conv.bita_state_dict(opt_model.bridge, lm_head=emb)
    assert_same(flat(from_pytorch("bita_opt", sd, OPTCFG)), flat(opt_model.bridge))
