"""Sharded encoders on 8 simulated CPU devices: a converted Swin and BERT with parameters sharded
over `fsdp=4, tensor=2` give the single-device outputs, and a converted (BERT) checkpoint saved
on one mesh restores onto another mesh (and onto one device) with that mesh's shardings and
bitwise the same parameters and outputs.

The models are converted from tiny random `transformers` models (so this also covers the
converter -> sharding -> checkpoint path end to end); their sizes are chosen so that `embed`
divides by 4 and `mlp`/`heads`/`vocab` by 2, otherwise the rules would just replicate.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rsvl_jax import checkpoint
from rsvl_jax import parallel as par
from rsvl_jax.convert import from_pytorch
from rsvl_jax.models.bert import Bert, BertConfig
from rsvl_jax.models.swin import PRESETS as SWIN_PRESETS
from rsvl_jax.models.swin import stage_window

from ..torch_models import hf_bert, hf_swin

TOL = 1e-5
BATCH = 4  # divides data*fsdp on every mesh below, so inputs are batch-sharded too

# The swin_test geometry (8x8 tokens, shifted 4x4 windows, a merge, then one 4x4 window) with one
# block in the last stage, which halves compilation. embed 16 (fsdp 4 | 16), heads 2 and 4,
# qkv 48, mlp 64, merge 64 -> 32: everything divides.
SWIN_CFG = dataclasses.replace(SWIN_PRESETS["swin_test"], depths=(2, 1))
# The bert_test preset has intermediate 37 and vocab 99 (not divisible by tensor=2): a custom one.
BERT_CFG = BertConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                      max_position_embeddings=32, type_vocab_size=2)


# ----------------------------------------------------------------------------------------
# Tiny random HF models -> our converted models.
# ----------------------------------------------------------------------------------------
def _inputs(kind: str):
    rs = np.random.RandomState(1)
    if kind == "swin":
        return (rs.randn(BATCH, SWIN_CFG.image_size, SWIN_CFG.image_size, SWIN_CFG.in_chans).astype(np.float32),)
    ids = rs.randint(1, BERT_CFG.vocab_size, (BATCH, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0  # right padding, so the masked path runs under sharding too
    mask[3, 5:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def models():
    """kind -> (graphdef, converted params (unsharded), rest of the state)."""
    out = {}
    for kind, hf, cfg in (("swin", hf_swin(SWIN_CFG), SWIN_CFG), ("bert", hf_bert(BERT_CFG), BERT_CFG)):
        sd = {k: v.detach().clone().numpy() for k, v in hf.state_dict().items()}
        out[kind] = nnx.split(from_pytorch(kind, sd, cfg), nnx.Param, ...)
    return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def forward(kind, graphdef, params, rest, inputs):
    """The functional forward: one jitted function of the state (graphdef and kind static)."""
    model = nnx.merge(graphdef, params, rest)
    if kind == "swin":
        return model(*inputs)[0]  # (B, 1 + N, C): mean token + final-normalised tokens
    ids, mask = inputs
    return model(ids, mask)


def place(tree, mesh, rules=None):
    """`tree` (an nnx.State) on `mesh` with the logical-axis rules."""
    return par.shard_state(tree, par.shardings_for_tree(tree, mesh, rules))


def run_on(mesh, kind, graphdef, params, rest, inputs):
    """Forward on `mesh`: params as given (already placed), rest replicated, batch sharded."""
    rest = place(rest, mesh)
    inputs = tuple(jax.device_put(x, par.batch_sharding(mesh)) for x in inputs)
    with jax.set_mesh(mesh):
        return np.asarray(forward(kind, graphdef, params, rest, inputs))


@pytest.fixture(scope="module")
def reference(models):
    """Single-device outputs (no mesh set, so every `constrain` is a no-op)."""
    out = {}
    for kind, (graphdef, params, rest) in models.items():
        inputs = tuple(jnp.asarray(x) for x in _inputs(kind))
        out[kind] = np.asarray(forward(kind, graphdef, params, rest, inputs))
    return out


@pytest.fixture(scope="module")
def mesh_a():
    return par.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})


@pytest.fixture(scope="module")
def mesh_b():
    return par.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.fixture(scope="module")
def mesh_one():
    return par.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def flat(state) -> dict[str, jax.Array]:
    return {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(state)}


# ----------------------------------------------------------------------------------------
# Sharded forward == single-device forward.
# ----------------------------------------------------------------------------------------
# (variable, full shape, spec on fsdp=4 x tensor=2, addressable shard shape)
EXPECTED = {
    "swin": [
        ("layers.0.blocks.0.mlp.fc1.kernel", (16, 64), P("fsdp", "tensor"), (4, 32)),
        ("layers.0.blocks.1.attn.qkv.kernel", (16, 48), P("fsdp", "tensor"), (4, 24)),
        ("layers.1.blocks.0.attn.proj.kernel", (32, 32), P("tensor", "fsdp"), (16, 8)),
        ("layers.0.downsample.reduction.kernel", (64, 32), P("tensor", "fsdp"), (32, 8)),
        ("patch_embed.proj.kernel", (4, 4, 3, 16), P(None, None, None, "fsdp"), (4, 4, 3, 4)),
    ],
    "bert": [
        ("embeddings.word.embedding", (96, 32), P("tensor", "fsdp"), (48, 8)),
        ("layers.0.attn.query.kernel", (32, 32), P("fsdp", "tensor"), (8, 16)),
        ("layers.1.mlp_out.kernel", (64, 32), P("tensor", "fsdp"), (32, 8)),
        ("layers.1.mlp_in.bias", (64,), P("tensor"), (32,)),
    ],
}


@pytest.mark.parametrize("kind", ["swin", "bert"])
def test_sharded_forward_matches_single_device(kind, models, reference, mesh_a):
    if kind == "swin":  # the shifted-window path (roll + mask) runs under sharding too
        assert stage_window(SWIN_CFG, 0) == (4, 2) and stage_window(SWIN_CFG, 1) == (4, 0)
    graphdef, params, rest = models[kind]
    sharded = place(params, mesh_a)
    values = flat(sharded)

    # The parameters really are split across devices, not replicated.
    for name, shape, spec, shard in EXPECTED[kind]:
        v = values[name]
        assert v.shape == shape and v.sharding.spec == spec, (name, v.sharding.spec)
        assert v.addressable_shards[0].data.shape == shard, name
        assert len(v.sharding.device_set) == 8
    n_split = sum(any(e is not None for e in v.sharding.spec) for v in values.values())
    print(f"{kind}: {n_split}/{len(values)} parameters sharded on fsdp=4 x tensor=2")
    assert n_split >= len(values) // 2

    out = run_on(mesh_a, kind, graphdef, sharded, rest, _inputs(kind))
    diff = np.abs(out - reference[kind]).max()
    print(f"{kind}: max |sharded - single device| = {diff:.2e}")
    assert out.shape == reference[kind].shape and diff <= TOL


def test_other_rules_same_output(models, reference, mesh_a):
    """The layout is a config choice: swapping which mesh axis carries embed and mlp/heads (for
    params via `shardings_for_tree`, for activations via `axis_rules`) changes the placement,
    not the numbers."""
    rules = (("batch", "fsdp"), ("embed", "tensor"), ("mlp", "fsdp"), ("heads", "fsdp"), ("vocab", "fsdp"))
    graphdef, params, rest = models["bert"]
    sharded = place(params, mesh_a, rules)
    assert flat(sharded)["layers.1.mlp_out.kernel"].sharding.spec == P("fsdp", "tensor")
    with par.axis_rules(rules):
        out = run_on(mesh_a, "bert", graphdef, sharded, rest, _inputs("bert"))
    assert np.abs(out - reference["bert"]).max() <= TOL


# ----------------------------------------------------------------------------------------
# A converted checkpoint saved on mesh A restores onto mesh B / one device.
# ----------------------------------------------------------------------------------------
# BERT only: a Swin round trip goes through the same checkpoint code and would add ~10 s of
# compilation. The probe's addressable shard shape on each target mesh (full shape (64, 32)):
PROBE = "layers.1.mlp_out.kernel"
PROBE_SHARD = {"mesh_b": (32, 16), "mesh_one": (64, 32)}


@pytest.fixture(scope="module")
def saved(models, mesh_a, tmp_path_factory):
    """A checkpoint of the converted BERT params, saved while sharded on mesh A."""
    path = tmp_path_factory.mktemp("ckpt") / "bert"
    sharded = place(models["bert"][1], mesh_a)
    assert flat(sharded)[PROBE].sharding.mesh.shape == mesh_a.shape
    checkpoint.save_params(path, sharded, metadata={"family": "bert", "preset": "tiny"})
    return path


@pytest.mark.parametrize("target_mesh", ["mesh_b", "mesh_one"])
def test_checkpoint_restores_onto_another_mesh(target_mesh, saved, models, reference, request):
    mesh = request.getfixturevalue(target_mesh)
    graphdef, params, rest = models["bert"]
    # What a run on the new mesh does: abstract params (nothing allocated) with its shardings.
    abstract = nnx.eval_shape(lambda: nnx.state(Bert(BERT_CFG, rngs=nnx.Rngs(0)), nnx.Param))
    shardings = par.shardings_for_tree(abstract, mesh)
    restored = checkpoint.restore_params(saved, par.abstract_with_shardings(abstract, shardings))

    got, want, wanted_shardings = flat(restored), flat(params), flat(shardings)
    assert got.keys() == want.keys()
    for name, value in got.items():
        assert value.sharding == wanted_shardings[name], name
        assert value.sharding.mesh.shape == mesh.shape
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want[name]), err_msg=name)
    assert got[PROBE].addressable_shards[0].data.shape == PROBE_SHARD[target_mesh]
    assert checkpoint.read_metadata(saved)["family"] == "bert"

    inputs = _inputs("bert")
    out = run_on(mesh, "bert", graphdef, restored, rest, inputs)
    # Same mesh, same shardings, bitwise-same params: the outputs must be bitwise identical.
    original = run_on(mesh, "bert", graphdef, place(params, mesh), rest, inputs)
    np.testing.assert_array_equal(out, original)
    assert np.abs(out - reference["bert"]).max() <= TOL
    if mesh.size == 1:  # one device computes exactly what the unsharded forward does
        np.testing.assert_array_equal(out, reference["bert"])
