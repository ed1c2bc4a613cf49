"""The Q-Former with a switchable token mixer: BITA's IFT (`fourier`) or BLIP-2's (`attention`).

A BERT-style encoder over learned query tokens and/or text (spec BITA §2). Each layer:

1. token mixer over the whole sequence (queries, text, or queries + text):
   * `fourier` (BITA IFT, §2.4): `f = LN(h + Re(FFT2(h)))`, the 2-D DFT over the sequence and
     hidden axes, unnormalised, computed in float32; parameter-free apart from the LayerNorm
     and blind to every mask (quirk Q2: padding tokens are mixed in, mirrored by default);
   * `attention` (BLIP-2): masked multi-head self-attention + dense + residual LayerNorm;
2. for the query positions only: cross-attention to the image features (every layer whose
   index is a multiple of `cross_attention_freq`; BITA: 1 = every layer) then the query FFN;
3. for the text positions: the text FFN (no cross-attention).

Three paths: `encode_queries` (image features in), `encode_text`, `encode_joint`. Text
positions always start at 0 and the query tokens get no position embedding; queries and text
both go through the embedding LayerNorm (§2.3).

Parameter names follow the BERT/LAVIS modules loosely: `embeddings.{word_embeddings,
position_embeddings, layer_norm}`, `layers.l.{mixer, cross_attn, query_ffn, text_ffn}`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx

from rsvl_jax.models.layers import (
    attention_weights,
    bert_init,
    dense,
    embedding,
    gelu_exact,
    layer_norm,
    merge_heads,
    param,
    split_heads,
)

MIXERS = ("fourier", "attention")


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    vocab_size: int = 30523  # bert-base-uncased + [DEC]
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_position_embeddings: int = 512
    eps: float = 1e-12
    encoder_width: int = 1024  # image feature width (K/V input of the cross-attention)
    num_query_tokens: int = 32
    cross_attention_freq: int = 1  # cross-attention in layers l with l % freq == 0
    mixer: str = "fourier"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    # Build the text side (word/position embeddings, text FFNs). BITA's stage-2 model and
    # LAVIS's BLIP-2 OPT/T5 models delete it (spec §2.9); the query path does not need it.
    text: bool = True
    # Fix for quirk Q2 (off = mirror BITA): zero padded text positions before the Fourier
    # mixing so pad tokens do not leak into the features (the padded length still matters).
    fourier_mask_padding: bool = False
    # Recompute each layer's activations in the backward pass instead of keeping them
    # (jax.checkpoint per layer): less memory, about one more forward of compute.
    remat: bool = False
    dtype: Any = "float32"  # compute dtype; parameters, FFT, softmax and LayerNorms stay float32

    def __post_init__(self):
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {self.mixer!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_freq == 0


PRESETS: dict[str, QFormerConfig] = {
    # BITA's IFT (spec §2.1): Fourier mixing, cross-attention in all 12 layers.
    "bita_ift": QFormerConfig(),
    # BITA stage 2 / captioning: the same without the text side (spec §2.9).
    "bita_ift_opt": QFormerConfig(text=False),
    # LAVIS BLIP-2 Q-Former (ViT-L features): self-attention, cross-attention every 2nd layer.
    "blip2_qformer": QFormerConfig(mixer="attention", cross_attention_freq=2),
    # Same sizes as tests/fixtures/bita/ift_tiny.npz.
    "qformer_test": QFormerConfig(vocab_size=100, hidden=64, layers=2, heads=4, intermediate=128,
                                  max_position_embeddings=40, encoder_width=48, num_query_tokens=8),
}


def _norm(norm: nnx.LayerNorm, x):
    """LayerNorm in float32, result in the activation dtype."""
    return norm(x.astype(jnp.float32)).astype(x.dtype)


def _dense(i, o, axes, rngs, dtype):
    return dense(i, o, axes, rngs=rngs, kernel_init=bert_init, dtype=dtype)


class Attention(nnx.Module):
    """BERT attention + output sublayer: LN(dense(MHA(x, ctx)) + x). Self-attention when
    `kv_width == hidden` and called without `ctx`; cross-attention otherwise."""

    def __init__(self, cfg: QFormerConfig, kv_width: int, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.heads = cfg.heads
        self.query = _dense(cfg.hidden, cfg.hidden, ("embed", "heads"), rngs, dtype)
        kv_axis = "embed" if kv_width == cfg.hidden else "kv"  # image features: their own width
        self.key = _dense(kv_width, cfg.hidden, (kv_axis, "heads"), rngs, dtype)
        self.value = _dense(kv_width, cfg.hidden, (kv_axis, "heads"), rngs, dtype)
        self.out = _dense(cfg.hidden, cfg.hidden, ("heads", "embed"), rngs, dtype)
        self.norm = layer_norm(cfg.hidden, eps=cfg.eps, rngs=rngs)
        self.attn_dropout = nnx.Dropout(cfg.attention_dropout, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)

    def __call__(self, x, ctx=None, mask=None, *, deterministic: bool):
        ctx = x if ctx is None else ctx.astype(x.dtype)
        q = split_heads(self.query(x), self.heads)
        k = split_heads(self.key(ctx), self.heads)
        v = split_heads(self.value(ctx), self.heads)
        probs = attention_weights(q, k, scale=q.shape[-1] ** -0.5, mask=mask)
        probs = self.attn_dropout(probs, deterministic=deterministic)
        out = merge_heads(jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v))
        out = self.dropout(self.out(out), deterministic=deterministic)
        return _norm(self.norm, out + x)


class FourierMixer(nnx.Module):
    """BITA's `fourier` sublayer: LN(h + Re(FFT2(h))) over (sequence, hidden); no dropout."""

    def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs):
        self.norm = layer_norm(cfg.hidden, eps=cfg.eps, rngs=rngs)

    def __call__(self, x, keep=None, *, deterministic: bool):
        """`keep` (B, S) bool, only with `fourier_mask_padding`: rows to feed the FFT."""
        del deterministic
        h = x.astype(jnp.float32)
        src = h if keep is None else jnp.where(keep[:, :, None], h, 0.0)
        mixed = jnp.real(jnp.fft.fft2(src, axes=(-2, -1)))
        return self.norm(h + mixed).astype(x.dtype)


class FFN(nnx.Module):
    """BERT intermediate + output: LN(dropout(W2 gelu(W1 x)) + x), exact GELU."""

    def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.fc1 = _dense(cfg.hidden, cfg.intermediate, ("embed", "mlp"), rngs, dtype)
        self.fc2 = _dense(cfg.intermediate, cfg.hidden, ("mlp", "embed"), rngs, dtype)
        self.norm = layer_norm(cfg.hidden, eps=cfg.eps, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)

    def __call__(self, x, *, deterministic: bool):
        y = self.dropout(self.fc2(gelu_exact(self.fc1(x))), deterministic=deterministic)
        return _norm(self.norm, y + x)


class Layer(nnx.Module):
    def __init__(self, cfg: QFormerConfig, index: int, *, rngs: nnx.Rngs):
        self.fourier = cfg.mixer == "fourier"
        self.mask_padding = cfg.fourier_mask_padding
        self.mixer = FourierMixer(cfg, rngs=rngs) if self.fourier else Attention(cfg, cfg.hidden, rngs=rngs)
        self.cross_attn = Attention(cfg, cfg.encoder_width, rngs=rngs) if cfg.has_cross_attention(index) else None
        self.query_ffn = FFN(cfg, rngs=rngs)
        self.text_ffn = FFN(cfg, rngs=rngs) if cfg.text else None

    def __call__(self, h, *, query_length: int, image_embeds, self_mask, image_mask, deterministic: bool):
        if self.fourier:
            keep = None
            if self.mask_padding and self_mask is not None and self_mask.shape[-2] == 1:
                keep = self_mask[:, 0, 0, :]  # key-padding mask (B, S)
            f = self.mixer(h, keep, deterministic=deterministic)
        else:
            f = self.mixer(h, mask=self_mask, deterministic=deterministic)
        if f.shape[1] > query_length and self.text_ffn is None:
            raise ValueError("text positions given to a Q-Former built without its text side (config.text=False)")
        if query_length == 0:
            return self.text_ffn(f, deterministic=deterministic)
        q = f[:, :query_length]
        if self.cross_attn is not None:
            if image_embeds is None:
                raise ValueError("image_embeds are needed by the query path (cross-attention)")
            q = self.cross_attn(q, image_embeds, image_mask, deterministic=deterministic)
        out = self.query_ffn(q, deterministic=deterministic)
        if f.shape[1] > query_length:
            out = jnp.concatenate([out, self.text_ffn(f[:, query_length:], deterministic=deterministic)], axis=1)
        return out


class Embeddings(nnx.Module):
    """Word + absolute position embeddings (no token types); the LayerNorm + dropout are
    applied to queries and text alike."""

    def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs):
        if cfg.text:
            self.word_embeddings = embedding(cfg.vocab_size, cfg.hidden, rngs=rngs)
            self.position_embeddings = embedding(cfg.max_position_embeddings, cfg.hidden, rngs=rngs,
                                                 axes=("length", "embed"))
        else:
            self.word_embeddings = self.position_embeddings = None
        self.layer_norm = layer_norm(cfg.hidden, eps=cfg.eps, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)

    def text(self, input_ids):
        """Raw text embeddings (before the LayerNorm); positions start at 0."""
        if self.word_embeddings is None:
            raise ValueError("this Q-Former was built without its text side (config.text=False)")
        length = input_ids.shape[1]
        return self.word_embeddings(input_ids) + self.position_embeddings.embedding[None, :length]

    def __call__(self, x, *, deterministic: bool):
        return self.dropout(self.layer_norm(x.astype(jnp.float32)), deterministic=deterministic)


class QFormer(nnx.Module):
    def __init__(self, config: QFormerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.query_tokens = param(rngs, bert_init, (1, config.num_query_tokens, config.hidden), (None, None, "embed"))
        self.embeddings = Embeddings(config, rngs=rngs)
        self.layers = nnx.List([Layer(config, i, rngs=rngs) for i in range(config.layers)])

    def __call__(self, embeds, *, query_length: int, image_embeds=None, attention_mask=None, image_mask=None,
                 deterministic: bool = True):
        """The encoder on raw (pre-LayerNorm) embeddings whose first `query_length` rows are
        queries (HF `Blip2QFormerModel(query_embeds, query_length)` semantics).

        attention_mask: bool, True = attend; (B, S) key padding or (B, S, S) full; used by the
        `attention` mixer (and by the Fourier mixer only with `fourier_mask_padding`).
        image_mask: bool (B, Ni) for the cross-attention, default all ones.
        Returns (hidden (B, S, D), {"embeddings": after LN, "hidden_states": per-layer outputs}).
        """
        cfg = self.config
        h = self.embeddings(embeds, deterministic=deterministic).astype(jnp.dtype(cfg.dtype))
        emb = h
        self_mask = None
        if attention_mask is not None:
            m = jnp.asarray(attention_mask, bool)
            self_mask = m[:, None, None, :] if m.ndim == 2 else (m[:, None] if m.ndim == 3 else m)
        if image_mask is not None:
            image_mask = jnp.asarray(image_mask, bool)[:, None, None, :]
        def run(layer, h, image_embeds, self_mask, image_mask):
            return layer(h, query_length=query_length, image_embeds=image_embeds, self_mask=self_mask,
                         image_mask=image_mask, deterministic=deterministic)

        if cfg.remat:
            run = nnx.remat(run)
        hidden = []
        for layer in self.layers:
            h = run(layer, h, image_embeds, self_mask, image_mask)
            hidden.append(h)
        return h, {"embeddings": emb, "hidden_states": hidden}

    def _queries(self, batch: int):
        return jnp.broadcast_to(self.query_tokens[...], (batch,) + self.query_tokens.shape[1:])

    def encode_queries(self, image_embeds, *, image_mask=None, deterministic: bool = True):
        """(B, Ni, encoder_width) image features -> (B, Nq, D) query features."""
        out, _ = self(self._queries(image_embeds.shape[0]), query_length=self.config.num_query_tokens,
                      image_embeds=image_embeds, image_mask=image_mask, deterministic=deterministic)
        return out

    def encode_text(self, input_ids, attention_mask=None, *, deterministic: bool = True):
        """(B, L) ids -> (B, L, D). The Fourier mixer ignores `attention_mask` (quirk Q2)."""
        out, _ = self(self.embeddings.text(input_ids), query_length=0, attention_mask=attention_mask,
                      deterministic=deterministic)
        return out

    def encode_joint(self, image_embeds, input_ids, attention_mask=None, *, image_mask=None,
                     deterministic: bool = True):
        """Queries + text in one sequence (queries first) -> (B, Nq + L, D). A (B, L) text
        mask is extended with ones for the queries (BLIP-2's bidirectional ITM mask)."""
        b = input_ids.shape[0]
        nq = self.config.num_query_tokens
        embeds = jnp.concatenate([self._queries(b), self.embeddings.text(input_ids)], axis=1)
        if attention_mask is not None and jnp.ndim(attention_mask) == 2:
            attention_mask = jnp.concatenate([jnp.ones((b, nq), bool), jnp.asarray(attention_mask, bool)], axis=1)
        out, _ = self(embeds, query_length=nq, image_embeds=image_embeds, attention_mask=attention_mask,
                      image_mask=image_mask, deterministic=deterministic)
        return out
