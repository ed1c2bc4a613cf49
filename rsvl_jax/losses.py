"""Training losses of PIR and BITA.

Every loss is a pure function of arrays, computed in float32 with no Python control flow
on values, so it can sit inside a jitted train step. Losses act on the *global* batch:
under ``jax.jit`` with a batch sharded over devices, the (N, N) matrices below are what
the references build with an all-gather (ARCHITECTURE §3).

Gradients are those of the global loss. The PIR reference's all-gather backward keeps only
the local slice, so its feature-path gradients are 1/W of these (spec PIR §3.1, Q10);
with Adam the scale hardly matters, otherwise the caller rescales.

Dot products use ``Precision.HIGHEST``: the matrices are small (N <= a few hundred) and
on GPU/TPU the default f32 matmul precision would otherwise drift from the fixtures.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


def _f32(*xs):
    return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def _diag_nll(logits):
    """-mean_i log_softmax(logits)[i, i], i.e. cross-entropy with targets = arange(N)."""
    return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))


# ----------------------------------------------------------------------------- PIR


def pir_contrastive_loss(image_feat, text_feat, temp, idx=None):
    """PIR contrastive loss (spec PIR §3.2) on L2-normalised (N, D) features.

    logits = I Tᵀ / temp (a division by an unclamped learnable temperature, as in the
    reference). With ``idx`` (N,), every pair sharing an image index is a positive and the
    target row is uniform over them; without it, targets are the diagonal (CLIP loss).
    The same symmetric target matrix is used for both directions.
    """
    img, txt, temp = _f32(image_feat, text_feat, temp)
    logits = jnp.matmul(img, txt.T, precision=_HI) / temp
    if idx is None:
        return 0.5 * (_diag_nll(logits) + _diag_nll(logits.T))
    idx = jnp.asarray(idx).reshape(-1)
    pos = (idx[:, None] == idx[None, :]).astype(jnp.float32)
    targets = pos / pos.sum(axis=1, keepdims=True)
    loss_i2t = -jnp.mean(jnp.sum(jax.nn.log_softmax(logits, axis=1) * targets, axis=1))
    loss_t2i = -jnp.mean(jnp.sum(jax.nn.log_softmax(logits.T, axis=1) * targets, axis=1))
    return 0.5 * (loss_i2t + loss_t2i)


def _num_shards(n, num_shards, shard_size):
    """Number of equal consecutive shards of a batch of n; shard_size wins when given."""
    if shard_size is not None:
        if num_shards != 1:
            raise ValueError("pass either num_shards or shard_size, not both")
        if shard_size < 1 or n % shard_size:
            raise ValueError(f"batch of {n} is not a multiple of shard_size={shard_size}")
        return n // shard_size
    if num_shards < 1 or n % num_shards:
        raise ValueError(f"batch of {n} cannot be split into {num_shards} equal shards")
    return num_shards


def scene_centres(feat, labels, num_shards=1):
    """Per-sample mean of the features of its scene class, within its own shard.

    Row i of the result is the (unnormalised) mean of ``feat[j]`` over the samples j of
    i's shard with ``labels[j] == labels[i]``. Shards are consecutive equal slices of the
    batch, i.e. the per-device batches of the reference.
    """
    n, d = feat.shape
    x = jnp.asarray(feat, jnp.float32).reshape(num_shards, n // num_shards, d)
    lab = jnp.asarray(labels).reshape(num_shards, n // num_shards)
    same = (lab[:, :, None] == lab[:, None, :]).astype(jnp.float32)
    centres = jnp.einsum("sij,sjd->sid", same, x, precision=_HI)
    return (centres / same.sum(axis=-1, keepdims=True)).reshape(n, d)


def pir_affiliation_loss(image_feat, text_feat, labels, temp2, *, num_shards=1,
                         shard_size=None, fix_t2i_transpose=False):
    """PIR affiliation ("cluster-wise") loss (spec PIR §3.3, quirk Q9).

    Scene-class centres are computed per shard (``num_shards`` equal slices, or slices of
    ``shard_size``): the reference computes them per device batch (128) before gathering,
    so reproduce a 2-GPU run on one device with ``shard_size=128``. Same-class samples of a
    shard get identical centre columns that compete with the target (mirrored).

    i2t: each image against all text centres, target = its own row.
    t2i: the reference log-softmaxes the *transposed* text→image-centre matrix, so each
    image centre is scored against all texts (mirrored by default). ``fix_t2i_transpose``
    scores each text against all image centres instead (the evident intent).
    The width is taken from the inputs (the reference hard-codes 512).
    """
    img, txt, temp2 = _f32(image_feat, text_feat, temp2)
    s = _num_shards(img.shape[0], num_shards, shard_size)
    img_c, txt_c = scene_centres(img, labels, s), scene_centres(txt, labels, s)
    i2t = jnp.matmul(img, txt_c.T, precision=_HI) / temp2
    t2i = jnp.matmul(txt, img_c.T, precision=_HI) / temp2
    loss_t2i = _diag_nll(t2i if fix_t2i_transpose else t2i.T)
    return 0.5 * (_diag_nll(i2t) + loss_t2i)


def triplet_loss(image_feat, text_feat, margin=0.2, max_violation=False):
    """VSE++ hinge loss on S = I Tᵀ (spec PIR §3.4); returns the *sum*, like the reference.

    Positives are the diagonal only (idx is ignored). ``max_violation`` keeps the hardest
    negative per image (row) and per caption (column).
    """
    img, txt = _f32(image_feat, text_feat)
    scores = jnp.matmul(img, txt.T, precision=_HI)
    diag = jnp.diagonal(scores)
    off = 1.0 - jnp.eye(scores.shape[0], dtype=jnp.float32)
    cost_s = jax.nn.relu(margin + scores - diag[:, None]) * off   # captions for image i
    cost_im = jax.nn.relu(margin + scores - diag[None, :]) * off  # images for caption j
    if max_violation:
        cost_s, cost_im = cost_s.max(axis=1), cost_im.max(axis=0)
    return cost_s.sum() + cost_im.sum()


# ----------------------------------------------------------------------------- BITA


def smoothed_cross_entropy(logits, targets, label_smoothing=0.0):
    """Mean over rows of PyTorch's ``cross_entropy(..., label_smoothing=eps)``:
    (1-eps)·(-log p_y) + eps·mean_c(-log p_c)."""
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    smooth = -jnp.mean(logp, axis=-1)
    return jnp.mean((1.0 - label_smoothing) * nll + label_smoothing * smooth)


def bita_itc_similarities(image_feats, text_feat, temp, *, stop_gradient_other=True):
    """Query-max similarities of BITA stage 1 (spec BITA §3 step 5).

    image_feats (N, Nq, D) and text_feat (N, D) are L2-normalised.
    sim_i2t[b, j] = max_q <img[b, q], txt[j]> / temp; sim_t2i[b, j] = max_q <txt[b], img[j, q]> / temp
    (the max comes before the division). The reference gathers the "other" side without
    gradient, so i2t only trains the image path and t2i only the text path;
    ``stop_gradient_other=False`` lets gradients flow both ways.
    """
    img, txt, temp = _f32(image_feats, text_feat, temp)
    sg = jax.lax.stop_gradient if stop_gradient_other else (lambda x: x)
    sim_i2t = jnp.einsum("bqd,jd->bqj", img, sg(txt), precision=_HI).max(axis=1) / temp
    sim_t2i = jnp.einsum("bd,jqd->bjq", txt, sg(img), precision=_HI).max(axis=-1) / temp
    return sim_i2t, sim_t2i


def bita_itc_loss(image_feats, text_feat, temp, *, label_smoothing=0.1,
                  stop_gradient_other=True):
    """BITA image-text contrastive loss (spec BITA §3): the average of the label-smoothed
    cross-entropies of sim_i2t and sim_t2i, target = own slot in the global batch.

    Over the global batch this equals the reference's per-rank loss averaged by DDP
    (targets ``rank·B + arange(B)`` against gathered columns).
    """
    sim_i2t, sim_t2i = bita_itc_similarities(
        image_feats, text_feat, temp, stop_gradient_other=stop_gradient_other)
    targets = jnp.arange(sim_i2t.shape[0])
    return 0.5 * (smoothed_cross_entropy(sim_i2t, targets, label_smoothing)
                  + smoothed_cross_entropy(sim_t2i, targets, label_smoothing))


def token_cross_entropy(logits, targets, ignore_index=-100):
    """Mean token cross-entropy over targets != ignore_index (HF's LM loss reduction).

    No shifting here: the caller aligns logits[t] with targets[t]. Where every target is
    ignored the result is 0 (PyTorch would return NaN), so a fully-masked batch cannot
    poison training.
    """
    logits = jnp.asarray(logits, jnp.float32)
    valid = targets != ignore_index
    safe = jnp.where(valid, targets, 0)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    count = valid.sum()
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1)
