"""Losses against the reference's golden values (PIR) and brute force / PyTorch (BITA, LM)."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from rsvl_jax import losses as L


@pytest.fixture(scope="module")
def pir(fixtures_dir):
    return dict(np.load(fixtures_dir / "pir" / "pir_losses.npz"))


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- PIR fixture


def test_pir_loss_values_match_reference(pir):
    @jax.jit
    def all_losses(img, txt, idx, lab, temp, temp2):
        return {
            "loss_contr": L.pir_contrastive_loss(img, txt, temp, idx),
            "loss_contr_noidx": L.pir_contrastive_loss(img, txt, temp),
            "loss_affil": L.pir_affiliation_loss(img, txt, lab, temp2),
            "loss_triplet": L.triplet_loss(img, txt),
            "loss_triplet_maxviol": L.triplet_loss(img, txt, max_violation=True),
        }

    got = all_losses(*(pir[k] for k in ("img", "txt", "idx", "label", "temp", "temp2")))
    for key, value in got.items():
        np.testing.assert_allclose(float(value), pir[key], rtol=1e-6, atol=1e-6, err_msg=key)


def test_pir_gradients_match_reference(pir):
    """d(loss_contr + loss_affil) / d(img, txt, temp, temp2), world size 1."""
    idx, lab = pir["idx"], pir["label"]

    def total(img, txt, temp, temp2):
        return L.pir_contrastive_loss(img, txt, temp, idx) + L.pir_affiliation_loss(img, txt, lab, temp2)

    grads = jax.jit(jax.grad(total, argnums=(0, 1, 2, 3)))(
        pir["img"], pir["txt"], jnp.float32(pir["temp"]), jnp.float32(pir["temp2"]))
    names = ["grad_img_total", "grad_txt_total", "grad_temp_total", "grad_temp2_total"]
    for g, name in zip(grads, names):
        np.testing.assert_allclose(np.asarray(g), pir[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_pir_losses_jit_equal_eager(pir):
    img, txt, idx, lab = pir["img"], pir["txt"], pir["idx"], pir["label"]
    f = jax.jit(lambda a, b: (L.pir_contrastive_loss(a, b, 0.07, idx),
                              L.pir_affiliation_loss(a, b, lab, 0.05, num_shards=2)))
    c, a = f(img, txt)
    np.testing.assert_allclose(c, pir["loss_contr"], rtol=1e-6)
    np.testing.assert_allclose(a, L.pir_affiliation_loss(img, txt, lab, 0.05, num_shards=2), rtol=1e-6)


# ----------------------------------------------------------------------------- affiliation shards


def _affil_brute(img, txt, lab, temp2, shard, fix=False):
    """Loop form of spec §3.3: centres per shard of `shard` samples, then the global problem."""
    n = len(img)
    ci, ct = np.zeros_like(img), np.zeros_like(txt)
    for i in range(n):
        lo = (i // shard) * shard
        members = [j for j in range(lo, lo + shard) if lab[j] == lab[i]]
        ci[i], ct[i] = img[members].mean(0), txt[members].mean(0)

    def nll_diag(m):
        m = m - m.max(1, keepdims=True)
        logp = m - np.log(np.exp(m).sum(1, keepdims=True))
        return -np.mean(np.diag(logp))

    q = txt @ ci.T / temp2
    return 0.5 * (nll_diag(img @ ct.T / temp2) + nll_diag(q if fix else q.T))


@pytest.mark.parametrize("fix", [False, True])
def test_affiliation_per_shard_centres_and_any_width(fix):
    rng = np.random.default_rng(0)
    n, d = 12, 24  # width != 512 on purpose
    img = _unit(rng.normal(size=(n, d))).astype(np.float64)
    txt = _unit(rng.normal(size=(n, d))).astype(np.float64)
    lab = rng.integers(0, 3, size=n)
    @jax.jit
    def per_split(img, txt, lab):
        return [(L.pir_affiliation_loss(img, txt, lab, 0.07, num_shards=s, fix_t2i_transpose=fix),
                 L.pir_affiliation_loss(img, txt, lab, 0.07, shard_size=12 // s, fix_t2i_transpose=fix))
                for s in (1, 2, 3)]

    for (got, got2), shard in zip(per_split(img, txt, lab), (12, 6, 4)):
        want = _affil_brute(img, txt, lab, 0.07, shard, fix)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        np.testing.assert_allclose(got2, want, rtol=1e-5)
    # The options must matter on this data, or the checks above prove little.
    assert abs(_affil_brute(img, txt, lab, 0.07, 12) - _affil_brute(img, txt, lab, 0.07, 6)) > 1e-3
    assert abs(_affil_brute(img, txt, lab, 0.07, 12) - _affil_brute(img, txt, lab, 0.07, 12, True)) > 1e-3


def test_affiliation_rejects_uneven_shards():
    x = np.eye(6, dtype=np.float32)
    with pytest.raises(ValueError):
        L.pir_affiliation_loss(x, x, np.zeros(6), 0.07, num_shards=4)
    with pytest.raises(ValueError):
        L.pir_affiliation_loss(x, x, np.zeros(6), 0.07, shard_size=4)


# ----------------------------------------------------------------------------- BITA ITC


def test_bita_itc_matches_ift_fixture(fixtures_dir):
    d = np.load(fixtures_dir / "bita" / "ift_tiny.npz")
    img = _unit(d["out/query_hidden"] @ d["itc/vision_proj.weight"].T + d["itc/vision_proj.bias"])
    txt = _unit(d["out/text_hidden"][:, 0] @ d["itc/text_proj.weight"].T + d["itc/text_proj.bias"])
    sim_i2t, sim_t2i = L.bita_itc_similarities(img, txt, d["itc/temp"])
    # projections are recomputed here in float32, hence rtol rather than bit equality
    np.testing.assert_allclose(sim_i2t, d["out/sim_i2t"], rtol=1e-5)
    np.testing.assert_allclose(sim_t2i, d["out/sim_t2i"], rtol=1e-5)
    np.testing.assert_allclose(L.bita_itc_loss(img, txt, d["itc/temp"]), d["out/loss_itc"], rtol=1e-5)


def test_bita_itc_against_torch_with_detached_gather():
    """Torch version written from spec §3: gathered copies are detached (no gradient)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(1)
    n, nq, d, temp = 6, 4, 8, 0.07
    img0 = _unit(rng.normal(size=(n, nq, d))).astype(np.float32)
    txt0 = _unit(rng.normal(size=(n, d))).astype(np.float32)

    ti = torch.tensor(img0, requires_grad=True)
    tt = torch.tensor(txt0, requires_grad=True)
    tau = torch.tensor(temp, requires_grad=True)
    s_i2t = torch.einsum("bqd,jd->bqj", ti, tt.detach()).max(1).values / tau
    s_t2i = torch.einsum("bd,jqd->bjq", tt, ti.detach()).max(-1).values / tau
    tgt = torch.arange(n)
    loss = 0.5 * (F.cross_entropy(s_i2t, tgt, label_smoothing=0.1)
                  + F.cross_entropy(s_t2i, tgt, label_smoothing=0.1))
    loss.backward()

    val, grads = jax.jit(jax.value_and_grad(L.bita_itc_loss, argnums=(0, 1, 2)))(img0, txt0, jnp.float32(temp))
    np.testing.assert_allclose(val, loss.item(), rtol=1e-5)
    for g, t in zip(grads, (ti.grad, tt.grad, tau.grad)):
        np.testing.assert_allclose(np.asarray(g), t.numpy(), rtol=1e-4, atol=1e-6)

    # Without the stop-gradient the image gradient changes (t2i also reaches the images).
    g_free = jax.jit(jax.grad(lambda a: L.bita_itc_loss(a, txt0, temp, stop_gradient_other=False)))(img0)
    assert np.abs(np.asarray(g_free) - ti.grad.numpy()).max() > 1e-4


# ----------------------------------------------------------------------------- token CE


def test_token_cross_entropy_matches_torch_ignore_index():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(3, 5))
    targets[0, :2] = -100
    targets[2, 4] = -100
    want = torch.nn.functional.cross_entropy(
        torch.tensor(logits).reshape(-1, 11), torch.tensor(targets).reshape(-1), ignore_index=-100)
    got = jax.jit(L.token_cross_entropy)(logits, targets)
    np.testing.assert_allclose(got, want.item(), rtol=1e-6)
    # A different ignore index is honoured, and an all-ignored batch gives 0, not NaN.
    other = np.where(targets == -100, 0, targets)
    np.testing.assert_allclose(L.token_cross_entropy(logits, np.where(targets == -100, 11, targets),
                                                     ignore_index=11), want.item(), rtol=1e-6)
    assert abs(float(L.token_cross_entropy(logits, other)) - want.item()) > 1e-3
    assert float(L.token_cross_entropy(logits, np.full((3, 5), -100))) == 0.0
