"""BERT encoder (PIR's text encoder): post-LN layers, exact GELU, no pooler.

PIR uses an old pytorch-pretrained-BERT style `BertModel` that returns only the last layer's
hidden states (B, L, H) and is called without an attention mask (spec §2.4, quirk Q5). The
mask path is still here, with Hugging Face semantics (masked keys get a large negative logit),
so the same module serves masked uses and the parity tests against `transformers.BertModel`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from rsvl_jax.models import layers


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    # True: PyTorch default init, as the reference's BertModel gets when the checkpoint load
    # matches nothing (spec §2.11, Q2): Linear U(+-1/sqrt(fan_in)) for weights and biases,
    # Embedding N(0, 1). False: BERT's own N(0, 0.02) / zero-bias init.
    reference_init: bool = True
    dtype: Any = jnp.float32  # compute dtype; parameters, softmax and LayerNorms stay float32
    remat: bool = False  # recompute each layer's activations in the backward pass (memory for FLOPs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_config_dict(cls, d: Mapping[str, Any], **overrides) -> "BertConfig":
        """A config from a Hugging Face `config.json` dict (only what our module can run)."""
        act = d.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"hidden_act={act!r}: this BERT implements exact (erf) GELU only")
        pos = d.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(f"position_embedding_type={pos!r}: only absolute positions are implemented")
        kwargs = dict(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            intermediate_size=d["intermediate_size"],
            max_position_embeddings=d.get("max_position_embeddings", 512),
            type_vocab_size=d.get("type_vocab_size", 2),
            hidden_dropout=d.get("hidden_dropout_prob", 0.1),
            attention_dropout=d.get("attention_probs_dropout_prob", 0.1),
            layer_norm_eps=d.get("layer_norm_eps", 1e-12),
        )
        kwargs.update(overrides)
        return cls(**kwargs)


PRESETS: dict[str, BertConfig] = {
    "bert_base_uncased": BertConfig(),
    "bert_test": BertConfig(
        vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
        max_position_embeddings=64, type_vocab_size=2,
    ),
}


def _torch_uniform(fan_in: int):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for Linear biases."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _dense(cfg: BertConfig, d_in: int, d_out: int, axes, rngs: nnx.Rngs) -> nnx.Linear:
    if cfg.reference_init:
        inits = dict(kernel_init=layers.torch_linear_init, bias_init=_torch_uniform(d_in))
    else:
        inits = dict(kernel_init=layers.bert_init)
    return layers.dense(d_in, d_out, axes, rngs=rngs, dtype=cfg.dtype, **inits)


class BertEmbeddings(nnx.Module):
    """word + position (0..L-1) + token type -> LayerNorm -> dropout."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(1.0) if cfg.reference_init else layers.bert_init
        h = cfg.hidden_size
        self.word = layers.embedding(cfg.vocab_size, h, rngs=rngs, axes=("vocab", "embed"), init=init)
        self.position = layers.embedding(cfg.max_position_embeddings, h, rngs=rngs, axes=("length", "embed"), init=init)
        self.token_type = layers.embedding(cfg.type_vocab_size, h, rngs=rngs, axes=(None, "embed"), init=init)
        self.norm = layers.layer_norm(h, eps=cfg.layer_norm_eps, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)

    def __call__(self, input_ids, token_type_ids, *, deterministic: bool):
        length = input_ids.shape[1]
        x = self.word(input_ids) + self.token_type(token_type_ids)
        x = x + self.position(jnp.arange(length))[None]
        return self.dropout(self.norm(x), deterministic=deterministic)


class BertSelfAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.query = _dense(cfg, h, h, ("embed", "heads"), rngs)
        self.key = _dense(cfg, h, h, ("embed", "heads"), rngs)
        self.value = _dense(cfg, h, h, ("embed", "heads"), rngs)
        self.dropout = nnx.Dropout(cfg.attention_dropout, rngs=rngs)

    def __call__(self, x, mask, *, deterministic: bool):
        q, k, v = (layers.split_heads(f(x), self.num_heads) for f in (self.query, self.key, self.value))
        probs = layers.attention_weights(q, k, scale=self.scale, mask=mask)
        probs = self.dropout(probs, deterministic=deterministic)
        return layers.merge_heads(jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v))


class BertLayer(nnx.Module):
    """Post-LN: x = LN(x + drop(W_o attn(x))); x = LN(x + drop(W_2 gelu(W_1 x)))."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        h, m = cfg.hidden_size, cfg.intermediate_size
        self.attn = BertSelfAttention(cfg, rngs=rngs)
        self.attn_out = _dense(cfg, h, h, ("heads", "embed"), rngs)
        self.attn_norm = layers.layer_norm(h, eps=cfg.layer_norm_eps, rngs=rngs)
        self.mlp_in = _dense(cfg, h, m, ("embed", "mlp"), rngs)
        self.mlp_out = _dense(cfg, m, h, ("mlp", "embed"), rngs)
        self.mlp_norm = layers.layer_norm(h, eps=cfg.layer_norm_eps, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)
        self.dtype = cfg.dtype

    def __call__(self, x, mask, *, deterministic: bool):
        a = self.dropout(self.attn_out(self.attn(x, mask, deterministic=deterministic)), deterministic=deterministic)
        x = self.attn_norm(x.astype(jnp.float32) + a.astype(jnp.float32)).astype(self.dtype)
        f = self.mlp_out(layers.gelu_exact(self.mlp_in(x)))
        f = self.dropout(f, deterministic=deterministic)
        return self.mlp_norm(x.astype(jnp.float32) + f.astype(jnp.float32)).astype(self.dtype)


class Bert(nnx.Module):
    """BERT encoder without pooler; returns the last hidden states (B, L, H)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = BertEmbeddings(config, rngs=rngs)
        self.layers = nnx.List([BertLayer(config, rngs=rngs) for _ in range(config.num_layers)])

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic: bool = True):
        """`attention_mask` (B, L), 1/True = real token: padded keys are masked out for every
        query (HF's additive mask); padded query rows are still computed. PIR passes none."""
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids, deterministic=deterministic).astype(self.config.dtype)
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        def run(layer, x, mask):
            return layer(x, mask, deterministic=deterministic)

        if self.config.remat:  # per layer: only its input is kept for the backward pass
            run = nnx.remat(run)
        for layer in self.layers:
            x = run(layer, x, mask)
        return x
