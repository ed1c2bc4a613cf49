"""Swin Transformer (Liu et al., 2021), the image encoder of PIR (spec PIR.md §2.2).

Follows the Microsoft reference layout (`patch_embed`, `layers.{s}.blocks.{b}.attn.qkv`, patch
merging at the *end* of each stage as `layers.{s}.downsample`), so the converter is a rename.
The relative-position index and the shifted-window masks are deterministic, so they are NumPy
constants computed from the config at trace time, never variables.

PIR's output is `concat([mean(tokens)], tokens)` over the final-normalised tokens: (B, 50, 768)
for Swin-T at 224.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rsvl_jax.models import layers
from rsvl_jax.parallel import constrain

# Microsoft (and HF) mask out cross-region pairs of a shifted window by *adding* -100 to the
# logits rather than -inf; exp(-100) ~ 4e-44 so it is a hard mask in float32, and mirroring the
# constant keeps parity exact.
SHIFT_MASK_VALUE = -100.0

# Swin initialises Linear weights and the bias tables with timm's trunc_normal_(std=0.02), whose
# cut-off is at +-2 in absolute value (i.e. +-100 sigma): a plain normal is the same distribution.
# (Flax's truncated_normal cuts at +-2 sigma, which would not be.)
swin_init = nnx.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True)
class SwinConfig:
    image_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.1  # PIR hard-codes 0.1 (linear over all blocks)
    layer_norm_eps: float = 1e-5
    dtype: Any = jnp.float32  # compute dtype; parameters, softmax and LayerNorms stay float32
    remat: bool = False  # recompute each block's activations in the backward pass (memory for FLOPs)

    @property
    def num_features(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def num_tokens(self) -> int:
        """Tokens after the last stage (without the mean token)."""
        return stage_resolution(self, len(self.depths) - 1) ** 2


PRESETS: dict[str, SwinConfig] = {
    "swin_tiny_224": SwinConfig(),
    # 32 px / patch 4 = 8x8 tokens: stage 0 has 2x2 windows of 4x4 with a shift of 2 on its odd
    # block; after merging, stage 1 is 4x4 = one window, so window = resolution and no shift.
    "swin_test": SwinConfig(image_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4,
                            drop_path_rate=0.0),
}


# ----------------------------------------------------------------------------------------
# Geometry: resolutions, effective windows and shifts, NumPy constants.
# ----------------------------------------------------------------------------------------
def stage_resolution(config: SwinConfig, stage: int) -> int:
    return config.image_size // config.patch_size // 2**stage


def stage_window(config: SwinConfig, stage: int) -> tuple[int, int]:
    """(window, shift for odd blocks). Swin's rule: a map no larger than the window is one
    window (window = resolution) and is never shifted."""
    res = stage_resolution(config, stage)
    if res <= config.window_size:
        return res, 0
    if res % config.window_size:
        # The reference (no padding) cannot partition such a map either; HF pads, we refuse.
        raise ValueError(
            f"stage {stage}: resolution {res} is not a multiple of window {config.window_size}"
        )
    return config.window_size, config.window_size // 2


def drop_path_rates(config: SwinConfig) -> list[float]:
    """Stochastic depth grows linearly over all blocks: linspace(0, rate, sum(depths))."""
    return [float(r) for r in np.linspace(0.0, config.drop_path_rate, sum(config.depths))]


@functools.lru_cache(maxsize=None)
def relative_position_index(window: int) -> np.ndarray:
    """(w*w, w*w) int32: row (hi-hj+w-1)*(2w-1) + (wi-wj+w-1) of the bias table."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)
    return (rel[0] * (2 * window - 1) + rel[1]).astype(np.int32)


@functools.lru_cache(maxsize=None)
def shift_mask(resolution: int, window: int, shift: int) -> np.ndarray:
    """(nW, w*w, w*w) float32 additive mask: 0 inside a region, -100 across regions.

    After the cyclic roll, the bottom/right windows hold tokens from up to 3x3 regions that are
    not neighbours in the image; regions are the slices [0, R-w), [R-w, R-s), [R-s, R) per axis.
    """
    idx = np.arange(resolution)
    region = (idx >= resolution - window).astype(np.int32) + (idx >= resolution - shift)
    labels = region[:, None] * 3 + region[None, :]  # (R, R)
    windows = _partition(labels[None, :, :, None], window)[..., 0]  # (nW, w*w)
    same = windows[:, :, None] == windows[:, None, :]
    return np.where(same, 0.0, SHIFT_MASK_VALUE).astype(np.float32)


def _norm(norm: nnx.LayerNorm, x, dtype):
    """LayerNorm in float32, result in the compute dtype (the residual stream's)."""
    return norm(x.astype(jnp.float32)).astype(dtype)


def _partition(x, window: int):
    """(B, H, W, C) -> (B*nW, w*w, C): windows row-major over the grid, tokens row-major inside."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b * (h // window) * (w // window), window * window, c)


def _unpartition(x, window: int, b: int, h: int, w: int):
    """Inverse of `_partition`."""
    c = x.shape[-1]
    x = x.reshape(b, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


# ----------------------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------------------
class PatchEmbed(nnx.Module):
    """Conv(p x p, stride p, VALID) -> row-major tokens -> LayerNorm."""

    def __init__(self, config: SwinConfig, *, rngs: nnx.Rngs):
        p = config.patch_size
        fan_in = config.in_chans * p * p
        bound = 1.0 / np.sqrt(fan_in)
        # Swin's init leaves the conv at PyTorch's default: U(+-1/sqrt(fan_in)) weight and bias.
        self.proj = nnx.Conv(
            config.in_chans, config.embed_dim, kernel_size=(p, p), strides=(p, p), padding="VALID",
            kernel_init=nnx.with_partitioning(layers.torch_linear_init, (None, None, "conv_in", "embed")),
            bias_init=nnx.with_partitioning(
                lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound), ("embed",)
            ),
            dtype=config.dtype, param_dtype=jnp.float32, rngs=rngs,
        )
        self.norm = layers.layer_norm(config.embed_dim, eps=config.layer_norm_eps, rngs=rngs)
        self.dtype = config.dtype

    def __call__(self, images):
        x = self.proj(images)  # (B, H/p, W/p, C)
        b, h, w, c = x.shape
        return _norm(self.norm, x.reshape(b, h * w, c), self.dtype)


class WindowAttention(nnx.Module):
    """Multi-head self-attention inside windows with a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window: int, config: SwinConfig, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.window = window
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = layers.dense(dim, 3 * dim, ("embed", "heads"), rngs=rngs, use_bias=config.qkv_bias,
                                kernel_init=swin_init, dtype=config.dtype)
        self.proj = layers.dense(dim, dim, ("heads", "embed"), rngs=rngs, kernel_init=swin_init, dtype=config.dtype)
        self.relative_position_bias_table = layers.param(
            rngs, swin_init, ((2 * window - 1) ** 2, num_heads), (None, "heads")
        )

    def __call__(self, x, mask=None):
        """x: (B, nW, N, C) windows; mask: (nW, N, N) additive or None.

        Written out rather than via `layers.attention_weights` because the bias (heads) and the
        shift mask (windows) broadcast over different axes of (B, nW, H, N, N).
        """
        b, nw, n, c = x.shape
        h = self.num_heads
        # [q | k | v] column blocks, then heads. k comes transposed, and the outputs keep their
        # heads apart until the end: XLA's CPU batched matmul on these 49 x 32 blocks runs about
        # twice as fast with both operands as (.., M, K) x (.., K, N) as with one transposed.
        qkv = self.qkv(x).reshape(b, nw, n, 3, h, c // h)
        q = qkv[:, :, :, 0].transpose(0, 1, 3, 2, 4) * self.scale  # (B, nW, H, N, Dh)
        k_t = qkv[:, :, :, 1].transpose(0, 1, 3, 4, 2)  # (B, nW, H, Dh, N)
        v = qkv[:, :, :, 2].transpose(0, 1, 3, 2, 4)
        logits = jnp.einsum("bwhqd,bwhdk->bwhqk", q, k_t).astype(jnp.float32)
        table = self.relative_position_bias_table[...]
        bias = table[relative_position_index(self.window)].transpose(2, 0, 1)  # (H, N, N)
        logits = logits + bias
        if mask is not None:
            logits = logits + jnp.asarray(mask)[None, :, None]
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bwhqk,bwhkd->bwhqd", probs, v).transpose(0, 1, 3, 2, 4).reshape(b, nw, n, c)
        return self.proj(out)


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, config: SwinConfig, *, rngs: nnx.Rngs):
        self.fc1 = layers.dense(dim, hidden, ("embed", "mlp"), rngs=rngs, kernel_init=swin_init, dtype=config.dtype)
        self.fc2 = layers.dense(hidden, dim, ("mlp", "embed"), rngs=rngs, kernel_init=swin_init, dtype=config.dtype)

    def __call__(self, x):
        return self.fc2(layers.gelu_exact(self.fc1(x)))


class SwinBlock(nnx.Module):
    """Pre-norm block: x + DropPath(W-MSA(LN(x))), then x + DropPath(MLP(LN(x))).

    It reads and writes its tokens in its own window order (`to_windows` with its shift):
    everything but the attention is per token, so the residual stream can stay in that order,
    and the stage re-orders once between blocks instead of partitioning and merging (and
    rolling) inside every block. The numbers are the reference's, in another token order.
    """

    def __init__(self, dim: int, num_heads: int, resolution: int, window: int, shift: int, drop_path: float,
                 config: SwinConfig, *, rngs: nnx.Rngs):
        self.resolution, self.window, self.shift = resolution, window, shift
        eps = config.layer_norm_eps
        self.norm1 = layers.layer_norm(dim, eps=eps, rngs=rngs)
        self.attn = WindowAttention(dim, num_heads, window, config, rngs=rngs)
        self.norm2 = layers.layer_norm(dim, eps=eps, rngs=rngs)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio), config, rngs=rngs)
        self.drop_path = layers.DropPath(drop_path, rngs=rngs)

    def __call__(self, x, *, deterministic: bool):
        """x: (B, L, C) in this block's window order."""
        b, l, c = x.shape
        r, w, s = self.resolution, self.window, self.shift
        y = _norm(self.norm1, x, x.dtype).reshape(b, (r // w) ** 2, w * w, c)
        y = self.attn(y, shift_mask(r, w, s) if s else None)
        x = x + self.drop_path(y.reshape(b, l, c), deterministic=deterministic)
        return x + self.drop_path(self.mlp(_norm(self.norm2, x, x.dtype)), deterministic=deterministic)


def to_windows(x, resolution: int, window: int, shift: int):
    """(B, R*R, C) row-major tokens -> (B, R*R, C) in window order after the cyclic shift."""
    b, _, c = x.shape
    if window == resolution and not shift:
        return x
    x = x.reshape(b, resolution, resolution, c)
    if shift:
        x = jnp.roll(x, (-shift, -shift), axis=(1, 2))
    return _partition(x, window).reshape(b, -1, c)


def from_windows(x, resolution: int, window: int, shift: int):
    """Inverse of `to_windows`."""
    b, _, c = x.shape
    if window == resolution and not shift:
        return x
    x = _unpartition(x.reshape(-1, window * window, c), window, b, resolution, resolution)
    if shift:
        x = jnp.roll(x, (shift, shift), axis=(1, 2))
    return x.reshape(b, -1, c)


class PatchMerging(nnx.Module):
    """2x2 neighbourhood -> channels in the order x0=(even,even), x1=(odd,even), x2=(even,odd),
    x3=(odd,odd) [rows, cols], then LayerNorm(4C) and Linear(4C -> 2C, no bias)."""

    def __init__(self, dim: int, resolution: int, config: SwinConfig, *, rngs: nnx.Rngs):
        if resolution % 2:
            raise ValueError(f"patch merging needs an even resolution, got {resolution}")
        self.resolution = resolution
        self.norm = layers.layer_norm(4 * dim, eps=config.layer_norm_eps, rngs=rngs, axis_name="mlp")
        self.reduction = layers.dense(4 * dim, 2 * dim, ("mlp", "embed"), rngs=rngs, use_bias=False,
                                      kernel_init=swin_init, dtype=config.dtype)

    def __call__(self, x):
        b, _, c = x.shape
        r = self.resolution
        x = x.reshape(b, r, r, c)
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        return self.reduction(_norm(self.norm, x.reshape(b, (r // 2) ** 2, 4 * c), x.dtype))


class SwinStage(nnx.Module):
    def __init__(self, config: SwinConfig, stage: int, drop_paths: list[float], *, rngs: nnx.Rngs):
        dim = config.embed_dim * 2**stage
        res = stage_resolution(config, stage)
        window, shift = stage_window(config, stage)
        self.blocks = nnx.List([
            SwinBlock(dim, config.num_heads[stage], res, window, shift if i % 2 else 0, drop_paths[i], config,
                      rngs=rngs)
            for i in range(config.depths[stage])
        ])
        last = stage == len(config.depths) - 1
        self.downsample = None if last else PatchMerging(dim, res, config, rngs=rngs)
        self.remat = config.remat

    def __call__(self, x, *, deterministic: bool):
        def run(block, x):
            return block(x, deterministic=deterministic)

        if self.remat:  # per block: only its input is kept for the backward pass
            run = nnx.remat(run)
        order = None  # the shift whose window order x is in; None = row-major
        for block in self.blocks:
            if order != block.shift:
                geometry = block.resolution, block.window
                x = x if order is None else from_windows(x, *geometry, order)
                x, order = to_windows(x, *geometry, block.shift), block.shift
            x = run(block, x)
        x = from_windows(x, block.resolution, block.window, order)
        if self.downsample is not None:
            x = self.downsample(x)
        return constrain(x, ("batch", "length", "embed"))


class Swin(nnx.Module):
    """Swin encoder returning PIR's token sequence.

    `__call__(images (B, H, W, C) float, deterministic=True) -> (out, intermediates)`:
    `out` (B, 1 + N, C_last) = [mean of the normalised tokens, normalised tokens];
    intermediates: `tokens` (B, N, C_last) the final-normalised tokens (HF `last_hidden_state`),
    `pooled` (B, C_last) their mean (HF `pooler_output`, not re-normalised).
    """

    def __init__(self, config: SwinConfig, *, rngs: nnx.Rngs):
        self.config = config
        for s in range(len(config.depths)):  # validate the geometry up front
            stage_window(config, s)
        self.patch_embed = PatchEmbed(config, rngs=rngs)
        rates = drop_path_rates(config)
        starts = np.cumsum((0,) + tuple(config.depths))
        self.layers = nnx.List([
            SwinStage(config, s, rates[starts[s]:starts[s + 1]], rngs=rngs) for s in range(len(config.depths))
        ])
        self.norm = layers.layer_norm(config.num_features, eps=config.layer_norm_eps, rngs=rngs)

    def __call__(self, images, *, deterministic: bool = True):
        cfg = self.config
        want = (cfg.image_size, cfg.image_size, cfg.in_chans)
        if tuple(images.shape[1:]) != want:
            raise ValueError(f"Swin expects images (B, {want[0]}, {want[1]}, {want[2]}) NHWC, got {images.shape}")
        x = constrain(self.patch_embed(images), ("batch", "length", "embed"))
        for stage in self.layers:
            x = stage(x, deterministic=deterministic)
        tokens = _norm(self.norm, x, x.dtype)
        pooled = jnp.mean(tokens.astype(jnp.float32), axis=1).astype(tokens.dtype)
        out = jnp.concatenate([pooled[:, None], tokens], axis=1)
        return out, {"tokens": tokens, "pooled": pooled}
