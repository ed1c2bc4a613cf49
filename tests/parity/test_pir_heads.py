"""VIR and LCA heads against golden outputs of the reference `get_vision_fusion_embeds` /
`get_text_fusion_embeds` (tests/fixtures/pir/pir_heads_small.*: eval mode, embed_dim 64,
8 heads, filter 40, instru 2, cycle 3, stand-in encoder outputs, randomised LayerNorm affines).

The reference weights go through the `pir` converter's head table, so this also checks the
head key mapping (a swapped scale/bias or an untransposed kernel changes every output).
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rsvl_jax.convert import pir as pir_convert
from rsvl_jax.convert.core import convert
from rsvl_jax.models.pir import PIR, PIRConfig

TOL = 1e-5


@pytest.fixture(scope="module")
def golden(fixtures_dir):
    with np.load(fixtures_dir / "pir" / "pir_heads_small.npz") as z:
        data = dict(z)
    meta = json.loads((fixtures_dir / "pir" / "pir_heads_small.json").read_text())
    return data, meta


def _config(meta, **kw):
    c, w = meta["config"], meta["widths"]
    return PIRConfig(
        vision_width=w["vision"], text_width=w["text"], conv_width=w["conv"], embed_dim=c["embed_dim"],
        heads=c["head"], dropout=c["dropout_r"], filter_size=c["filter_size"], instru_num=c["instru_num"],
        cycle_num=c["cycle_num"], **kw,
    )


def _load(golden, **kw):
    data, meta = golden
    config = _config(meta, **kw)
    model = PIR(config, rngs=nnx.Rngs(0))
    tensors = {k[len("param."):]: v for k, v in data.items() if k.startswith("param.")}
    tensors.update(temp=np.float32(0.07), temp2=np.float32(0.07))  # not part of the heads fixture
    report = convert(model, tensors, pir_convert.head_table(config))
    assert report.converted == len(tensors)
    return model


@pytest.fixture(scope="module")
def heads(golden):
    return _load(golden)


@pytest.fixture(scope="module")
def image_out(golden, heads):
    data, _ = golden
    return heads.fuse_image(jnp.asarray(data["in.swin_out"]), jnp.asarray(data["in.conv_out"]))


@pytest.fixture(scope="module")
def text_out(golden, heads):
    data, _ = golden
    return heads.fuse_text(jnp.asarray(data["in.bert_out"]))


def test_image_embedding(golden, image_out):
    data, _ = golden
    emb, _ = image_out
    diff = np.abs(np.asarray(emb) - data["out.img_emb"]).max()
    assert diff <= TOL, diff


def test_belief_scores(golden, image_out):
    data, _ = golden
    _, inter = image_out
    diff = np.abs(np.asarray(inter["belief_scores"]) - data["out.belief_scores"]).max()
    assert diff <= TOL, diff


def test_token_order_and_selection(golden, image_out):
    data, meta = golden
    _, inter = image_out
    np.testing.assert_array_equal(np.asarray(inter["sorted_index"]), data["out.sorted_token_index"])
    f = meta["config"]["filter_size"]
    np.testing.assert_array_equal(np.asarray(inter["selected_index"]), data["out.sorted_token_index"][:, :f])
    assert inter["tokens"].shape == (meta["B"], f, meta["config"]["embed_dim"])


def test_text_embedding(golden, text_out):
    data, _ = golden
    emb, inter = text_out
    diff = np.abs(np.asarray(emb) - data["out.txt_emb"]).max()
    assert diff <= TOL, diff
    assert inter["tokens"].shape[:2] == data["in.bert_out"].shape[:2]


def test_sort_on_logits_same_order_without_ties(golden, heads):
    """The fix flag only changes the order where softmax values tie; here there are none."""
    data, _ = golden
    fixed = _load(golden, sort_on_logits=True)
    emb, inter = fixed.fuse_image(jnp.asarray(data["in.swin_out"]), jnp.asarray(data["in.conv_out"]))
    np.testing.assert_array_equal(np.asarray(inter["sorted_index"]), data["out.sorted_token_index"])
    assert np.abs(np.asarray(emb) - data["out.img_emb"]).max() <= TOL
