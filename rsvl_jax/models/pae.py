"""PIR's Progressive Attention Encoder (PAE): attention blocks, VIR and LCA.

The blocks are post-norm transformer layers as in the reference: `MHSA` (self-attention) and
`CroSA` (cross-attention whose *key/value and residual stream* are the second argument and
whose query is the first). `vir` (Spatial-PAE) ranks the image tokens by their agreement
with the prior ("instruction") embedding, keeps the best `filter_size` and refines them;
`lca` (Temporal-PAE) refines the text tokens with queries mapped from the previous round.

`vir` and `lca` are functions over lists of blocks rather than modules so that the owning
model keeps the reference's flat parameter names (`img_sa.0.mhatt.linear_v`, ...).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from rsvl_jax.models.layers import attention_weights, dense, gelu_exact, layer_norm, merge_heads, split_heads

LN_EPS = 1e-5  # torch.nn.LayerNorm default, used by MHSA/CroSA norms and the FFN


def torch_bias_init(fan_in: int):
    """PyTorch's default Linear bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (§2.11)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_dense(fan_in: int, fan_out: int, axes, *, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.Linear:
    """A Linear initialised like a fresh torch.nn.Linear (the PIR heads train from scratch)."""
    return dense(fan_in, fan_out, axes, rngs=rngs, bias_init=torch_bias_init(fan_in), dtype=dtype)


def _norm(norm: nnx.LayerNorm, x):
    """LayerNorm in float32, result back in the compute dtype."""
    return norm(x.astype(jnp.float32)).astype(x.dtype)


class MHAtt(nnx.Module):
    """Multi-head attention called as `(value, key, query, mask)`, the reference's order.

    `mask` is boolean with True = attend (this repo's convention; the reference's unused mask
    argument has True = masked), broadcastable to (B, heads, Lq, Lk). Dropout acts on the
    attention probabilities. The output has the query's length.
    """

    def __init__(self, dim: int, heads: int, dropout: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
        if dim % heads:
            raise ValueError(f"MHAtt: dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.dtype = dtype
        self.linear_v = torch_dense(dim, dim, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.linear_k = torch_dense(dim, dim, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.linear_q = torch_dense(dim, dim, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.linear_merge = torch_dense(dim, dim, ("heads", "embed"), rngs=rngs, dtype=dtype)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, v, k, q, mask=None, *, deterministic: bool = True):
        v = split_heads(self.linear_v(v), self.heads)
        k = split_heads(self.linear_k(k), self.heads)
        q = split_heads(self.linear_q(q), self.heads)
        att = attention_weights(q, k, scale=q.shape[-1] ** -0.5, mask=mask)
        att = self.dropout(att, deterministic=deterministic)
        out = jnp.einsum("bhqk,bhkd->bhqd", att.astype(v.dtype), v)
        return self.linear_merge(merge_heads(out))


class FFN(nnx.Module):
    """The reference's `build_mlp(d, d)`: Linear(d, 2d) -> LayerNorm(2d) -> GELU(erf) -> Linear(2d, d).

    Reference Sequential indices: fc1 = `ffn.0`, norm = `ffn.1`, fc2 = `ffn.3`.
    """

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.fc1 = torch_dense(dim, 2 * dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.norm = layer_norm(2 * dim, eps=LN_EPS, rngs=rngs, axis_name="mlp")
        self.fc2 = torch_dense(2 * dim, dim, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x):
        return self.fc2(gelu_exact(_norm(self.norm, self.fc1(x))))


class MHSA(nnx.Module):
    """Post-norm self-attention block: x = LN1(x + drop(att(x, x, x))); x = LN2(x + drop(ffn(x)))."""

    def __init__(self, dim: int, heads: int, dropout: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.mhatt = MHAtt(dim, heads, dropout, rngs=rngs, dtype=dtype)
        self.ffn = FFN(dim, rngs=rngs, dtype=dtype)
        self.dropout1 = nnx.Dropout(dropout, rngs=rngs)
        self.norm1 = layer_norm(dim, eps=LN_EPS, rngs=rngs)
        self.dropout2 = nnx.Dropout(dropout, rngs=rngs)
        self.norm2 = layer_norm(dim, eps=LN_EPS, rngs=rngs)

    def __call__(self, x, mask=None, *, deterministic: bool = True):
        att = self.mhatt(x, x, x, mask, deterministic=deterministic)
        x = _norm(self.norm1, x + self.dropout1(att, deterministic=deterministic))
        return _norm(self.norm2, x + self.dropout2(self.ffn(x), deterministic=deterministic))


class CroSA(nnx.Module):
    """Post-norm cross-attention block; `x` is the query, `y` the key/value *and* the residual.

    y = LN1(y + drop(att(v=y, k=y, q=x))); y = LN2(y + drop(ffn(y))). The attention output has
    the query's length and is added to y, so x and y have the same length (as in PIR).
    """

    def __init__(self, dim: int, heads: int, dropout: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.mhatt_cross = MHAtt(dim, heads, dropout, rngs=rngs, dtype=dtype)
        self.ffn = FFN(dim, rngs=rngs, dtype=dtype)
        self.dropout1 = nnx.Dropout(dropout, rngs=rngs)
        self.norm1 = layer_norm(dim, eps=LN_EPS, rngs=rngs)
        self.dropout2 = nnx.Dropout(dropout, rngs=rngs)
        self.norm2 = layer_norm(dim, eps=LN_EPS, rngs=rngs)

    def __call__(self, x, y, mask=None, *, deterministic: bool = True):
        att = self.mhatt_cross(y, y, x, mask, deterministic=deterministic)
        y = _norm(self.norm1, y + self.dropout1(att, deterministic=deterministic))
        return _norm(self.norm2, y + self.dropout2(self.ffn(y), deterministic=deterministic))


def clones(factory: Callable[[], nnx.Module], n: int, *, identical: bool = True) -> nnx.List:
    """`n` modules from `factory`; with `identical` they start with the same parameters.

    The reference's `clones` deep-copies one initialised module, so all copies start equal
    (§7 Q18). We build `n` modules (each keeps its own dropout RNG stream, so dropout masks
    still differ between copies) and then copy the first one's parameters into the others.
    """
    mods = [factory() for _ in range(n)]
    if identical and n > 1:
        params = nnx.state(mods[0], nnx.Param)
        for m in mods[1:]:
            nnx.update(m, params)
    return nnx.List(mods)


# ----------------------------------------------------------------------------------------
# VIR (Spatial-PAE) and LCA (Temporal-PAE).
# ----------------------------------------------------------------------------------------
def belief_order(tokens, instruction, *, sort_on_logits: bool = False):
    """Belief scores softmax_j <tokens_j, instruction> and the descending token order.

    The reference sorts the softmax values; large logit gaps underflow many of them to 0 and
    the order of those ties is whatever CUDA's unstable sort gives (§7 Q14). We break ties by
    ascending token index (a stable sort of the negated key); `sort_on_logits` sorts the raw
    logits instead (the fix: no underflow ties). Returns (scores (B, N) f32, order (B, N)).
    """
    logits = jnp.einsum(
        "bnd,bd->bn", tokens.astype(jnp.float32), instruction.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    scores = jax.nn.softmax(logits, axis=-1)
    key = logits if sort_on_logits else scores
    order = jnp.argsort(-key, axis=-1, stable=True)
    return scores, order


def vir(
    tokens,
    instruction,
    sa_blocks: Sequence[MHSA],
    ca_blocks: Sequence[CroSA],
    mappings: Sequence[nnx.Linear],
    *,
    filter_size: int,
    sort_on_logits: bool = False,
    deterministic: bool = True,
):
    """Vision Instruction Representation (Spatial-PAE) on projected tokens (B, N, D).

    Keeps the `filter_size` tokens with the highest belief (fewer if N is smaller, like the
    reference's slicing), then runs rounds of [self-attention, cross-attention with the
    query = mappings[i](instruction) repeated on every row]. The instruction is not updated
    between rounds. Returns (refined token 0 (B, D), intermediates).
    """
    if not sa_blocks or not (len(sa_blocks) == len(ca_blocks) == len(mappings)):
        raise ValueError("vir needs instru_num >= 1 rounds of (self block, cross block, mapping)")
    scores, order = belief_order(tokens, instruction, sort_on_logits=sort_on_logits)
    selected = order[:, :filter_size]
    z = jnp.take_along_axis(tokens, selected[..., None], axis=1)
    for sa, ca, mapping in zip(sa_blocks, ca_blocks, mappings):
        a = sa(z, deterministic=deterministic)
        # Mapping one row then broadcasting equals mapping the broadcast rows; keeping all
        # rows as queries lets attention dropout differ per row, as in the reference.
        q = jnp.broadcast_to(mapping(instruction)[:, None, :], a.shape)
        z = ca(q, a, deterministic=deterministic)
    inter = {"belief_scores": scores, "sorted_index": order, "selected_index": selected, "tokens": z}
    return z[:, 0], inter


def lca(
    tokens,
    sa_blocks: Sequence[MHSA],
    ca_blocks: Sequence[CroSA],
    mappings: Sequence[nnx.Linear],
    *,
    mask=None,
    deterministic: bool = True,
):
    """Language Cycle Attention (Temporal-PAE) on projected tokens (B, L, D).

    Each round: A = self-attention(E); E = cross-attention(query = mappings[i](E), kv = A).
    `mask` (B, L) bool, True = real token, is only given in the `text_mask` fix; the
    reference attends to padding (§7 Q5). Returns (refined token 0 (B, D), intermediates).
    """
    if not sa_blocks or not (len(sa_blocks) == len(ca_blocks) == len(mappings)):
        raise ValueError("lca needs cycle_num >= 1 rounds of (self block, cross block, mapping)")
    att_mask = None if mask is None else mask.astype(bool)[:, None, None, :]
    e = tokens
    for sa, ca, mapping in zip(sa_blocks, ca_blocks, mappings):
        a = sa(e, att_mask, deterministic=deterministic)
        e = ca(mapping(e), a, att_mask, deterministic=deterministic)
    return e[:, 0], {"tokens": e}
