"""OpenAI-CLIP-style Vision Transformer, the frozen image encoder of BITA (spec BITA §1).

Conv patch embedding (no bias) -> prepend the class token -> add learned positions ->
`ln_pre` -> pre-LN blocks (multi-head attention, QuickGELU MLP) -> optional `ln_post`.
BITA builds only the first 21 of CLIP ViT-L/14's 24 blocks and no final norm, so its output
is the raw residual stream after block 21 (= HF `hidden_states[21]`); `clip_vit_l14` is the
full tower (24 blocks + `ln_post`) for comparison with HF/OpenAI.

Parameter names follow the OpenAI/LAVIS checkpoint (`conv1`, `ln_pre`, `blocks.i.ln_1`,
`attn.{q,k,v,out}`, `mlp.{c_fc,c_proj}`), with the fused `in_proj` split into q/k/v so each
projection shards cleanly along `heads`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from rsvl_jax.models.layers import attention_weights, dense, layer_norm, merge_heads, param, quick_gelu, split_heads


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 21  # blocks actually built (BITA/LAVIS pass layers=22 and build layers-1)
    heads: int = 16
    mlp_dim: int = 4096
    eps: float = 1e-5
    final_norm: bool = False  # `ln_post`; BITA leaves it out (spec §1.1)
    # Converter: a checkpoint position table for another image size is resized (BITA's
    # `interpolate_pos_embed`, bicubic with align_corners=True) instead of rejected.
    resize_positions_on_load: bool = False
    dtype: Any = "float32"  # compute dtype; parameters stay float32

    @property
    def grid(self) -> int:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return 1 + self.grid**2


PRESETS: dict[str, ViTConfig] = {
    # The full OpenAI CLIP ViT-L/14 visual tower (without its `proj` head).
    "clip_vit_l14": ViTConfig(layers=24, final_norm=True),
    # What BITA builds: first 21 blocks, no final norm (spec §1.1, quirk Q15).
    "clip_vit_l14_bita": ViTConfig(layers=21, final_norm=False, resize_positions_on_load=True),
    # Same sizes as tests/fixtures/bita/vit_tiny.npz.
    "vit_test": ViTConfig(image_size=16, patch_size=4, width=32, layers=2, heads=4, mlp_dim=128),
}


def _norm(norm: nnx.LayerNorm, x):
    """LayerNorm computed in float32, result in the activation dtype (BITA's LayerNorm subclass)."""
    return norm(x.astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
    """Unmasked multi-head self-attention (torch `nn.MultiheadAttention`, q scaled by Dh^-0.5)."""

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs, dtype):
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        init = nnx.initializers.normal(width**-0.5)
        self.q = dense(width, width, ("embed", "heads"), rngs=rngs, kernel_init=init, dtype=dtype)
        self.k = dense(width, width, ("embed", "heads"), rngs=rngs, kernel_init=init, dtype=dtype)
        self.v = dense(width, width, ("embed", "heads"), rngs=rngs, kernel_init=init, dtype=dtype)
        self.out = dense(width, width, ("heads", "embed"), rngs=rngs, kernel_init=init, dtype=dtype)

    def __call__(self, x):
        q, k, v = (split_heads(f(x), self.heads) for f in (self.q, self.k, self.v))
        probs = attention_weights(q, k, scale=q.shape[-1] ** -0.5)
        ctx = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v)
        return self.out(merge_heads(ctx))


class MLP(nnx.Module):
    def __init__(self, width: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype):
        self.c_fc = dense(width, mlp_dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.c_proj = dense(mlp_dim, width, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x):
        return self.c_proj(quick_gelu(self.c_fc(x)))


class Block(nnx.Module):
    """Pre-LN residual block: x + MHA(ln_1(x)), then x + MLP(ln_2(x)). No dropout, no mask."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        self.ln_1 = layer_norm(config.width, eps=config.eps, rngs=rngs)
        self.attn = Attention(config.width, config.heads, rngs=rngs, dtype=dtype)
        self.ln_2 = layer_norm(config.width, eps=config.eps, rngs=rngs)
        self.mlp = MLP(config.width, config.mlp_dim, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        x = x + self.attn(_norm(self.ln_1, x)).astype(x.dtype)
        return x + self.mlp(_norm(self.ln_2, x)).astype(x.dtype)


class VisionTransformer(nnx.Module):
    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        w, p = config.width, config.patch_size
        self.conv1 = nnx.Conv(
            3, w, (p, p), strides=(p, p), padding="VALID", use_bias=False,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, None, "conv_in", "embed")),
            dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
        )
        scale = nnx.initializers.normal(w**-0.5)
        self.class_embedding = param(rngs, scale, (w,), ("embed",))
        self.positional_embedding = param(rngs, scale, (config.num_positions, w), ("length", "embed"))
        self.ln_pre = layer_norm(w, eps=config.eps, rngs=rngs)
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.layers)])
        self.ln_post = layer_norm(w, eps=config.eps, rngs=rngs) if config.final_norm else None

    def __call__(self, images, *, num_blocks: int | None = None, return_hidden_states: bool = False,
                 deterministic: bool = True):
        """images (B, H, W, 3) -> tokens (B, 1 + N, width), CLS first.

        `num_blocks=k` stops after block k and skips `ln_post` (the hidden state after block k,
        HF's `hidden_states[k]`). With `return_hidden_states` the result is
        `(out, {"hidden_states": [after ln_pre, after block 1, ...]})`, indexed like HF's.
        `deterministic` is accepted for a uniform interface; the ViT has no dropout.
        """
        del deterministic
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        if images.shape[1:3] != (cfg.image_size, cfg.image_size):
            raise ValueError(f"expected {cfg.image_size}x{cfg.image_size} images, got {images.shape[1:3]}")
        n = cfg.layers if num_blocks is None else num_blocks
        if not 0 <= n <= cfg.layers:
            raise ValueError(f"num_blocks {num_blocks} not in [0, {cfg.layers}]")
        x = self.conv1(images.astype(dtype))
        b = x.shape[0]
        x = x.reshape(b, -1, cfg.width)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(dtype), (b, 1, cfg.width))
        x = jnp.concatenate([cls, x], axis=1) + self.positional_embedding[...].astype(dtype)
        x = _norm(self.ln_pre, x)
        hidden = [x]
        for i in range(n):
            x = self.blocks[i](x)
            hidden.append(x)
        if num_blocks is None and self.ln_post is not None:
            x = _norm(self.ln_post, x)
        return (x, {"hidden_states": hidden}) if return_hidden_states else x


# ----------------------------------------------------------------------------------------
# Position-table resizing (BITA's `interpolate_pos_embed`, spec §1.2).
# ----------------------------------------------------------------------------------------
def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution weights for taps at offsets -1, 0, 1, 2 (torch's A = -0.75)."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of 1-D bicubic resampling with align_corners=True.

    Output i samples the input at i * (n_in - 1) / (n_out - 1); taps outside the input are
    clamped to the border, exactly as torch's `upsample_bicubic2d` does.
    """
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    src = np.arange(n_out, dtype=np.float64) * scale
    base = np.floor(src).astype(np.int64)
    w = _cubic_weights(src - base)
    m = np.zeros((n_out, n_in), np.float64)
    for tap in range(4):
        idx = np.clip(base - 1 + tap, 0, n_in - 1)
        np.add.at(m, (np.arange(n_out), idx), w[:, tap])
    return m


def resize_positions(table: np.ndarray, new_grid: int | tuple[int, int]) -> np.ndarray:
    """(1 + g*g, D) position table -> (1 + gh*gw, D): CLS row kept, the square patch grid
    resized bicubically with align_corners=True (BITA §1.2; not EVA's align_corners=False)."""
    table = np.asarray(table)
    gh, gw = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
    n = table.shape[0] - 1
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"position table has {n} patch rows, not a square grid")
    if (g, g) == (gh, gw):
        return table
    grid = table[1:].astype(np.float64).reshape(g, g, -1)
    out = np.einsum("ih,hwd,jw->ijd", bicubic_matrix(g, gh), grid, bicubic_matrix(g, gw))
    return np.concatenate([table[:1], out.reshape(gh * gw, -1).astype(table.dtype)], axis=0)
