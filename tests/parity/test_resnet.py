"""ResNet-50 trunk: parity with transformers.ResNetModel (inference and PIR's train-mode BN),
the accepted key layouts, strict errors."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rsvl_jax.convert import ConversionError, from_pytorch  # noqa: E402
from rsvl_jax.convert.core import module_variables  # noqa: E402
from rsvl_jax.convert.resnet import table  # noqa: E402
from rsvl_jax.models.resnet import PRESETS, ResNet  # noqa: E402

CFG = PRESETS["resnet_test"]  # layers (1, 1, 1, 1), width 8 -> 256 features
TRAIN_CFG = dataclasses.replace(CFG, bn_mode="pir_train")
TOL = 1e-5


@nnx.jit(static_argnames="train")
def _run(model, images, train=False):
    return model(images, train=train)


def _hf_model():
    """HF's bottleneck ResNet with the stride on the 3x3 conv (downsample_in_bottleneck=False)
    is torchvision's v1.5 layout; embedding_size = width, hidden_sizes = 4 * width * 2^k."""
    cfg = transformers.ResNetConfig(
        embedding_size=CFG.width, hidden_sizes=[4 * CFG.width * 2**k for k in range(4)], depths=list(CFG.layers),
        layer_type="bottleneck", downsample_in_bottleneck=False, downsample_in_first_stage=False,
    )
    return transformers.ResNetModel(cfg)


@pytest.fixture(scope="module")
def torch_resnet():
    torch.manual_seed(0)
    model = _hf_model().eval()
    with torch.no_grad():  # non-trivial BN affine params and running stats
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand_like(m.weight) + 0.5)
                m.bias.copy_(torch.randn_like(m.bias) * 0.2)
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.2)
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
    return model


def _numpy(sd):
    # Copies: on CPU jax may alias numpy memory, and torch updates BN buffers in place.
    return {k: v.detach().clone().numpy() for k, v in sd.items()}


@pytest.fixture(scope="module")
def state_dict(torch_resnet):
    return _numpy(torch_resnet.state_dict())


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _nhwc(x):
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _pooled(model, x):
    with torch.no_grad():
        return model(x).pooler_output.reshape(x.shape[0], -1).numpy()


def test_parity_inference(torch_resnet, state_dict, images):
    ours = from_pytorch("resnet50", state_dict, CFG)
    want = _pooled(torch_resnet, images)
    got = np.asarray(_run(ours, _nhwc(images)))
    assert got.shape == (4, CFG.features) == (4, 256)
    assert np.abs(got - want).max() <= TOL
    # "inference" mode ignores train=True (the Q3 fix): running statistics, nothing updated.
    before = {k: np.asarray(v[...]) for k, v in module_variables(ours).items()}
    np.testing.assert_array_equal(np.asarray(_run(ours, _nhwc(images), train=True)), got)
    after = {k: np.asarray(v[...]) for k, v in module_variables(ours).items()}
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_batch_size_one(torch_resnet, state_dict, images):
    # The reference's `.squeeze()` drops the batch axis at B = 1 (quirk Q4); we keep (1, C).
    ours = from_pytorch("resnet50", state_dict, CFG)
    got = np.asarray(_run(ours, _nhwc(images[:1])))
    assert got.shape == (1, CFG.features)
    assert np.abs(got - _pooled(torch_resnet, images[:1])).max() <= TOL


def test_pir_train_batch_stats_and_running_update(state_dict, images):
    torch_model = _hf_model()
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
    torch_model.train()  # PIR: frozen weights, BN still in train mode
    ours = from_pytorch("resnet50", state_dict, TRAIN_CFG)
    want = _pooled(torch_model, images)  # also updates torch's running stats in place
    got = np.asarray(_run(ours, _nhwc(images), train=True))
    assert np.abs(got - want).max() <= TOL
    # Running statistics after one step: momentum 0.1 and the unbiased variance, as torch.
    updated = {k: np.asarray(v[...]) for k, v in module_variables(ours).items()}
    expected = {k: np.asarray(v[...]) for k, v in
                module_variables(from_pytorch("resnet50", _numpy(torch_model.state_dict()), TRAIN_CFG)).items()}
    stats = [k for k in expected if k.endswith((".mean", ".var"))]
    assert len(stats) == 2 * (1 + 4 * 4)
    diff = max(np.abs(updated[k] - expected[k]).max() for k in stats)
    assert diff <= TOL
    moved = max(np.abs(updated[k] - state_dict_value(state_dict, k)).max() for k in stats)
    assert moved > 1e-2  # the stats really changed
    # Eval after the update uses the new running statistics, as torch.eval() does.
    torch_model.eval()
    assert np.abs(np.asarray(_run(ours, _nhwc(images))) - _pooled(torch_model, images)).max() <= TOL


def state_dict_value(sd, target):
    """The HF tensor behind one of our BN stat paths (via the conversion table)."""
    entry = next(e for e in table(CFG, "hf")[0] if e.target == target)
    return sd[entry.sources[0]]


def test_pir_train_per_group_statistics(state_dict, images):
    # bn_group_size=2: statistics per pair of images (per "GPU"); running stats follow group 0.
    cfg = dataclasses.replace(TRAIN_CFG, bn_group_size=2)
    ours = from_pytorch("resnet50", state_dict, cfg)
    got = np.asarray(_run(ours, _nhwc(images), train=True))
    ref0, ref1 = _hf_model(), _hf_model()
    for m in (ref0, ref1):
        m.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
        m.train()
    want = np.concatenate([_pooled(ref0, images[:2]), _pooled(ref1, images[2:])])
    assert np.abs(got - want).max() <= TOL
    expected = module_variables(from_pytorch("resnet50", _numpy(ref0.state_dict()), cfg))
    for k, v in module_variables(ours).items():
        np.testing.assert_allclose(np.asarray(v[...]), np.asarray(expected[k][...]), atol=TOL, err_msg=k)


def test_pir_train_rejects_single_value_per_channel(state_dict, images):
    ours = from_pytorch("resnet50", state_dict, TRAIN_CFG)
    with pytest.raises(ValueError, match="needs > 1 value per channel"):
        _run(ours, _nhwc(images[:1, :, :32, :32]), train=True)  # stage 4 is 1x1 at B = 1


# ----------------------------------------------------------------------------------------
# Key layouts.
# ----------------------------------------------------------------------------------------
def _rename(sd, src_layout, dst_layout, prefix=""):
    """Rewrite a state dict from one accepted naming to another, through our own tables."""
    src = {e.target: e.sources[0] for e in table(CFG, src_layout)[0]}
    dst = {e.target: e.sources[0] for e in table(CFG, dst_layout)[0]}
    out = {prefix + dst[t]: sd[s] for t, s in src.items()}
    for t, s in src.items():  # keep the num_batches_tracked buffers, which must be skipped
        if s.endswith(".running_mean"):
            nbt = s.replace(".running_mean", ".num_batches_tracked")
            out[prefix + dst[t].replace(".running_mean", ".num_batches_tracked")] = sd[nbt]
    return out


def test_layouts_give_identical_parameters(state_dict, tmp_path):
    tv = _rename(state_dict, "hf", "torchvision")
    assert "layer4.0.downsample.1.running_var" in tv and "layer1.0.bn3.num_batches_tracked" in tv
    tv_fc = dict(tv, **{"fc.weight": np.zeros((30, 256), np.float32), "fc.bias": np.zeros(30, np.float32)})
    path = tmp_path / "rsp.pth"  # the RSP/AID checkpoint's wrapper and DDP prefix
    torch.save({"model": {"module." + k: torch.from_numpy(v) for k, v in tv_fc.items()}, "epoch": 3}, path)
    pir = _rename(state_dict, "hf", "pir", prefix="conv_encoder.")
    assert "conv_encoder.7.0.downsample.0.weight" in pir and "conv_encoder.1.running_mean" in pir
    sources = {"hf": state_dict, "torchvision": tv_fc, "rsp_file": str(path), "pir": pir,
               "pir_bare": _rename(state_dict, "hf", "pir"),
               "hf_classifier": {"resnet." + k: v for k, v in state_dict.items()}
               | {"classifier.1.weight": np.zeros((3, 256), np.float32)}}
    want = {k: np.asarray(v[...]) for k, v in module_variables(from_pytorch("resnet50", state_dict, CFG)).items()}
    for name, src in sources.items():
        got = {k: np.asarray(v[...]) for k, v in module_variables(from_pytorch("resnet50", src, CFG)).items()}
        assert got.keys() == want.keys(), name
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name}: {k}")


def test_full_size_table_matches_pir_keys(fixtures_dir):
    """The "pir" table at ResNet-50 size covers exactly PIR's conv_encoder.* keys (spec §6.1)."""
    lines = (fixtures_dir / "pir" / "pir_state_dict.txt").read_text().splitlines()
    keys = {ln.split("\t")[0][len("conv_encoder."):]: ln.split("\t")[1] for ln in lines if ln.startswith("conv_encoder.")}
    entries, _ = table(PRESETS["resnet50"], "pir")
    sources = {e.sources[0] for e in entries}
    assert sources == {k for k in keys if not k.endswith("num_batches_tracked")}
    shapes = {k: v.shape for k, v in module_variables(
        nnx.eval_shape(lambda: ResNet(PRESETS["resnet50"], rngs=nnx.Rngs(0)))).items()}
    for e in entries:  # torch conv (O, I, kh, kw) -> ours (kh, kw, I, O)
        src = tuple(int(d) for d in keys[e.sources[0]].strip("()").split(",") if d.strip())
        assert tuple(e.hook(np.zeros(src)).shape) == tuple(shapes[e.target]), e.target
    assert sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith((".mean", ".var"))) == 23_508_032


# ----------------------------------------------------------------------------------------
# Strict errors.
# ----------------------------------------------------------------------------------------
def test_missing_key_is_named(state_dict):
    sd = dict(state_dict)
    del sd["encoder.stages.2.layers.0.layer.1.normalization.running_var"]
    with pytest.raises(ConversionError, match=r"missing keys[\s\S]*stages\.2\.layers\.0\.layer\.1\.normalization\.running_var"):
        from_pytorch("resnet50", sd, CFG)


def test_unexpected_key_is_named(state_dict):
    sd = dict(state_dict, **{"encoder.stages.0.layers.1.layer.0.convolution.weight": np.zeros((8, 32, 1, 1), np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected keys[\s\S]*encoder\.stages\.0\.layers\.1\.layer\.0\.convolution\.weight"):
        from_pytorch("resnet50", sd, CFG)


def test_wrong_shape_is_named(state_dict):
    sd = dict(state_dict)
    sd["embedder.embedder.convolution.weight"] = np.zeros((8, 3, 3, 3), np.float32)
    with pytest.raises(ConversionError, match=r"shape mismatches[\s\S]*conv1\.kernel.*embedder\.embedder\.convolution\.weight"):
        from_pytorch("resnet50", sd, CFG)


def test_not_a_resnet_checkpoint():
    with pytest.raises(ConversionError, match="not a ResNet checkpoint"):
        from_pytorch("resnet50", {"embeddings.word_embeddings.weight": np.zeros((4, 4), np.float32)}, CFG)


def test_random_init_is_kaiming_fan_out():
    from rsvl_jax.models.resnet import BatchNorm, _conv

    k = np.asarray(_conv(64, 64, 3, 1, CFG, nnx.Rngs(0)).kernel[...])  # fan_out = 9 * 64
    assert abs(k.std() - np.sqrt(2.0 / (9 * 64))) < 0.01
    bn = BatchNorm(4, CFG)
    assert [np.asarray(v[...]).tolist() for v in (bn.scale, bn.bias, bn.mean, bn.var)] == [[1.0] * 4, [0.0] * 4, [0.0] * 4, [1.0] * 4]
