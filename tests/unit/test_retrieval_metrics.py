"""Retrieval metrics: the reference's golden output and a brute-force NumPy re-statement."""
import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rsvl_jax.eval.retrieval import build_eval_index, itm_metrics, retrieval_ranks


def brute_ranks(sims, img2txt, txt2img):
    """Spec PIR §5 step 4, one query at a time with np.argsort(row)[::-1]."""
    r_i2t = np.zeros(len(sims))
    for i, row in enumerate(sims):
        inds = np.argsort(row)[::-1]
        r_i2t[i] = min([np.where(inds == t)[0][0] for t in img2txt[i]], default=1e20)
    r_t2i = np.zeros(sims.shape[1])
    for t, row in enumerate(sims.T):
        inds = np.argsort(row)[::-1]
        r_t2i[t] = np.where(inds == txt2img[t])[0][0]
    return r_i2t, r_t2i


def brute_metrics(sims, img2txt, txt2img):
    r_i2t, r_t2i = brute_ranks(sims, img2txt, txt2img)
    tr = [100.0 * len(np.where(r_i2t < k)[0]) / len(r_i2t) for k in (1, 5, 10)]
    ir = [100.0 * len(np.where(r_t2i < k)[0]) / len(r_t2i) for k in (1, 5, 10)]
    tm, im = sum(tr) / 3, sum(ir) / 3
    return {"txt_r1": tr[0], "txt_r5": tr[1], "txt_r10": tr[2], "img_r1": ir[0], "img_r5": ir[1],
            "img_r10": ir[2], "txt_r_mean": tm, "img_r_mean": im, "r_mean": (tm + im) / 2}


def test_reproduces_reference_itm_eval(fixtures_dir):
    meta = json.loads((fixtures_dir / "pir" / "itm_eval.json").read_text())
    sims = np.load(fixtures_dir / "pir" / "itm_eval_sims.npy")
    img2txt, txt2img = build_eval_index([meta["captions_per_image"]] * meta["n_img"])
    got = itm_metrics(sims, img2txt, txt2img)
    for key, value in meta["result"].items():
        assert got[key] == value, key  # exact: same rounding as the reference
    raw = itm_metrics(sims, img2txt, txt2img, ndigits=None)
    assert got["r_mean"] == round((raw["txt_r_mean"] + raw["img_r_mean"]) / 2, 2)


def test_build_eval_index():
    img2txt, txt2img = build_eval_index([["a", "b"], 3, []])
    assert img2txt == [[0, 1], [2, 3, 4], []]
    assert txt2img == [0, 0, 1, 1, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 7, size=23)
    img2txt, txt2img = build_eval_index(counts)
    sims = rng.normal(size=(len(counts), len(txt2img))).astype(np.float32)
    coarse = np.round(sims, 1)  # many exact ties
    coarse[:, 5] = coarse[:, 6]  # a duplicated caption, as in RSICD
    coarse[3] = coarse[4]  # and a duplicated image
    for s in (sims, coarse):
        want_i2t, want_t2i = brute_ranks(s, img2txt, txt2img)
        got_i2t, got_t2i = retrieval_ranks(s, img2txt, txt2img)
        np.testing.assert_array_equal(got_i2t, want_i2t)
        np.testing.assert_array_equal(got_t2i, want_t2i)
        want = brute_metrics(s, img2txt, txt2img)
        got = itm_metrics(s, img2txt, txt2img, ndigits=None)
        assert got == pytest.approx(want, abs=0)
    # The tie rule must matter on this data: counting strictly-greater scores alone differs.
    naive = (coarse > coarse[txt2img, np.arange(len(txt2img))][None, :]).sum(0)
    assert np.any(naive != brute_ranks(coarse, img2txt, txt2img)[1])


def test_image_without_captions_and_nan_rows():
    rng = np.random.default_rng(3)
    img2txt, txt2img = build_eval_index([2, 0, 3])
    sims = rng.normal(size=(3, 5)).astype(np.float32)
    sims[2, 1] = np.nan
    want = brute_metrics(sims, img2txt, txt2img)
    assert itm_metrics(sims, img2txt, txt2img, ndigits=None) == pytest.approx(want, abs=0)


def test_sharded_similarity_matrix():
    devices = np.array(jax.devices())
    if len(devices) < 2:
        pytest.skip("needs several (simulated) devices")
    mesh = Mesh(devices, ("data",))
    rng = np.random.default_rng(4)
    n_img = 2 * len(devices)
    img2txt, txt2img = build_eval_index([5] * n_img)
    sims = np.round(rng.normal(size=(n_img, 5 * n_img)), 1).astype(np.float32)
    sharded = jax.device_put(sims, NamedSharding(mesh, P("data", None)))
    assert itm_metrics(sharded, img2txt, txt2img) == itm_metrics(sims, img2txt, txt2img)
    assert itm_metrics(sims, img2txt, txt2img, ndigits=None) == pytest.approx(
        brute_metrics(sims, img2txt, txt2img), abs=0)
