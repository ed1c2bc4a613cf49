"""BITA models at tiny size: LM-target masking, what trains and what is frozen, dropout in the
frozen OPT, stage-1 ITC wiring, captioning (greedy vs an argmax loop, strings via a tiny local
GPT-2 BPE tokenizer) and the BITA tokenisation helpers."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rsvl_jax.convert import materialize_rngs
from rsvl_jax.data import bita_text
from rsvl_jax.decoding import GenerationConfig
from rsvl_jax.losses import bita_itc_loss, token_cross_entropy
from rsvl_jax.models import bita


def _one_layer(cfg, **opt):
    """The test presets cut to one layer per tower (compile time dominates these tests; the
    parity tests run the 2-layer presets)."""
    rep = dataclasses.replace
    return rep(cfg, vit=rep(cfg.vit, layers=1), qformer=rep(cfg.qformer, layers=1),
               opt=None if cfg.opt is None else rep(cfg.opt, layers=1, **opt))


# opt_test with room for the 300-token test tokenizer; one model serves most BITA-OPT tests.
OPTCFG = _one_layer(bita.PRESETS["bita_opt_test"], vocab_size=320)
STAGE1 = _one_layer(bita.PRESETS["bita_stage1_test"])
IDS = np.array([[2, 10, 11, 12, 13, 14], [2, 10, 11, 20, 1, 1]], np.int32)  # BOS ... ; row 1 right-padded
MASK = (IDS != 1).astype(np.int32)


def _images(seed=0, b=2):
    return jax.random.normal(jax.random.key(seed), (b, 16, 16, 3))


def _flat(state):
    return {".".join(map(str, p)): np.asarray(v.get_value() if hasattr(v, "get_value") else v)
            for p, v in state.flat_state()}


def build(cls, config, seed=0):
    """A tiny model with random weights, built abstractly and filled from numpy (eager init would
    compile one XLA program per initializer and shape, which dominates these tests' time)."""
    model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    for path, var in state.flat_state():
        shape = var.get_value().shape
        if path[-1] == "temp":
            value = np.full(shape, 0.07)
        elif path[-1] == "scale":
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        var.set_value(jnp.asarray(value, jnp.float32))
    nnx.update(model, state)
    materialize_rngs(model, seed)
    return model


def value_and_grads(model, loss):
    """(loss(model) -> (value, aux)), and its gradients w.r.t. every parameter, in one compiled program."""
    return nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)


@pytest.fixture(scope="module")
def opt_model():
    return build(bita.BITAOPT, OPTCFG)


# ----------------------------------------------------------------------------------------
# LM loss: targets and masking (§4.2).
# ----------------------------------------------------------------------------------------
def test_lm_targets():
    np.testing.assert_array_equal(  # empty prompt (stage 2): BOS is a target (Q18), pads are not
        bita.lm_targets(IDS, MASK, 0), [[2, 10, 11, 12, 13, 14], [2, 10, 11, 20, -100, -100]])
    np.testing.assert_array_equal(  # BOS + 2 prompt tokens are not targets either
        bita.lm_targets(IDS, MASK, 3), [[-100, -100, -100, 12, 13, 14], [-100, -100, -100, 20, -100, -100]])
    np.testing.assert_array_equal(  # pads found by mask too
        bita.lm_targets(np.where(MASK, IDS, 0), MASK, 0), [[2, 10, 11, 12, 13, 14], [2, 10, 11, 20, -100, -100]])


def test_lm_loss_masks_prefix_prompt_and_padding(opt_model):
    m, images = opt_model, _images()
    want = np.array([[-100, -100, -100, 12, 13, 14], [-100, -100, -100, 20, -100, -100]])

    @nnx.jit
    def run(m):
        loss, aux = m.lm_loss(images, IDS, MASK, prompt_length=3)
        # Hand-built: the whole sequence through OPT, -100 on the query columns, HF's shift.
        prefix = m.prefix_embeds(images)
        logits, _ = m.opt_model(inputs_embeds=jnp.concatenate([prefix, m.opt_model.embed(IDS)], 1),
                                attention_mask=jnp.concatenate([jnp.ones((2, prefix.shape[1]), jnp.int32), MASK], 1))
        return loss, aux, logits

    loss, aux, logits = run(m)
    nq = logits.shape[1] - IDS.shape[1]
    np.testing.assert_array_equal(aux["targets"], want)
    np.testing.assert_allclose(aux["logits"], logits[:, nq - 1:-1], atol=1e-6)
    labels = np.concatenate([np.full((2, nq), -100), want], 1)
    expected = token_cross_entropy(logits[:, :-1], jnp.asarray(labels[:, 1:]))
    assert abs(float(loss) - float(expected)) <= 1e-6
    # ... which is the mean NLL over exactly the unmasked text columns.
    logp = np.asarray(jax.nn.log_softmax(logits[:, nq - 1:-1], -1))
    nll = [-logp[b, t, want[b, t]] for b in range(2) for t in range(want.shape[1]) if want[b, t] != -100]
    assert len(nll) == 4 and abs(float(loss) - float(np.mean(nll))) <= 1e-5


def test_prompt_length_is_required_with_a_prompt():
    m = nnx.eval_shape(lambda: bita.BITAOPT(dataclasses.replace(OPTCFG, prompt="a photo of"), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="prompt_length"):
        m.lm_loss(_images(), IDS, MASK)


# ----------------------------------------------------------------------------------------
# Trainable vs frozen.
# ----------------------------------------------------------------------------------------
# Softmax ignores a bias added to every key, so the key bias has no gradient (in torch too).
NO_GRAD = ".cross_attn.key.bias"


def test_gradients_reach_only_trainable_parts_and_opt_dropout_is_live():
    # The Q-Former's dropout is off here, so the only randomness left in training mode is the
    # frozen OPT's dropout, which BITA keeps active (Q13).
    qf = dataclasses.replace(OPTCFG.qformer, hidden_dropout=0.0, attention_dropout=0.0)
    m = build(bita.BITAOPT, dataclasses.replace(OPTCFG, qformer=qf), seed=1)
    images = _images(1)
    params = nnx.state(m, nnx.Param)
    labels = _flat(m.trainable_labels(params))
    assert {k for k, v in labels.items() if v == "trainable"} == {k for k in labels if k.startswith("bridge.")}
    assert {k.split(".")[0] for k, v in labels.items() if v == "frozen"} == {"visual_encoder", "opt_model"}
    assert "bridge.qformer.query_tokens" in labels
    assert set(_flat(nnx.state(m, m.trainable_filter()))) == {k for k, v in labels.items() if v == "trainable"}

    def loss_fn(model):
        train, _ = model.lm_loss(images, IDS, MASK, deterministic=False)
        return train, model.lm_loss(images, IDS, MASK, deterministic=True)[0]

    (train, det), g_state = value_and_grads(m, loss_fn)
    assert abs(float(train) - float(det)) > 1e-4  # OPT dropout on in training
    grads = _flat(g_state)
    for k, g in grads.items():
        if k.startswith("visual_encoder."):
            assert not g.any(), k  # the frozen ViT's output is stop-gradient'ed
        elif labels[k] == "trainable" and not k.endswith(NO_GRAD):
            assert np.abs(g).max() > 1e-8, k  # Q-Former, query tokens, ln_vision, opt_proj
    # OPT is on the path to opt_proj, so it has gradients; the optimizer labels keep it frozen
    # (and a train step differentiating w.r.t. trainable_filter() never computes them).
    assert any(np.abs(grads[k]).max() > 0 for k in grads if k.startswith("opt_model."))
    tx = optax.multi_transform({"trainable": optax.sgd(0.1), "frozen": optax.set_to_zero()},
                               m.trainable_labels(params))
    updates, _ = tx.update(g_state, tx.init(params), params)
    new = _flat(optax.apply_updates(params, updates))
    old = _flat(params)
    for k in old:
        if labels[k] == "frozen":
            np.testing.assert_array_equal(new[k], old[k], err_msg=k)
        elif not k.endswith(NO_GRAD):
            assert np.abs(new[k] - old[k]).max() > 0, k


def test_stage1_itc_wiring_and_gradients():
    m = build(bita.BITAStage1, STAGE1, seed=3)
    images = _images(3, b=3)
    ids = np.array([[1, 5, 6, 7, 3, 0, 0, 0, 0, 0, 0, 0]] * 3, np.int32)
    ids[1, 2], ids[2, 3] = 9, 11
    mask = (ids != 0).astype(np.int32)
    (loss, aux), g_state = value_and_grads(m, lambda model: model.itc_loss(images, ids, mask, deterministic=False))
    img, txt = aux["image_feats"], aux["text_feat"]
    assert img.shape == (3, STAGE1.qformer.num_query_tokens, STAGE1.embed_dim) and txt.shape == (3, STAGE1.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=-1), 1.0, rtol=1e-5)
    assert abs(float(loss) - float(bita_itc_loss(img, txt, 0.07))) <= 1e-6
    assert aux["sim_i2t"].shape == (3, 3)
    grads = _flat(g_state)
    labels = _flat(m.trainable_labels(nnx.state(m, nnx.Param)))
    for k, g in grads.items():
        if k.startswith("visual_encoder."):
            assert labels[k] == "frozen" and not g.any(), k
        else:
            assert labels[k] == "trainable", k
            assert k.endswith(NO_GRAD) or np.abs(g).max() > 1e-8, k  # text side, queries, projections, temp
    word = "bridge.qformer.embeddings.word_embeddings.embedding"
    assert np.abs(grads[word][0]).max() > 0  # the Fourier mixing lets [PAD] rows get gradient ...
    zeroed = _flat(bita.zero_pad_row_grad(g_state))
    assert not zeroed[word][0].any() and np.abs(zeroed[word][1:]).max() > 0  # ... unless masked, as torch


def test_temperature_clamp_is_opt_in():
    m = build(bita.Stage1Bridge, dataclasses.replace(STAGE1, temp_clamp=(0.1, 0.5)))
    assert float(m.temperature()) == pytest.approx(0.1)
    assert float(build(bita.Stage1Bridge, STAGE1).temperature()) == pytest.approx(0.07)
    fresh = nnx.eval_shape(lambda: bita.Stage1Bridge(STAGE1, rngs=nnx.Rngs(0)))
    assert fresh.temp.get_value().shape == ()


# ----------------------------------------------------------------------------------------
# Tokenisation helpers and generation with a tiny local GPT-2 BPE tokenizer.
# ----------------------------------------------------------------------------------------
CORPUS = ["there is a building near the road", "many green trees are around a playground",
          "a photo of an airport with planes", "some cars are parked in the parking lot"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A byte-level BPE in the OPT layout (<s>=0, <pad>=1, </s>=2, <unk>=3), trained offline."""
    from tokenizers import ByteLevelBPETokenizer

    d = tmp_path_factory.mktemp("opt_tok")
    t = ByteLevelBPETokenizer()
    t.train_from_iterator(CORPUS * 5, vocab_size=300, min_frequency=1, show_progress=False,
                          special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    t.save_model(str(d))  # vocab.json + merges.txt
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>",
         "pad_token": "<pad>"}))
    return bita_text.load_opt_tokenizer(d)


def test_opt_encoding_helpers(tokenizer):
    tok = tokenizer
    eos = bita_text.opt_eos_id(tok)
    assert tok.convert_ids_to_tokens(eos) == "Ċ"
    ids, mask = bita_text.encode_opt_captions(tok, ["there is a road", "a"])
    assert ids.dtype == np.int32 and (ids[:, 0] == 2).all()
    n0 = int(mask[0].sum())
    assert ids[0, n0 - 1] == eos and int(mask[1].sum()) == 3 and list(ids[1, 1:]) == [ids[1, 1], eos] + [1] * (
        ids.shape[1] - 3)
    long_ids, long_mask = bita_text.encode_opt_captions(tok, [" ".join(CORPUS)], max_len=8)
    assert long_ids.shape == (1, 8) and eos not in long_ids  # truncation counts BOS and drops "\n" (Q17)
    assert bita_text.opt_prompt_length(tok, "") == 0
    plen = bita_text.opt_prompt_length(tok, "a photo of")
    prompt_ids, _ = bita_text.encode_opt(tok, ["a photo of"])
    assert plen == prompt_ids.shape[1]
    fixed, _ = bita_text.encode_opt_captions(tok, ["there is a road"], prompt="a photo of")
    np.testing.assert_array_equal(fixed[0, :plen], prompt_ids[0])
    assert bita_text.decode_captions(tok, np.array([[ids[0, 1], ids[0, 2], eos, 1]]), [3]) == [
        tok.decode([ids[0, 1], ids[0, 2]]).strip()]


def test_stage1_bert_encoding(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "there", "is", "a", "road", "green", "tree", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = bita_text.load_bita_bert_tokenizer(tmp_path)
    assert tok.token_to_id("[DEC]") == len(vocab)  # BITA's bos, the next id (30522 for bert-base)
    ids, mask = bita_text.encode_stage1(["There is a road", "green trees " * 10], tok, max_len=8)
    assert ids.shape == (2, 8)
    assert list(ids[0]) == [2, 5, 6, 7, 8, 3, 0, 0] and list(mask[0]) == [1] * 6 + [0] * 2
    assert list(ids[1]) == [2, 9, 10, 11, 9, 10, 11, 3] and mask[1].all()  # [SEP] kept on truncation


def _argmax_loop(m, images, prompt_ids, steps, eos):
    """Greedy decoding the slow way: no cache, the whole sequence through OPT at every step. The
    sequence has a fixed length (slots not generated yet hold zeros, which the causal mask
    hides from the position being read), so every step reuses the same compiled ops."""
    opt = m.opt_model
    prompt = opt.embed(jnp.broadcast_to(prompt_ids, (2, len(prompt_ids))))
    prefix = jnp.concatenate([m.prefix_embeds(images), prompt], 1)
    p = prefix.shape[1]
    seq = jnp.concatenate([prefix, jnp.zeros((2, steps, prefix.shape[2]), prefix.dtype)], 1)
    tokens, done = np.ones((2, steps), np.int32), np.zeros(2, bool)
    for t in range(steps):
        logits, _ = opt(inputs_embeds=seq)
        nxt = np.asarray(jnp.argmax(logits[:, p - 1 + t], -1))
        tokens[:, t] = np.where(done, 1, nxt)
        done |= nxt == eos
        seq = seq.at[:, p + t].set(opt.embed(jnp.asarray(nxt)))
    return tokens


def test_greedy_generate_equals_argmax_loop(opt_model, tokenizer):
    m, images, eos = opt_model, _images(5), bita_text.opt_eos_id(tokenizer)
    prompt = "a photo of"
    prompt_ids = jnp.asarray(bita_text.encode_opt(tokenizer, [prompt])[0][0])
    cfg = GenerationConfig(method="greedy", max_new_tokens=6, eos_token_ids=(eos,), pad_token_id=1)
    out = m.generate_ids(images, prompt_ids, config=cfg)
    want = _argmax_loop(m, images, prompt_ids, 6, eos)
    np.testing.assert_array_equal(out.tokens, want)
    texts = bita_text.generate_captions(m, images, tokenizer=tokenizer, prompt=prompt, config=cfg)
    assert texts == [tokenizer.decode([t for t in row if t != 1], skip_special_tokens=True).strip() for row in want]
    assert all(isinstance(t, str) and t == t.strip() for t in texts)


def test_default_generate_is_bita_beam_search(opt_model, tokenizer):
    texts = bita_text.generate_captions(opt_model, _images(6), tokenizer=tokenizer)
    assert len(texts) == 2 and all(isinstance(t, str) and "\n" not in t and t == t.strip() for t in texts)
