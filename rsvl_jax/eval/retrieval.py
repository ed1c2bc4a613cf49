"""Image-text retrieval metrics (R@1/5/10 both ways and their mean), spec PIR §5.

Reference rules: for an image query the candidates are ordered by
``np.argsort(row)[::-1]`` and its rank is the best position among its ground-truth
captions; for a caption query the rank is the position of its one image. R@K is the
percentage of queries with rank < K.

Ranking runs on device: a candidate's position is the number of strictly higher scores,
which equals the reference's position whenever the ground truth is tied with nothing.
Queries with a tie on a ground-truth score (duplicate captions give identical embeddings)
or a NaN are re-ranked on host with the reference's own ``np.argsort(...)[::-1]``, so tie
order is whatever NumPy's sort does, exactly as in the reference.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_NO_RANK = np.iinfo(np.int32).max  # an image without captions never counts as a hit


def build_eval_index(captions_per_image):
    """Flat retrieval index for an eval file read in order (spec PIR §1.1).

    ``captions_per_image``: per image, either its caption list or its caption count.
    Returns ``(img2txt, txt2img)``: ``img2txt[i]`` lists the flat caption indices of
    image i, ``txt2img[t]`` is the image of caption t.
    """
    img2txt, txt2img = [], []
    for img, caps in enumerate(captions_per_image):
        count = caps if isinstance(caps, (int, np.integer)) else len(caps)
        img2txt.append(list(range(len(txt2img), len(txt2img) + count)))
        txt2img.extend([img] * count)
    return img2txt, txt2img


def _pad_gt(img2txt):
    width = max(1, max((len(g) for g in img2txt), default=0))
    out = np.full((len(img2txt), width), -1, np.int32)
    for i, g in enumerate(img2txt):
        out[i, :len(g)] = g
    return out


@jax.jit
def _device_ranks(sims, gt_txt, txt2img):
    """Optimistic ranks (count of strictly greater scores) and a per-query 'needs host' flag."""
    valid = gt_txt >= 0
    gt_i2t = jnp.take_along_axis(sims, jnp.where(valid, gt_txt, 0), axis=1)        # (Ni, K)
    greater = jnp.sum(sims[:, None, :] > gt_i2t[:, :, None], axis=-1)               # (Ni, K)
    equal = jnp.sum(sims[:, None, :] == gt_i2t[:, :, None], axis=-1) - 1
    rank_i2t = jnp.min(jnp.where(valid, greater, _NO_RANK), axis=1)
    nan_rows = jnp.any(jnp.isnan(sims), axis=1)
    host_i2t = jnp.any(valid & (equal > 0), axis=1) | nan_rows

    gt_t2i = sims[txt2img, jnp.arange(sims.shape[1])]                                # (Nt,)
    rank_t2i = jnp.sum(sims > gt_t2i[None, :], axis=0)
    ties_t2i = jnp.sum(sims == gt_t2i[None, :], axis=0) - 1
    host_t2i = (ties_t2i > 0) | jnp.any(jnp.isnan(sims), axis=0)
    return rank_i2t, host_i2t, rank_t2i, host_t2i


def _host_rank(row, gt):
    """The reference's rule for one query: best position of any gt in argsort(row)[::-1]."""
    order = np.argsort(row)[::-1]
    pos = np.empty_like(order)
    pos[order] = np.arange(len(order))
    return min((int(pos[g]) for g in gt), default=_NO_RANK)


def retrieval_ranks(sims_i2t, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int]):
    """Per-query ranks: (image→text ranks (N_img,), text→image ranks (N_txt,)), int64 numpy."""
    sims = jnp.asarray(sims_i2t)
    n_img, n_txt = sims.shape
    if len(img2txt) != n_img or len(txt2img) != n_txt:
        raise ValueError(f"sims is {n_img}x{n_txt} but img2txt has {len(img2txt)} images "
                         f"and txt2img {len(txt2img)} captions")
    txt2img = np.asarray(txt2img, np.int32)
    outs = _device_ranks(sims, jnp.asarray(_pad_gt(img2txt)), jnp.asarray(txt2img))
    rank_i2t, host_i2t, rank_t2i, host_t2i = (np.asarray(x) for x in outs)
    rank_i2t, rank_t2i = rank_i2t.astype(np.int64), rank_t2i.astype(np.int64)

    rows = np.flatnonzero(host_i2t)
    if rows.size:
        sub = np.asarray(sims[rows])
        for r, row in zip(rows, sub):
            rank_i2t[r] = _host_rank(row, img2txt[r])
    cols = np.flatnonzero(host_t2i)
    if cols.size:
        sub = np.asarray(sims[:, cols]).T
        for c, col in zip(cols, sub):
            rank_t2i[c] = _host_rank(col, [txt2img[c]])
    return rank_i2t, rank_t2i


def _recall(ranks, k):
    return 100.0 * int(np.sum(ranks < k)) / len(ranks)  # same float ops as the reference


def itm_metrics(sims_i2t, img2txt, txt2img, ndigits: int | None = 2):
    """R@1/5/10 for image→text (``txt_r*``) and text→image (``img_r*``), their means and
    ``r_mean`` (= mR, the mean of the six), from the (N_img, N_txt) similarity matrix.

    Values are percentages rounded with Python's ``round(x, ndigits)`` like the reference
    (means are computed from unrounded values); ``ndigits=None`` leaves them unrounded.
    The reference reports the same keys minus ``txt_r_mean``/``img_r_mean``.
    """
    rank_i2t, rank_t2i = retrieval_ranks(sims_i2t, img2txt, txt2img)
    tr = [_recall(rank_i2t, k) for k in (1, 5, 10)]
    ir = [_recall(rank_t2i, k) for k in (1, 5, 10)]
    tr_mean, ir_mean = (tr[0] + tr[1] + tr[2]) / 3, (ir[0] + ir[1] + ir[2]) / 3
    out = {"txt_r1": tr[0], "txt_r5": tr[1], "txt_r10": tr[2], "txt_r_mean": tr_mean,
           "img_r1": ir[0], "img_r5": ir[1], "img_r10": ir[2], "img_r_mean": ir_mean,
           "r_mean": (tr_mean + ir_mean) / 2}
    if ndigits is not None:
        out = {k: round(v, ndigits) for k, v in out.items()}
    return out
