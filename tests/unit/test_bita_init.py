"""Where stage 1 starts: the IFT from BERT-base (§2.8, the reference) or, on request, a BLIP-2
warm start (§10.4, a labelled deviation); what is copied, what keeps its init."""
import re

import numpy as np
import pytest
from flax import nnx

from rsvl_jax.convert import ConversionError
from rsvl_jax.convert import bita as bita_convert
from rsvl_jax.models import bita


def _bridge(seed):
    return bita.Stage1Bridge(bita.PRESETS["bita_stage1_test"], rngs=nnx.Rngs(seed))


def _flat(bridge):
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.state(bridge, nnx.Param).flat_state()}


def _bert_state(cfg, rng):
    q = cfg.qformer
    sd = {"bert.embeddings.word_embeddings.weight": rng.normal(size=(q.vocab_size - 1, q.hidden)),
          "bert.embeddings.position_embeddings.weight": rng.normal(size=(q.max_position_embeddings, q.hidden)),
          "bert.embeddings.LayerNorm.weight": rng.normal(size=q.hidden),
          "bert.embeddings.LayerNorm.bias": rng.normal(size=q.hidden),
          "bert.embeddings.token_type_embeddings.weight": rng.normal(size=(2, q.hidden))}
    for layer in range(q.layers):
        p = f"bert.encoder.layer.{layer}."
        sd[p + "intermediate.dense.weight"] = rng.normal(size=(q.intermediate, q.hidden))
        sd[p + "intermediate.dense.bias"] = rng.normal(size=q.intermediate)
        sd[p + "output.dense.weight"] = rng.normal(size=(q.hidden, q.intermediate))
        sd[p + "output.dense.bias"] = rng.normal(size=q.hidden)
        sd[p + "output.LayerNorm.weight"] = rng.normal(size=q.hidden)
        sd[p + "output.LayerNorm.bias"] = rng.normal(size=q.hidden)
        sd[p + "attention.self.query.weight"] = rng.normal(size=(q.hidden, q.hidden))  # unused by the IFT
    return {k: v.astype(np.float32) for k, v in sd.items()}


def test_stage1_from_bert_copies_embeddings_and_both_ffns():
    bridge = _bridge(0)
    before = _flat(bridge)
    sd = _bert_state(bridge.config, np.random.default_rng(0))
    line = bita_convert.init_stage1_from_bert(bridge, sd)
    assert "BERT" in line
    after = _flat(bridge)
    exported = bita_convert.bita_state_dict(bridge)
    words = exported["Fformer.bert.embeddings.word_embeddings.weight"]
    np.testing.assert_array_equal(words[:-1], sd["bert.embeddings.word_embeddings.weight"])
    np.testing.assert_array_equal(words[-1], before_row := _row(before, -1))  # [DEC] keeps its init
    assert before_row.shape == (bridge.config.qformer.hidden,)
    for layer in range(bridge.config.qformer.layers):
        for twin in ("intermediate", "intermediate_query"):
            np.testing.assert_array_equal(exported[f"Fformer.bert.encoder.layer.{layer}.{twin}.dense.weight"],
                                          sd[f"bert.encoder.layer.{layer}.intermediate.dense.weight"])
        for twin in ("output", "output_query"):
            np.testing.assert_array_equal(exported[f"Fformer.bert.encoder.layer.{layer}.{twin}.LayerNorm.bias"],
                                          sd[f"bert.encoder.layer.{layer}.output.LayerNorm.bias"])
    # Not in BERT: cross-attention, the Fourier LayerNorms, queries, projections, temp keep their init.
    kept = [k for k in before if re.search(r"cross|fourier|query_tokens|proj|temp", k)]
    assert kept and all(np.array_equal(before[k], after[k]) for k in kept)


def _row(flat, i):
    table = next(v for k, v in flat.items() if k.endswith("word_embeddings.embedding"))
    return table[i]


def test_bert_init_rejects_a_file_without_bert_weights():
    with pytest.raises(ConversionError, match="BERT tensors"):
        bita_convert.init_stage1_from_bert(_bridge(0), {"something.else": np.zeros(3, np.float32)})


def test_blip2_warm_start_maps_qformer_and_keeps_what_blip2_lacks():
    source = _bridge(1)
    sd = {("Qformer." + k[len("Fformer."):] if k.startswith("Fformer.") else k): v
          for k, v in bita_convert.bita_state_dict(source).items()}
    # BLIP-2 has cross-attention only in even layers and no Fourier LayerNorms.
    sd = {k: v for k, v in sd.items()
          if not re.search(r"layer\.\d*[13579]\.crossattention|fourier", k)}
    target = _bridge(2)
    before = _flat(target)
    line = bita_convert.warm_start_from_blip2(target, sd)
    assert "deviation" in line
    got, want = _flat(target), _flat(source)
    for k in got:
        odd_cross = re.search(r"layers\.\d*[13579]\.cross", k)
        if odd_cross or "fourier" in k:
            np.testing.assert_array_equal(got[k], before[k], err_msg=k)
        else:
            np.testing.assert_allclose(got[k], want[k], err_msg=k)
