"""ResNet-50 trunk (torchvision v1.5 layout): PIR's frozen "prior" / instruction encoder.

Stride sits on the 3x3 conv of a bottleneck; every stage's first block has a downsample
(1x1 conv + BN), stage 1 included (channels change 64 -> 256). The classifier is not built:
the output is the global-average-pooled feature (B, 32 * width) = (B, 2048).

BatchNorm (spec §2.3, quirk Q3): the reference freezes the ResNet's weights but leaves it in
train mode, so during training BN normalises with the batch statistics and updates its
running statistics. `bn_mode="pir_train"` mirrors that when called with `train=True`;
`bn_mode="inference"` (the fix, and the default) always uses the running statistics. The
statistics are `nnx.BatchStat` variables: the trainer keeps them out of the optimizer and
carries them as state.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    layers: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64  # stem channels; stage k has 3x3 width width*2^k and output 4*width*2^k
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1  # PyTorch convention: new = (1 - m) * running + m * batch
    bn_mode: str = "inference"  # or "pir_train" (quirk Q3, see the module docstring)
    # "pir_train" only: batch statistics per consecutive group of this many images, as the
    # reference computes them per GPU (128); the running statistics follow group 0, because
    # DDP broadcasts rank 0's buffers before every forward. 0 = the whole batch is one group.
    bn_group_size: int = 0
    dtype: Any = jnp.float32

    @property
    def features(self) -> int:
        return 4 * self.width * 2 ** (len(self.layers) - 1)


PRESETS: dict[str, ResNetConfig] = {
    "resnet50": ResNetConfig(),
    "resnet50_pir_train": ResNetConfig(bn_mode="pir_train"),
    "resnet_test": ResNetConfig(layers=(1, 1, 1, 1), width=8),
}

# torchvision's init: kaiming_normal_(mode="fan_out", nonlinearity="relu"), untruncated.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class Conv(nnx.Conv):
    """nnx.Conv whose 1x1 convolutions (36 of ResNet-50's 53) run as a matrix product over the
    channels after the stride's subsampling: the same numbers, and on CPUs faster than XLA's
    convolution kernels. The parameters are nnx.Conv's, so converters are unchanged."""

    def __call__(self, x):
        if self.kernel_size != (1, 1) or self.padding != ((0, 0), (0, 0)) or self.use_bias:
            return super().__call__(x)
        sh, sw = self.strides
        dtype = self.dtype or jnp.result_type(x, self.kernel[...])
        x = x[:, ::sh, ::sw, :].astype(dtype)
        kernel = self.kernel[...].astype(dtype)[0, 0]
        return jnp.einsum("bhwc,cd->bhwd", x, kernel, precision=self.precision)


def _conv(cin: int, cout: int, k: int, stride: int, cfg: ResNetConfig, rngs: nnx.Rngs) -> nnx.Conv:
    # Explicit symmetric padding k//2 as PyTorch (SAME would pad (2, 3) for the 7x7/2 stem).
    p = k // 2
    return Conv(
        cin, cout, (k, k), strides=(stride, stride), padding=((p, p), (p, p)), use_bias=False,
        kernel_init=nnx.with_partitioning(_conv_init, (None, None, "conv_in", "conv_out")),
        dtype=cfg.dtype, param_dtype=jnp.float32, rngs=rngs,
    )


class BatchNorm(nnx.Module):
    """BatchNorm over (N, H, W) with PyTorch's update rule.

    nnx.BatchNorm updates the running variance with the biased batch variance; PyTorch (and so
    the reference) normalises with the biased one but stores the *unbiased* one (x n/(n-1)).
    """

    def __init__(self, channels: int, cfg: ResNetConfig):
        axes = ("conv_out",)
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32), out_sharding=axes)
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32), out_sharding=axes)
        self.mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32), out_sharding=axes)
        self.var = nnx.BatchStat(jnp.ones((channels,), jnp.float32), out_sharding=axes)
        self.eps = cfg.bn_eps
        self.momentum = cfg.bn_momentum
        self.group = cfg.bn_group_size

    def __call__(self, x, *, batch_stats: bool):
        dtype = x.dtype
        x = x.astype(jnp.float32)
        if not batch_stats:
            y = (x - self.mean[...]) * jax.lax.rsqrt(self.var[...] + self.eps)
            return (y * self.scale[...] + self.bias[...]).astype(dtype)
        b, h, w, c = x.shape
        g = self.group or b
        if b % g:
            raise ValueError(f"batch {b} is not a multiple of bn_group_size {g}")
        n = g * h * w
        if n < 2:  # PyTorch raises too: an unbiased variance needs two values
            raise ValueError(f"BatchNorm in batch-statistics mode needs > 1 value per channel, got {x.shape}")
        xg = x.reshape(b // g, g, h, w, c)
        mean = xg.mean(axis=(1, 2, 3), keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 3), keepdims=True)  # biased, for normalising
        y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        m = self.momentum
        self.mean[...] = (1 - m) * self.mean[...] + m * mean[0, 0, 0, 0]
        self.var[...] = (1 - m) * self.var[...] + m * var[0, 0, 0, 0] * (n / (n - 1))  # unbiased, as PyTorch
        return (y * self.scale[...] + self.bias[...]).astype(dtype)


class Bottleneck(nnx.Module):
    """1x1 -> BN -> ReLU -> 3x3/stride -> BN -> ReLU -> 1x1 (x4) -> BN, + shortcut, ReLU."""

    def __init__(self, cin: int, planes: int, stride: int, downsample: bool, cfg: ResNetConfig, *, rngs: nnx.Rngs):
        cout = 4 * planes
        self.conv1 = _conv(cin, planes, 1, 1, cfg, rngs)
        self.bn1 = BatchNorm(planes, cfg)
        self.conv2 = _conv(planes, planes, 3, stride, cfg, rngs)
        self.bn2 = BatchNorm(planes, cfg)
        self.conv3 = _conv(planes, cout, 1, 1, cfg, rngs)
        self.bn3 = BatchNorm(cout, cfg)
        self.down_conv = _conv(cin, cout, 1, stride, cfg, rngs) if downsample else None
        self.down_bn = BatchNorm(cout, cfg) if downsample else None

    def __call__(self, x, *, batch_stats: bool):
        y = nnx.relu(self.bn1(self.conv1(x), batch_stats=batch_stats))
        y = nnx.relu(self.bn2(self.conv2(y), batch_stats=batch_stats))
        y = self.bn3(self.conv3(y), batch_stats=batch_stats)
        if self.down_conv is not None:
            x = self.down_bn(self.down_conv(x), batch_stats=batch_stats)
        return nnx.relu(y + x)


class ResNet(nnx.Module):
    """Images NHWC (B, H, W, 3) -> pooled features (B, config.features)."""

    def __init__(self, config: ResNetConfig, *, rngs: nnx.Rngs):
        if config.bn_mode not in ("inference", "pir_train"):
            raise ValueError(f"bn_mode must be 'inference' or 'pir_train', got {config.bn_mode!r}")
        self.config = config
        w = config.width
        self.conv1 = _conv(3, w, 7, 2, config, rngs)
        self.bn1 = BatchNorm(w, config)
        stages, cin = [], w
        for k, depth in enumerate(config.layers):
            planes = w * 2**k
            blocks = []
            for b in range(depth):
                stride = 2 if (k > 0 and b == 0) else 1
                blocks.append(Bottleneck(cin, planes, stride, b == 0, config, rngs=rngs))
                cin = 4 * planes
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)

    def __call__(self, images, *, train: bool = False):
        batch_stats = train and self.config.bn_mode == "pir_train"
        x = images.astype(self.config.dtype)
        x = nnx.relu(self.bn1(self.conv1(x), batch_stats=batch_stats))
        # 3x3/2 max-pool, padding 1 filled with -inf (as PyTorch's MaxPool2d(3, 2, 1)).
        x = jax.lax.reduce_window(
            x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
        )
        for stage in self.stages:
            for block in stage:
                x = block(x, batch_stats=batch_stats)
        # Global average pool to (B, C). The reference `.squeeze()`s a (B, C, 1, 1) map, which
        # also drops the batch axis at B = 1 and then crashes (quirk Q4); a reshape cannot.
        return x.astype(jnp.float32).mean(axis=(1, 2)).reshape(x.shape[0], -1).astype(self.config.dtype)
