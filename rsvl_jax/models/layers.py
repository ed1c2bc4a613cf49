"""Shared building blocks with logical axis names on every parameter.

Every model in `rsvl_jax.models` builds its parameters through these helpers so that
(a) each parameter carries logical axis names that `parallel.py` maps to mesh axes, and
(b) numerics match PyTorch: exact GELU where the reference uses erf, explicit LayerNorm eps,
softmax in float32, masks as a large finite negative (never -inf, which NaNs on empty rows).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# Finite "minus infinity" for masked attention logits (float32 softmax).
MASK_VALUE = -1e9

# PyTorch's default init for nn.Linear / nn.Conv is kaiming_uniform(a=sqrt(5)), i.e.
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)); for nn.Embedding it is N(0, 1). Models that are trained
# from scratch in the reference (PIR heads) use these so a fresh run starts like the reference.
torch_linear_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
bert_init = nnx.initializers.normal(0.02)


def _part(init, axes: Sequence[str | None] | None):
    return init if axes is None else nnx.with_partitioning(init, tuple(axes))


def dense(
    in_features: int,
    out_features: int,
    axes: Sequence[str | None] = ("embed", "mlp"),
    *,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    kernel_init=torch_linear_init,
    bias_init=nnx.initializers.zeros_init(),
    dtype=None,
) -> nnx.Linear:
    """A Linear layer whose kernel is (in, out) with logical `axes` (bias takes axes[-1])."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        kernel_init=_part(kernel_init, axes),
        bias_init=_part(bias_init, (axes[-1],)),
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def layer_norm(dim: int, *, eps: float, rngs: nnx.Rngs, axis_name: str | None = "embed") -> nnx.LayerNorm:
    """LayerNorm with an explicit eps (Flax's default 1e-6 matches none of our references).

    `use_fast_variance=False` computes E[(x - mean)^2], as PyTorch does, for parity.
    """
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        use_fast_variance=False,
        scale_init=_part(nnx.initializers.ones_init(), (axis_name,)),
        bias_init=_part(nnx.initializers.zeros_init(), (axis_name,)),
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def embedding(num: int, dim: int, *, rngs: nnx.Rngs, axes=("vocab", "embed"), init=bert_init) -> nnx.Embed:
    return nnx.Embed(num, dim, embedding_init=_part(init, axes), param_dtype=jnp.float32, rngs=rngs)


def param(rngs: nnx.Rngs, init, shape, axes: Sequence[str | None]) -> nnx.Param:
    """A free-standing parameter (class tokens, position tables, temperatures)."""
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=tuple(axes))


def gelu_exact(x):
    """GELU with erf, as torch.nn.GELU() (Flax's default is the tanh approximation)."""
    return jax.nn.gelu(x, approximate=False)


def quick_gelu(x):
    """OpenAI CLIP's x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def split_heads(x, num_heads: int):
    """(B, L, H*Dh) -> (B, H, L, Dh)."""
    b, l, d = x.shape
    return x.reshape(b, l, num_heads, d // num_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, H, L, Dh) -> (B, L, H*Dh)."""
    b, h, l, dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, l, h * dh)


def attention_weights(q, k, *, scale: float, mask=None, bias=None):
    """Softmax attention probabilities in float32.

    q: (B, H, Lq, Dh), k: (B, H, Lk, Dh). `mask` is boolean, True = attend, broadcastable to
    (B, H, Lq, Lk); `bias` is added to the logits (relative positions, additive masks).
    """
    logits = jnp.einsum("bhqd,bhkd->bhqk", q * scale, k).astype(jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, MASK_VALUE)
    return jax.nn.softmax(logits, axis=-1)


class DropPath(nnx.Module):
    """Per-sample stochastic depth with keep-probability rescaling (timm's drop_path)."""

    def __init__(self, rate: float, *, rngs: nnx.Rngs):
        self.rate = rate
        self.rngs = rngs["dropout"].fork() if rate > 0 else None

    def __call__(self, x, *, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.rngs(), keep, shape)
        return jnp.where(mask, x / keep, 0.0).astype(x.dtype)
