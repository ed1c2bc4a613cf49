"""OPT decoder (HF `OPTForCausalLM` numerics) with a functional KV cache.

BITA feeds OPT-2.7B a prefix of projected query embeddings followed by prompt/caption token
embeddings (a prefix LM), so the model accepts token ids or embeddings. Decoding
(`rsvl_jax.decoding`) threads the `KVCache` pytree through one jitted `lax.while_loop`:
a prefill writes slots [0, L), each extend step writes one slot. Shapes are static: the cache
has a fixed `max_len`, and its `mask` says which slots hold real tokens.

Faithful to HF:
* positions come from the attention mask, `cumsum(mask) * mask - 1`, plus OPT's offset 2, so
  left pads sit at table row 1 and the first real token at row 2 whatever the padding;
* q is scaled *after* its bias (`q_proj(x) * head_dim**-0.5`), softmax in float32;
* the LM head is tied to the token embedding (`logits = h @ embed_tokens^T`);
* pre-LN blocks with a final LayerNorm (`do_layer_norm_before`); OPT-350m style post-LN blocks
  have no final LayerNorm, and `word_embed_proj_dim != hidden` adds `project_in/out`.
* dropout: after the attention output projection and after fc2 (`dropout`), and on the
  attention probabilities (`attention_dropout`); none on the embeddings (HF 4.29 and 5.x agree).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rsvl_jax.models import layers

_init = nnx.initializers.normal(0.02)  # HF OPT `init_std`

ACTIVATIONS = {"relu": jax.nn.relu, "gelu": layers.gelu_exact}


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    vocab_size: int = 50272
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    ffn_dim: int = 3072
    max_positions: int = 2048
    word_embed_proj_dim: int | None = None  # None: same as hidden (no project_in/out)
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False  # HF `_remove_final_layer_norm` (pre-4.20 fine-tunes)
    enable_bias: bool = True
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation: str = "relu"
    layer_norm_eps: float = 1e-5  # torch nn.LayerNorm default, which HF OPT uses
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    dtype: Any = jnp.float32

    @property
    def embed_dim(self) -> int:
        """Width of the token embeddings (and of prefix embeddings fed to the model)."""
        return self.word_embed_proj_dim or self.hidden

    @property
    def has_projection(self) -> bool:
        return self.embed_dim != self.hidden

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    @classmethod
    def from_hf_config_dict(cls, d: dict, **overrides) -> "OPTConfig":
        """From an HF `config.json` dict (`OPTConfig.to_dict()`)."""
        if d.get("layer_norm_elementwise_affine", True) is False:
            raise ValueError("OPT without LayerNorm affine parameters is not supported")
        kw = dict(
            vocab_size=d["vocab_size"],
            hidden=d["hidden_size"],
            layers=d["num_hidden_layers"],
            heads=d["num_attention_heads"],
            ffn_dim=d["ffn_dim"],
            max_positions=d["max_position_embeddings"],
            # normalised so that a checkpoint's config equals the matching preset
            word_embed_proj_dim=None if d.get("word_embed_proj_dim") in (None, d["hidden_size"]) else d["word_embed_proj_dim"],
            do_layer_norm_before=d.get("do_layer_norm_before", True),
            remove_final_layer_norm=d.get("_remove_final_layer_norm", False),
            enable_bias=d.get("enable_bias", True),
            dropout=d.get("dropout", 0.1),
            attention_dropout=d.get("attention_dropout", 0.0),
            activation=d.get("activation_function", "relu"),
            pad_token_id=d.get("pad_token_id", 1),
            bos_token_id=d.get("bos_token_id", 2),
            eos_token_id=d.get("eos_token_id", 2),
        )
        kw.update(overrides)
        return cls(**kw)


PRESETS: dict[str, OPTConfig] = {
    # facebook/opt-125m
    "opt_125m": OPTConfig(),
    # facebook/opt-350m: post-LN blocks, no final LayerNorm, 512-wide embeddings + project_in/out
    "opt_350m": OPTConfig(
        hidden=1024, layers=24, heads=16, ffn_dim=4096, word_embed_proj_dim=512, do_layer_norm_before=False
    ),
    # facebook/opt-2.7b (BITA's frozen LM)
    "opt_2_7b": OPTConfig(hidden=2560, layers=32, heads=32, ffn_dim=10240),
    "opt_test": OPTConfig(vocab_size=96, hidden=32, layers=2, heads=4, ffn_dim=48, max_positions=64),
}


# ----------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer key/value buffers (N, heads, max_len, head_dim), the attention mask of the
    slots written so far (N, max_len; 0 for pads and unwritten slots) and the next free slot.

    `shared` optionally holds a read-only prefix cache of B = N / group rows (slots before
    ours): beams of one batch entry share their prefill instead of each carrying a copy, so
    reordering beams only moves the generated part (`fork`). Its keys are stored transposed,
    (B, heads, head_dim, P), for `OPTAttention`'s prefix logits.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array
    shared: "KVCache | None" = None

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]

    def take(self, rows: jax.Array) -> "KVCache":
        """Select/reorder rows (beam search); a shared prefix is left as it is, so `rows` must
        stay within each row's batch entry when there is one."""
        # "clip": the rows are always in range, and the default "fill" mode's bounds mask costs
        # a third of this gather, which runs once per beam-search step.
        take = lambda x: jnp.take(x, rows, axis=0, mode="clip")
        return KVCache(tuple(map(take, self.k)), tuple(map(take, self.v)), take(self.mask), self.index, self.shared)

    def repeat(self, n: int) -> "KVCache":
        """Each row n times in a row ((b0, b0, ..., b1, ...)), buffers copied."""
        rep = lambda x: jnp.repeat(x, n, axis=0)
        shared = None if self.shared is None else self.shared.repeat(n)
        return KVCache(tuple(map(rep, self.k)), tuple(map(rep, self.v)), rep(self.mask), self.index, shared)

    def fork(self, n: int, max_len: int) -> "KVCache":
        """`n` continuations per row on top of this (filled) cache, kept as a shared prefix:
        fresh buffers of `max_len` slots for N = rows * n rows."""
        if self.shared is not None:
            raise ValueError("cannot fork a cache that already has a shared prefix")
        rows = self.mask.shape[0] * n
        zeros = lambda x: jnp.zeros((rows,) + x.shape[1:2] + (max_len,) + x.shape[3:], x.dtype)
        prefix = KVCache(tuple(jnp.swapaxes(k, -1, -2) for k in self.k), self.v, self.mask, self.index)
        return KVCache(tuple(map(zeros, self.k)), tuple(map(zeros, self.v)),
                       jnp.zeros((rows, max_len), jnp.int32), jnp.zeros((), jnp.int32), prefix)


def _positions(full_mask, start, length):
    """HF OPT positions of slots [start, start+length) given the mask of all slots, + offset 2."""
    pos = jnp.cumsum(full_mask, axis=1) * full_mask - 1
    return jax.lax.dynamic_slice_in_dim(pos, start, length, axis=1) + 2


def _by_entry(x, b):
    """(N, H, L, X) -> (B, H, G * L, X): the N = B * G rows of each batch entry stacked per head."""
    n, h, length, d = x.shape
    return x.reshape(b, n // b, h, length, d).transpose(0, 2, 1, 3, 4).reshape(b, h, n // b * length, d)


def _by_row(x, n, length):
    """The inverse of `_by_entry`: (B, H, G * L, X) -> (N, H, L, X)."""
    b, h, _, d = x.shape
    return x.reshape(b, h, n // b, length, d).transpose(0, 2, 1, 3, 4).reshape(n, h, length, d)


def _grouped(x, rows):
    """(B, ...) -> (rows, ...) by repeating each entry rows // B times."""
    return jnp.repeat(x, rows // x.shape[0], axis=0)


# ----------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------
class OPTAttention(nnx.Module):
    def __init__(self, cfg: OPTConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden
        self.heads = cfg.heads
        self.scale = (d // cfg.heads) ** -0.5
        kw = dict(rngs=rngs, use_bias=cfg.enable_bias, kernel_init=_init, dtype=cfg.dtype)
        self.q_proj = layers.dense(d, d, ("embed", "heads"), **kw)
        self.k_proj = layers.dense(d, d, ("embed", "heads"), **kw)
        self.v_proj = layers.dense(d, d, ("embed", "heads"), **kw)
        self.out_proj = layers.dense(d, d, ("heads", "embed"), **kw)
        self.attn_dropout = nnx.Dropout(cfg.attention_dropout, rngs=rngs)

    def __call__(self, x, key_mask, q_slots, cache_kv=None, start=None, shared_kv=None, *, deterministic: bool):
        """x (N, L, D); key_mask (N, S) bool over all key slots (shared prefix first);
        q_slots (L,) absolute slot ids of x.

        With `cache_kv=(K, V)` the new keys/values are written at slot `start` of those buffers
        and attention runs over all their slots (plus `shared_kv`'s prefix keys (B, H, Dh, P)
        and values (B, H, P, Dh), each used by N / B consecutive rows); otherwise over the L
        new ones.
        """
        q = layers.split_heads(self.q_proj(x) * self.scale, self.heads)  # HF scales after the bias
        k = layers.split_heads(self.k_proj(x), self.heads)
        v = layers.split_heads(self.v_proj(x), self.heads)
        if cache_kv is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache_kv[0], k.astype(cache_kv[0].dtype), start, axis=2)
            v = jax.lax.dynamic_update_slice_in_dim(cache_kv[1], v.astype(cache_kv[1].dtype), start, axis=2)
        causal = jnp.arange(key_mask.shape[1])[None, :] <= q_slots[:, None]  # (L, S)
        mask = causal[None, None] & key_mask[:, None, None, :]
        logits = jnp.einsum("nhqd,nhkd->nhqk", q, k)
        if shared_kv is not None:
            pk, pv = shared_kv
            n, length = q.shape[0], q.shape[2]
            b, p_len = pk.shape[0], pk.shape[-1]
            # The rows of one entry as one (G * L)-row matrix per (entry, head), against keys
            # stored (Dh, P): both prefix products are then plain (M, K) x (K, N) matmuls, on
            # XLA's CPU 2.5-3x (logits) and 4.5-6x (values) faster than batching over the
            # group axis in place.
            pre = jnp.einsum("bhmd,bhdp->bhmp", _by_entry(q, b), pk)
            logits = jnp.concatenate([_by_row(pre, n, length), logits], axis=-1)
        logits = jnp.where(mask, logits.astype(jnp.float32), layers.MASK_VALUE)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        probs = self.attn_dropout(probs, deterministic=deterministic)
        if shared_kv is None:
            ctx = jnp.einsum("nhqk,nhkd->nhqd", probs, v)
        else:
            ctx = _by_row(jnp.einsum("bhmp,bhpd->bhmd", _by_entry(probs[..., :p_len], b), pv), n, length)
            ctx = ctx + jnp.einsum("nhqk,nhkd->nhqd", probs[..., p_len:], v)
        out = self.out_proj(layers.merge_heads(ctx))
        return out, (k, v)


class OPTDecoderLayer(nnx.Module):
    def __init__(self, cfg: OPTConfig, *, rngs: nnx.Rngs):
        self.pre_ln = cfg.do_layer_norm_before
        self.act = ACTIVATIONS[cfg.activation]
        kw = dict(rngs=rngs, use_bias=cfg.enable_bias, kernel_init=_init, dtype=cfg.dtype)
        self.self_attn = OPTAttention(cfg, rngs=rngs)
        self.self_attn_layer_norm = layers.layer_norm(cfg.hidden, eps=cfg.layer_norm_eps, rngs=rngs)
        self.fc1 = layers.dense(cfg.hidden, cfg.ffn_dim, ("embed", "mlp"), **kw)
        self.fc2 = layers.dense(cfg.ffn_dim, cfg.hidden, ("mlp", "embed"), **kw)
        self.final_layer_norm = layers.layer_norm(cfg.hidden, eps=cfg.layer_norm_eps, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x, key_mask, q_slots, cache_kv=None, start=None, shared_kv=None, *, deterministic: bool):
        h = self.self_attn_layer_norm(x) if self.pre_ln else x
        h, kv = self.self_attn(h, key_mask, q_slots, cache_kv, start, shared_kv, deterministic=deterministic)
        x = x + self.dropout(h, deterministic=deterministic)
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_ln else x
        h = self.fc2(self.act(self.fc1(h)))
        x = x + self.dropout(h, deterministic=deterministic)
        if not self.pre_ln:
            x = self.final_layer_norm(x)
        return x, kv


class OPT(nnx.Module):
    """`OPTForCausalLM`: `__call__(input_ids | inputs_embeds, attention_mask, cache=) -> (logits, cache)`."""

    def __init__(self, config: OPTConfig, *, rngs: nnx.Rngs):
        cfg = self.config = config
        self.embed_tokens = layers.embedding(cfg.vocab_size, cfg.embed_dim, rngs=rngs, init=_init)
        # HF allocates max_positions + 2 rows (offset 2); rows 0/1 serve pads in practice.
        self.embed_positions = layers.embedding(cfg.max_positions + 2, cfg.hidden, rngs=rngs, axes=(None, "embed"),
                                                init=_init)
        if cfg.has_projection:
            kw = dict(rngs=rngs, use_bias=False, kernel_init=_init, dtype=cfg.dtype)
            self.project_in = layers.dense(cfg.embed_dim, cfg.hidden, (None, "embed"), **kw)
            self.project_out = layers.dense(cfg.hidden, cfg.embed_dim, ("embed", None), **kw)
        self.layers = nnx.List([OPTDecoderLayer(cfg, rngs=rngs) for _ in range(cfg.layers)])
        if cfg.has_final_layer_norm:
            self.final_layer_norm = layers.layer_norm(cfg.hidden, eps=cfg.layer_norm_eps, rngs=rngs)

    # -- pieces ------------------------------------------------------------------------
    def embed(self, ids):
        """Token embeddings (B, L, embed_dim), the space prefix embeddings must live in."""
        return self.embed_tokens(ids).astype(self.config.dtype)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache of `max_len` slots (keys/values in the compute dtype by default)."""
        cfg = self.config
        shape = (batch, cfg.heads, max_len, cfg.hidden // cfg.heads)
        zeros = lambda: tuple(jnp.zeros(shape, dtype or cfg.dtype) for _ in range(cfg.layers))
        return KVCache(zeros(), zeros(), jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))

    def logits(self, h):
        """Tied LM head, float32 logits."""
        table = self.embed_tokens.embedding[...].astype(self.config.dtype)
        return jnp.einsum("...d,vd->...v", h.astype(self.config.dtype), table).astype(jnp.float32)

    def hidden_states(self, input_ids=None, inputs_embeds=None, attention_mask=None, *, cache: KVCache | None = None,
                      deterministic: bool = True):
        """Final hidden states (after final LN and project_out) and the updated cache."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.config.dtype)
        b, length = x.shape[:2]
        mask = jnp.ones((b, length), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
        shared = None if cache is None else cache.shared
        if cache is None:
            start, own = 0, mask
        else:
            start = cache.index
            own = jax.lax.dynamic_update_slice_in_dim(cache.mask, mask, start, axis=1)
        # slot numbering: a shared prefix's slots come first
        offset = 0 if shared is None else shared.max_len
        full = own if shared is None else jnp.concatenate([_grouped(shared.mask, b), own], axis=1)
        positions = _positions(full, offset + start, length)
        if self.config.has_projection:
            x = self.project_in(x)
        x = x + self.embed_positions(positions).astype(x.dtype)
        key_mask = full.astype(bool)
        q_slots = offset + start + jnp.arange(length)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            skv = None if shared is None else (shared.k[i], shared.v[i])
            x, (k, v) = layer(x, key_mask, q_slots, kv, start, skv, deterministic=deterministic)
            new_k.append(k)
            new_v.append(v)
        if self.config.has_final_layer_norm:
            x = self.final_layer_norm(x)
        if self.config.has_projection:
            x = self.project_out(x)
        new_cache = None if cache is None else KVCache(tuple(new_k), tuple(new_v), own, start + length, shared)
        return x, new_cache

    def __call__(self, input_ids=None, inputs_embeds=None, attention_mask=None, *, cache: KVCache | None = None,
                 deterministic: bool = True):
        h, cache = self.hidden_states(input_ids, inputs_embeds, attention_mask, cache=cache, deterministic=deterministic)
        return self.logits(h), cache


def embed_tokens(model: OPT, ids):
    """Token embeddings for building `inputs_embeds = concat(prefix, embed_tokens(ids))`."""
    return model.embed(ids)


def read_hf_config(path: str | os.PathLike) -> OPTConfig:
    """`OPTConfig` from an HF model directory's `config.json` (or the file itself)."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / "config.json"
    with open(path) as f:
        return OPTConfig.from_hf_config_dict(json.load(f))
