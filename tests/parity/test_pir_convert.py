"""The `pir` converter against the reference's full state-dict key list (905 keys,
tests/fixtures/pir/pir_state_dict.txt).

A tiny config with the paper's *depths* (Swin 2/2/6/2 with shifted windows in stages 0-2,
BERT 12 layers, ResNet 3/4/6/3) has exactly the reference key set at tiny widths. Its
torch-layout tensors are generated from our abstract model's shapes (inverting each entry's
hook), written under the fixture's key names, and converted; the paper-size shapes in the
fixture are checked against the paper-size abstract model without allocating it.
"""
import re

import numpy as np
import pytest
from flax import nnx

from rsvl_jax.convert import ConversionError, from_pytorch, get_family
from rsvl_jax.convert import pir as pir_convert
from rsvl_jax.convert.core import conv, convert, linear, module_variables
from rsvl_jax.models.bert import BertConfig
from rsvl_jax.models.pir import PIR, PIRConfig, PRESETS
from rsvl_jax.models.resnet import ResNetConfig
from rsvl_jax.models.swin import SwinConfig

FULL_KEYS = PIRConfig(
    swin=SwinConfig(image_size=64, embed_dim=4, depths=(2, 2, 6, 2), num_heads=(1, 1, 2, 2), window_size=2,
                    drop_path_rate=0.0),
    bert=BertConfig(vocab_size=16, hidden_size=8, num_layers=12, num_heads=2, intermediate_size=8,
                    max_position_embeddings=8),
    resnet=ResNetConfig(layers=(3, 4, 6, 3), width=2),
    embed_dim=8, heads=2, filter_size=4,
)
BUFFERS = ("relative_position_index", "attn_mask", "num_batches_tracked")


def _torch_shape(hook, shape):
    """Shape of the PyTorch tensor that `hook` turns into `shape`."""
    if hook is linear:
        return shape[::-1]
    if hook is conv:  # (kh, kw, I, O) <- (O, I, kh, kw)
        return (shape[3], shape[2], shape[0], shape[1])
    return shape


@pytest.fixture(scope="module")
def reference_keys(fixtures_dir):
    keys = {}
    for line in (fixtures_dir / "pir" / "pir_state_dict.txt").read_text().splitlines():
        name, shape, dtype = line.split("\t")
        keys[name] = (tuple(int(s) for s in re.findall(r"\d+", shape)), dtype)
    assert len(keys) == 905
    return keys


@pytest.fixture(scope="module")
def table():
    return pir_convert.table(FULL_KEYS)


@pytest.fixture(scope="module")
def abstract():
    """FULL_KEYS built abstractly once (tracing ~700 initialisers is the slow part here).

    The error tests convert into it too: `convert` raises before it writes anything."""
    return nnx.eval_shape(lambda: PIR(FULL_KEYS, rngs=nnx.Rngs(0)))


def _convert(tensors, module):
    fam = get_family("pir")
    return convert(module, *fam.plan(FULL_KEYS, tensors))


@pytest.fixture(scope="module")
def tensors(reference_keys, table, abstract):
    """A state dict with exactly the reference keys, at FULL_KEYS' shapes."""
    entries, _ = table
    shapes = {k: tuple(v.shape) for k, v in module_variables(abstract).items()}
    rng = np.random.default_rng(0)
    out = {}
    for e in entries:
        (source,) = e.sources
        out[source] = rng.standard_normal(_torch_shape(e.hook, shapes[e.target])).astype(np.float32)
    for name, (shape, dtype) in reference_keys.items():
        if name not in out:  # buffers: any value, they are dropped
            out[name] = np.zeros(shape, np.int64 if "int64" in dtype else np.float32)
    return out


def _matching_skip(key, skips):
    return next((s.name for s in skips if re.fullmatch(s.pattern, key)), None)


def test_every_reference_key_is_consumed_or_skipped(reference_keys, table):
    entries, skips = table
    sources = {s for e in entries for s in e.sources}
    assert sources <= set(reference_keys), sorted(sources - set(reference_keys))[:5]
    skipped = [k for k in reference_keys if k not in sources]
    unmatched = [k for k in skipped if _matching_skip(k, skips) is None]
    assert not unmatched, unmatched[:5]
    # Only deterministic buffers are dropped: 12 index tables, 5 shift masks, 53 BN counters.
    assert all(any(b in k for b in BUFFERS) for k in skipped), skipped
    assert len(skipped) == 12 + 5 + 53 and len(sources) == 905 - 70


def test_paper_size_shapes(reference_keys):
    """Every fixture shape, through its hook, is the paper-size model's variable shape."""
    config = PRESETS["pir_swin_t"]
    entries, _ = pir_convert.table(config)
    abstract = nnx.eval_shape(lambda: PIR(config, rngs=nnx.Rngs(0)))
    shapes = {k: tuple(v.shape) for k, v in module_variables(abstract).items()}
    assert len(entries) == len(shapes) == 905 - 70
    bad = []
    for e in entries:
        (source,) = e.sources
        src_shape = reference_keys[source][0]
        got = np.shape(e.hook(np.broadcast_to(np.float32(0), src_shape)))  # views, nothing allocated
        if got != shapes[e.target]:
            bad.append((e.target, source, got, shapes[e.target]))
    assert not bad, bad[:5]


def test_convert_reference_key_set(tensors, table, abstract):
    report = _convert(tensors, abstract)
    assert report.converted == 835
    assert sum(report.skipped.values()) == 70
    entries, _ = table
    values = module_variables(abstract)
    for e in entries:
        want = e.hook(*[tensors[s] for s in e.sources])
        np.testing.assert_array_equal(np.asarray(values[e.target][...]), want, err_msg=e.target)


def test_from_pytorch_checkpoint_wrapper():
    """`from_pytorch("pir", ...)` reads the reference's {'model': sd, 'config': ...} file layout
    (here a heads-only config, to keep the abstract build cheap)."""
    config = PIRConfig(vision_width=6, text_width=5, conv_width=7, embed_dim=8, heads=2, filter_size=3,
                       instru_num=1, cycle_num=2)
    rng = np.random.default_rng(1)
    abstract = nnx.eval_shape(lambda: PIR(config, rngs=nnx.Rngs(0)))
    shapes = {k: tuple(v.shape) for k, v in module_variables(abstract).items()}
    sd = {e.sources[0]: rng.standard_normal(_torch_shape(e.hook, shapes[e.target])).astype(np.float32)
          for e in pir_convert.head_table(config)}
    model, report = from_pytorch("pir", {"model": sd, "config": {"embed_dim": 8}}, config, with_report=True)
    assert report.converted == len(sd) and not report.skipped
    np.testing.assert_array_equal(np.asarray(model.txt_ca[1].ffn.fc2.kernel[...]), sd["txt_ca.1.ffn.3.weight"].T)
    np.testing.assert_array_equal(np.asarray(model.temp2[...]), sd["temp2"])


def test_baseline_checkpoint_and_reference_config():
    """A baseline checkpoint (no prior, VIR or LCA) is recognised: into a full config it fails
    with a structural hint; with the config built from the checkpoint's own 'config' dict it
    converts."""
    full = PIRConfig(vision_width=6, text_width=5, conv_width=7, embed_dim=8, heads=2, filter_size=3)
    ref_cfg = {"is_baseline": True, "embed_dim": 8, "head": 2, "filter_size": 3, "instru_num": 2,
               "cycle_num": 3, "dropout_r": 0.2, "temp1": 0.07, "temp2": 0.07, "image_res": 224}
    base = pir_convert.config_from_reference(ref_cfg, base=full)
    assert base.is_baseline and base.heads == 2 and base.temp_init == 0.07
    rng = np.random.default_rng(2)
    sd = {"temp": np.float32(0.05), "temp2": np.float32(0.06)}
    for name, width in (("vision_proj", 6), ("text_proj", 5)):
        sd[f"{name}.weight"] = rng.standard_normal((8, width)).astype(np.float32)
        sd[f"{name}.bias"] = rng.standard_normal(8).astype(np.float32)
    with pytest.raises(ConversionError, match="is_baseline=True"):
        from_pytorch("pir", sd, full)
    model = from_pytorch("pir", {"model": sd, "config": ref_cfg}, base)
    np.testing.assert_array_equal(np.asarray(model.text_proj.kernel[...]), sd["text_proj.weight"].T)
    assert float(model.temp[...]) == np.float32(0.05)


def test_missing_key_is_named(tensors, abstract):
    broken = dict(tensors)
    del broken["img_ca.1.ffn.1.weight"]
    with pytest.raises(ConversionError, match=r"missing keys[\s\S]*img_ca\.1\.ffn\.1\.weight"):
        _convert(broken, abstract)


def test_renamed_key_is_named(tensors, abstract):
    broken = dict(tensors)
    broken["txt_sa.2.mhatt.linear_query.bias"] = broken.pop("txt_sa.2.mhatt.linear_q.bias")
    with pytest.raises(ConversionError) as err:
        _convert(broken, abstract)
    assert "txt_sa.2.mhatt.linear_q.bias" in str(err.value)  # missing
    assert "txt_sa.2.mhatt.linear_query.bias" in str(err.value)  # unexpected


def test_wrong_shape_is_named(tensors, abstract):
    broken = dict(tensors)
    broken["conv_proj.weight"] = broken["conv_proj.weight"][:, :-1]
    with pytest.raises(ConversionError, match=r"shape mismatches[\s\S]*conv_proj\.weight"):
        _convert(broken, abstract)


def test_not_a_pir_checkpoint(tensors, abstract):
    swin_only = {k[len("vision_encoder."):]: v for k, v in tensors.items() if k.startswith("vision_encoder.")}
    with pytest.raises(ConversionError, match="not a PIR checkpoint"):
        _convert(swin_only, abstract)


def test_optimizer_groups_from_reference_names(abstract):
    """The table gives each parameter its reference name, so the reference's substring
    no-decay rule (§4.2) reproduces its groups: 209 decay / 361 no-decay / 159 frozen tensors."""
    names = pir_convert.reference_names(FULL_KEYS)
    params = {".".join(map(str, p)) for p, _ in nnx.state(abstract, nnx.Param).flat_state()}
    no_decay = ("bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight",
                "norm1.bias", "norm1.weight", "norm2.bias", "norm2.weight")
    groups = {"decay": 0, "no_decay": 0, "frozen": 0}
    for path in params:
        ref = names[path]
        if ref.startswith("conv_encoder."):
            groups["frozen"] += 1
        elif any(nd in ref for nd in no_decay):
            groups["no_decay"] += 1
        else:
            groups["decay"] += 1
    assert groups == {"decay": 209, "no_decay": 361, "frozen": 159}
