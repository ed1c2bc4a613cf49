"""CLIP two-tower model in the OpenAI/open_clip layout (RemoteCLIP, GeoRSCLIP, OpenAI CLIP).

Image tower: `models/vit.py`'s VisionTransformer with `ln_post`, then the CLS token times
`visual_proj` (OpenAI's `visual.proj`). Text tower: token + learned position embeddings,
pre-LN blocks under a causal mask, `ln_final`, the state at the end-of-text token (the
largest id of each row: OpenAI, open_clip and HF take the argmax of the ids, and the EOT id
is the last of the vocabulary) times `text_projection`. Logits are `exp(logit_scale)` times
cosine similarities. Padding after the EOT token needs no mask: the causal mask already
hides it from every position up to the EOT.

The MLP activation is a config field because checkpoints differ: OpenAI's models (and
open_clip models built with `pretrained="openai"`) use QuickGELU, open_clip's plain
`ViT-B-32`/`ViT-L-14` configs (RemoteCLIP) use exact GELU. Loading one with the other gives
plausible but wrong embeddings, so presets name it explicitly.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
from flax import nnx

from rsvl_jax.models import vit
from rsvl_jax.models.layers import attention_weights, embedding, gelu_exact, layer_norm, merge_heads, param, \
    quick_gelu, split_heads

ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu_exact}
LOGIT_SCALE_MAX = math.log(100.0)  # CLIP clamps the learned temperature at 100


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    vision: vit.ViTConfig
    text: CLIPTextConfig
    embed_dim: int = 512
    act: str = "quick_gelu"  # "quick_gelu" (OpenAI) or "gelu" (open_clip's non-OpenAI configs)
    logit_scale_init: float = math.log(1 / 0.07)
    dtype: Any = "float32"  # compute dtype of both towers; parameters stay float32


def _vision(image_size, patch, width, layers, heads):
    return vit.ViTConfig(image_size=image_size, patch_size=patch, width=width, layers=layers, heads=heads,
                         mlp_dim=4 * width, final_norm=True)


PRESETS: dict[str, CLIPConfig] = {
    "ViT-B-32": CLIPConfig(_vision(224, 32, 768, 12, 12), CLIPTextConfig(), embed_dim=512),
    "ViT-B-16": CLIPConfig(_vision(224, 16, 768, 12, 12), CLIPTextConfig(), embed_dim=512),
    "ViT-L-14": CLIPConfig(_vision(224, 14, 1024, 24, 16),
                           CLIPTextConfig(width=768, heads=12, mlp_dim=3072), embed_dim=768),
    # Tests: tiny and fast; vocabulary room for a small BPE file.
    "clip_test": CLIPConfig(
        vit.ViTConfig(image_size=16, patch_size=4, width=32, layers=2, heads=4, mlp_dim=64, final_norm=True),
        CLIPTextConfig(vocab_size=1024, context_length=77, width=32, layers=2, heads=4, mlp_dim=64),
        embed_dim=24),
    # The synthetic demo: 64 px scenes, the shipped data/synthetic_clip_bpe vocabulary.
    "clip_demo": CLIPConfig(
        vit.ViTConfig(image_size=64, patch_size=8, width=128, layers=4, heads=4, mlp_dim=512, final_norm=True),
        CLIPTextConfig(vocab_size=1024, context_length=77, width=128, layers=4, heads=4, mlp_dim=512),
        embed_dim=128),
}
PRESETS["ViT-B/32"], PRESETS["ViT-B/16"], PRESETS["ViT-L/14"] = (
    PRESETS["ViT-B-32"], PRESETS["ViT-B-16"], PRESETS["ViT-L-14"])


def _norm(norm: nnx.LayerNorm, x):
    """LayerNorm in float32, result in the activation dtype (as the vision tower)."""
    return norm(x.astype(jnp.float32)).astype(x.dtype)


class MLP(vit.MLP):
    """vit.MLP (same `c_fc`/`c_proj` parameters) with the activation of the checkpoint."""

    def __init__(self, width: int, mlp_dim: int, act: str, *, rngs: nnx.Rngs, dtype):
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; known: {', '.join(ACTIVATIONS)}")
        super().__init__(width, mlp_dim, rngs=rngs, dtype=dtype)
        self.act = act

    def __call__(self, x):
        return self.c_proj(ACTIVATIONS[self.act](self.c_fc(x)))


class MaskedAttention(vit.Attention):
    """vit.Attention with a boolean mask (True = attend), for the causal text tower."""

    def __call__(self, x, mask=None):
        q, k, v = (split_heads(f(x), self.heads) for f in (self.q, self.k, self.v))
        probs = attention_weights(q, k, scale=q.shape[-1] ** -0.5, mask=mask)
        ctx = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v)
        return self.out(merge_heads(ctx))


class TextBlock(nnx.Module):
    """Pre-LN residual block under a mask: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: CLIPTextConfig, act: str, *, rngs: nnx.Rngs, dtype):
        self.ln_1 = layer_norm(cfg.width, eps=cfg.eps, rngs=rngs)
        self.attn = MaskedAttention(cfg.width, cfg.heads, rngs=rngs, dtype=dtype)
        self.ln_2 = layer_norm(cfg.width, eps=cfg.eps, rngs=rngs)
        self.mlp = MLP(cfg.width, cfg.mlp_dim, act, rngs=rngs, dtype=dtype)

    def __call__(self, x, mask):
        x = x + self.attn(_norm(self.ln_1, x), mask).astype(x.dtype)
        return x + self.mlp(_norm(self.ln_2, x)).astype(x.dtype)


class TextTransformer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, act: str, *, rngs: nnx.Rngs, dtype):
        self.config = cfg
        self.dtype = dtype
        self.token_embedding = embedding(cfg.vocab_size, cfg.width, rngs=rngs, init=nnx.initializers.normal(0.02))
        self.positional_embedding = param(rngs, nnx.initializers.normal(0.01), (cfg.context_length, cfg.width),
                                          ("length", "embed"))
        self.blocks = nnx.List([TextBlock(cfg, act, rngs=rngs, dtype=dtype) for _ in range(cfg.layers)])
        self.ln_final = layer_norm(cfg.width, eps=cfg.eps, rngs=rngs)

    def __call__(self, ids):
        """ids (B, L), L <= context_length -> (pooled (B, width) float32, tokens (B, L, width))."""
        b, n = ids.shape
        if n > self.config.context_length:
            raise ValueError(f"text of {n} tokens is longer than the context length {self.config.context_length}")
        x = self.token_embedding(ids).astype(self.dtype) + self.positional_embedding[...][:n].astype(self.dtype)
        causal = jnp.tril(jnp.ones((n, n), bool))[None, None]
        for block in self.blocks:
            x = block(x, causal)
        x = _norm(self.ln_final, x)
        eot = jnp.argmax(ids, axis=-1)  # first occurrence of the largest id
        pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
        return pooled.astype(jnp.float32), x


def l2_normalize(x):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class CLIP(nnx.Module):
    def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        vcfg = dataclasses.replace(config.vision, final_norm=True, dtype=config.dtype)
        self.visual = vit.VisionTransformer(vcfg, rngs=rngs)
        if config.act != "quick_gelu":  # vit.Block builds QuickGELU MLPs; same parameters, other activation
            for block in self.visual.blocks:
                block.mlp = MLP(vcfg.width, vcfg.mlp_dim, config.act, rngs=rngs, dtype=dtype)
        self.visual_proj = param(rngs, nnx.initializers.normal(vcfg.width**-0.5), (vcfg.width, config.embed_dim),
                                 ("embed", None))
        self.text = TextTransformer(config.text, config.act, rngs=rngs, dtype=dtype)
        self.text_projection = param(rngs, nnx.initializers.normal(config.text.width**-0.5),
                                     (config.text.width, config.embed_dim), ("embed", None))
        self.logit_scale = param(rngs, nnx.initializers.constant(config.logit_scale_init), (), ())

    def encode_image(self, images):
        """images (B, S, S, 3), CLIP-normalised -> (L2-normalised (B, D), intermediates)."""
        tokens = self.visual(images)
        pooled = tokens[:, 0].astype(jnp.float32)
        feats = pooled @ self.visual_proj[...]
        return l2_normalize(feats), {"pooled": pooled, "features": feats, "tokens": tokens}

    def encode_text(self, ids):
        """ids (B, L) (start, text, end-of-text, zeros) -> (L2-normalised (B, D), intermediates)."""
        pooled, tokens = self.text(ids)
        feats = pooled @ self.text_projection[...]
        return l2_normalize(feats), {"pooled": pooled, "features": feats, "tokens": tokens}

    def scale(self):
        """exp(logit_scale), clamped at 100 as CLIP clamps it during training."""
        return jnp.exp(jnp.minimum(self.logit_scale[...], LOGIT_SCALE_MAX))

    def __call__(self, images, ids):
        """(logits_per_image (B_img, B_txt), intermediates with both embeddings)."""
        img, _ = self.encode_image(images)
        txt, _ = self.encode_text(ids)
        logits = self.scale() * img @ txt.T
        return logits, {"image_embeds": img, "text_embeds": txt}


def freeze_filters() -> dict[str, Any]:
    """The nnx path filters of each tower (for `model.freeze_vision` / `model.freeze_text`)."""
    return {"vision": nnx.Any(nnx.PathContains("visual"), nnx.PathContains("visual_proj")),
            "text": nnx.Any(nnx.PathContains("text"), nnx.PathContains("text_projection"))}


__all__ = ["CLIP", "CLIPConfig", "CLIPTextConfig", "PRESETS", "freeze_filters", "l2_normalize"]
