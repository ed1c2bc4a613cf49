"""OPT parity with HF `OPTForCausalLM` (eager attention, eval mode) at tiny random configs."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from rsvl_jax.convert import ConversionError, from_pytorch
from rsvl_jax.convert import opt as opt_convert
from rsvl_jax.models import opt as opt_lib

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hf_config(**kw):
    base = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
                max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                dropout=0.1, attention_dropout=0.1)
    base.update(kw)
    return transformers.OPTConfig(**base, attn_implementation="eager")


def randomise(model, seed):
    """Non-trivial LayerNorm affines and biases, so scale/bias mix-ups show up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def build_pair(seed=0, **kw):
    torch.manual_seed(seed)
    hf = randomise(transformers.OPTForCausalLM(hf_config(**kw)), seed).eval()
    cfg = opt_lib.OPTConfig.from_hf_config_dict(hf.config.to_dict())
    ours = from_pytorch("opt", hf.state_dict(), cfg)
    return hf, ours


@pytest.fixture(scope="module")
def pair():
    return build_pair(0)


def hf_logits(hf, **kw):
    with torch.no_grad():
        kw = {k: torch.as_tensor(np.asarray(v)) for k, v in kw.items()}
        return hf(**kw).logits.numpy()


def masks(b, length, pads, left):
    m = np.ones((b, length), np.int64)
    for i, p in enumerate(pads):
        if p:
            if left:
                m[i, :p] = 0
            else:
                m[i, length - p:] = 0
    return m


def test_config_from_hf_and_presets():
    cfg = opt_lib.OPTConfig.from_hf_config_dict(transformers.OPTConfig().to_dict())  # HF default = opt-125m
    assert cfg == opt_lib.PRESETS["opt_125m"]
    d350 = dict(transformers.OPTConfig().to_dict(), hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                ffn_dim=4096, word_embed_proj_dim=512, do_layer_norm_before=False)
    assert opt_lib.OPTConfig.from_hf_config_dict(d350) == opt_lib.PRESETS["opt_350m"]
    big = opt_lib.PRESETS["opt_2_7b"]
    assert (big.hidden, big.layers, big.heads, big.ffn_dim, big.vocab_size, big.max_positions) == (
        2560, 32, 32, 10240, 50272, 2048)
    assert not big.has_projection and big.has_final_layer_norm


@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_logits_with_padding(pair, left):
    hf, ours = pair
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 96, (3, 11))
    mask = masks(3, 11, [0, 3, 6], left)
    ids = np.where(mask == 1, ids, 1)
    want = hf_logits(hf, input_ids=ids, attention_mask=mask)
    got, cache = ours(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert cache is None
    valid = mask.astype(bool)
    diff = np.abs(np.asarray(got) - want)[valid].max()
    assert diff <= TOL, diff


def test_inputs_embeds_with_prefix(pair):
    """BITA's prefix LM: prefix embeddings (left-padded) + prompt token embeddings."""
    hf, ours = pair
    rng = np.random.default_rng(2)
    prefix = rng.normal(size=(2, 5, 32)).astype(np.float32)
    ids = rng.integers(3, 96, (2, 4))
    embeds = np.concatenate([prefix, np.asarray(opt_lib.embed_tokens(ours, jnp.asarray(ids)))], axis=1)
    with torch.no_grad():
        ref_embeds = hf.get_input_embeddings()(torch.as_tensor(ids)).numpy()
    np.testing.assert_allclose(embeds[:, 5:], ref_embeds, atol=0)
    mask = np.concatenate([masks(2, 5, [0, 2], left=True), np.ones((2, 4), np.int64)], axis=1)
    want = hf_logits(hf, inputs_embeds=embeds, attention_mask=mask)
    got, _ = ours(inputs_embeds=jnp.asarray(embeds), attention_mask=jnp.asarray(mask))
    diff = np.abs(np.asarray(got) - want)[mask.astype(bool)].max()
    assert diff <= TOL, diff


def test_cache_prefill_then_steps_matches_full_forward(pair):
    """Prefill [0, 6) then one token at a time through a jitted step; equals the full pass."""
    _, ours = pair
    rng = np.random.default_rng(3)
    b, length, pre = 3, 10, 6
    embeds = rng.normal(size=(b, length, 32)).astype(np.float32)
    mask = masks(b, length, [0, 2, 4], left=True)  # pads inside the prefill only
    full, _ = ours(inputs_embeds=jnp.asarray(embeds), attention_mask=jnp.asarray(mask))

    graphdef, state = nnx.split(ours)

    @jax.jit
    def step(state, x, m, cache):
        model = nnx.merge(graphdef, state)
        return model(inputs_embeds=x, attention_mask=m, cache=cache)

    cache = ours.init_cache(b, length + 2)  # spare slots stay masked
    logits, cache = step(state, embeds[:, :pre], mask[:, :pre], cache)
    outs = [logits]
    for t in range(pre, length):
        logits, cache = step(state, embeds[:, t:t + 1], mask[:, t:t + 1], cache)
        outs.append(logits)
    assert int(cache.index) == length
    got = np.concatenate([np.asarray(o) for o in outs], axis=1)
    valid = mask.astype(bool)
    diff = np.abs(got - np.asarray(full))[valid].max()
    assert diff <= TOL, diff


def test_forked_cache_shares_the_prefix(pair):
    """Beam layout: prefill once per entry, fork 2 continuations with different tokens, reorder
    them; each equals the full forward of prefix + its own tokens."""
    _, ours = pair
    rng = np.random.default_rng(5)
    b, p, n = 2, 5, 3
    prefix = rng.normal(size=(b, p, 32)).astype(np.float32)
    pmask = masks(b, p, [0, 2], left=True)
    toks = rng.integers(3, 96, (b, 2, n))
    cache = ours.init_cache(b, p)
    _, cache = ours(inputs_embeds=jnp.asarray(prefix), attention_mask=jnp.asarray(pmask), cache=cache)
    cache = cache.fork(2, n + 1).take(jnp.array([1, 0, 2, 3]))  # a reorder within each entry
    got = []
    for t in range(n):
        logits, cache = ours(input_ids=jnp.asarray(toks[:, ::-1, t].reshape(-1, 1)), cache=cache)
        got.append(np.asarray(logits)[:, 0])
    got = np.stack(got, axis=1).reshape(b, 2, n, -1)[:, ::-1]
    for j in range(2):
        embeds = np.concatenate([prefix, np.asarray(opt_lib.embed_tokens(ours, jnp.asarray(toks[:, j])))], axis=1)
        full, _ = ours(inputs_embeds=jnp.asarray(embeds), attention_mask=jnp.asarray(
            np.concatenate([pmask, np.ones((b, n), np.int64)], axis=1)))
        diff = np.abs(got[:, j] - np.asarray(full)[:, p:]).max()
        assert diff <= TOL, diff


def test_project_in_out_post_ln():
    """OPT-350m style: 16-wide embeddings with project_in/out, post-LN blocks, no final LN."""
    hf, ours = build_pair(4, word_embed_proj_dim=16, do_layer_norm_before=False)
    assert ours.config.has_projection and not ours.config.has_final_layer_norm
    rng = np.random.default_rng(4)
    ids = rng.integers(3, 96, (2, 9))
    mask = masks(2, 9, [0, 3], left=False)
    want = hf_logits(hf, input_ids=ids, attention_mask=mask)
    got, _ = ours(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    diff = np.abs(np.asarray(got) - want)[mask.astype(bool)].max()
    assert diff <= TOL, diff


def test_dropout_is_active_in_training(pair):
    # Built concretely: `from_pytorch` builds abstractly, which leaves the dropout rng abstract.
    ours = opt_lib.OPT(pair[1].config, rngs=nnx.Rngs(0))
    ids = jnp.arange(3, 11)[None]
    eval_out, _ = ours(input_ids=ids)
    train_out, _ = ours(input_ids=ids, deterministic=False)
    assert not np.allclose(np.asarray(eval_out), np.asarray(train_out))


# ----------------------------------------------------------------------------------------
# Converter
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tensors(pair):
    return {k: v.numpy() for k, v in pair[0].state_dict().items()}


def params_of(model):
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.state(model, nnx.Param).flat_state()}


def test_layouts_give_identical_parameters(pair, tensors):
    cfg = pair[1].config
    ref = params_of(pair[1])
    opt_model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}  # OPTModel keys
    for source in (opt_model, {**opt_model, "lm_head.weight": tensors["lm_head.weight"]}):
        got = params_of(from_pytorch("opt", source, cfg))
        assert got.keys() == ref.keys()
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k])


def test_from_hf_dir(pair, tmp_path):
    hf, ours = pair
    hf.save_pretrained(tmp_path)
    cfg, model = opt_convert.from_hf_dir(tmp_path)
    assert cfg == ours.config
    ref = params_of(ours)
    for k, v in params_of(model).items():
        np.testing.assert_array_equal(v, ref[k])


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda t: t.pop("model.decoder.layers.1.fc2.bias"), "model.decoder.layers.1.fc2.bias"),
        (lambda t: t.__setitem__("model.decoder.layers.0.extra.weight", np.zeros(3)), "model.decoder.layers.0.extra.weight"),
        (lambda t: t.__setitem__("model.decoder.layers.0.fc1.weight", np.zeros((48, 31))), "layers.0.fc1.kernel"),
        (lambda t: t.__setitem__("model.decoder.layers.0.self_attn.qq_proj.weight",
                                 t.pop("model.decoder.layers.0.self_attn.q_proj.weight")),
         "model.decoder.layers.0.self_attn.q_proj.weight"),
    ],
    ids=["missing", "unexpected", "wrong_shape", "renamed"],
)
def test_converter_errors_name_the_key(pair, tensors, edit, needle):
    bad = dict(tensors)
    edit(bad)
    with pytest.raises(ConversionError, match=needle.replace(".", r"\.")):
        from_pytorch("opt", bad, pair[1].config)


def test_untied_head_and_foreign_checkpoint_are_rejected(pair, tensors):
    bad = dict(tensors, **{"lm_head.weight": tensors["lm_head.weight"] + 1.0})
    with pytest.raises(ConversionError, match="lm_head"):
        from_pytorch("opt", bad, pair[1].config)
    with pytest.raises(ConversionError, match="not an OPT checkpoint"):
        from_pytorch("opt", {"encoder.weight": np.zeros(2)}, pair[1].config)
    wrong_cfg = dataclasses.replace(pair[1].config, layers=3)
    with pytest.raises(ConversionError, match="layers.2"):
        from_pytorch("opt", tensors, wrong_cfg)
