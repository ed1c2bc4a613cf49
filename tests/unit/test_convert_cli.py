"""The convert CLI (`python -m rsvl_jax.convert FAMILY SOURCE OUTDIR [--preset NAME]`), run in
process through `main([...])`: a tiny HF BERT written with `torch.save` (.bin) and a tiny HF Swin
written as .safetensors are converted at the family's test preset; the printed summary, the
stored metadata and the restored model's outputs (against HF) are checked, and bad input
(a missing key, an unknown preset) exits with code 2, names the problem and writes nothing.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from rsvl_jax import checkpoint
from rsvl_jax.convert.__main__ import main
from rsvl_jax.models.bert import PRESETS as BERT_PRESETS
from rsvl_jax.models.bert import Bert
from rsvl_jax.models.swin import PRESETS as SWIN_PRESETS
from rsvl_jax.models.swin import Swin

from ..torch_models import hf_bert, hf_swin

TOL = 1e-5
BERT_CFG = BERT_PRESETS["bert_test"]
SWIN_CFG = SWIN_PRESETS["swin_test"]


def hf_bert_preset():
    """An HF BertModel with exactly the shapes of the `bert_test` preset."""
    return hf_bert(BERT_CFG)


def hf_swin_preset():
    """An HF SwinModel with exactly the shapes of the `swin_test` preset."""
    return hf_swin(SWIN_CFG)


# family -> (preset, our model class, config, file name, how HF's tensors are written)
CASES = {
    "bert": ("bert_test", Bert, BERT_CFG, "bert.bin", lambda sd, path: torch.save(sd, path)),
    "swin": ("swin_test", Swin, SWIN_CFG, "swin.safetensors", lambda sd, path: save_file(sd, str(path))),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """family -> (HF model, its state dict, the file it was written to)."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for family, model in (("bert", hf_bert_preset()), ("swin", hf_swin_preset())):
        sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        path = root / CASES[family][3]
        CASES[family][4](sd, path)
        out[family] = (model, sd, path)
    return out


def _inputs(family):
    rs = np.random.RandomState(0)
    if family == "bert":
        return (rs.randint(1, BERT_CFG.vocab_size, (2, 9)),)
    return (rs.randn(2, SWIN_CFG.image_size, SWIN_CFG.image_size, SWIN_CFG.in_chans).astype(np.float32),)


def _hf_out(family, model, inputs):
    with torch.no_grad():
        if family == "bert":
            return model(torch.from_numpy(inputs[0])).last_hidden_state.numpy()
        return model(torch.from_numpy(inputs[0].transpose(0, 3, 1, 2))).last_hidden_state.numpy()


@nnx.jit(static_argnames="family")
def _ours(model, inputs, family):
    out = model(*inputs)
    return out[1]["tokens"] if family == "swin" else out  # Swin's tokens are HF's last_hidden_state


@pytest.mark.parametrize("family", sorted(CASES))
def test_cli_converts_and_restores(family, sources, tmp_path, capsys):
    preset, cls, cfg, _, _ = CASES[family]
    hf, sd, path = sources[family]
    outdir = tmp_path / "out"
    assert main([family, str(path), str(outdir), "--preset", preset]) == 0

    # The summary counts, derived from HF: buffers and BERT's pooler are dropped by named
    # rules, every other tensor is converted (transformers 5 stores no Swin buffers).
    kept = {n: p for n, p in hf.named_parameters() if not n.startswith("pooler.")}
    skipped = [k for k in sd if k not in kept]
    n_params = sum(p.numel() for p in kept.values())
    printed = capsys.readouterr().out
    print(printed)
    assert f"{len(sd) - len(skipped)} tensors converted" in printed
    assert f"{len(skipped)} skipped" in printed
    if family == "bert":
        assert "2 pooler" in printed  # the rule's name is reported with its count
    assert f"{n_params:,} parameters" in printed
    assert f"wrote {outdir}" in printed and preset in printed

    meta = checkpoint.read_metadata(outdir)
    assert meta["family"] == family and meta["preset"] == preset
    assert meta["num_params"] == n_params

    # Restore into the preset's model; its outputs match HF's.
    model = cls(cfg, rngs=nnx.Rngs(1))  # random values, all overwritten by the restore
    nnx.update(model, checkpoint.restore_params(outdir, nnx.state(model, nnx.Param)))
    inputs = _inputs(family)
    out = np.asarray(_ours(model, tuple(jnp.asarray(x) for x in inputs), family))
    diff = np.abs(out - _hf_out(family, hf, inputs)).max()
    print(f"{family}: max |restored - HF| = {diff:.2e}")
    assert diff <= TOL


def test_missing_key_exits_2_and_writes_nothing(sources, tmp_path, capsys):
    _, sd, _ = sources["bert"]
    gone = "encoder.layer.1.attention.self.key.weight"
    broken = {k: v for k, v in sd.items() if k != gone}
    path = tmp_path / "broken.bin"
    torch.save(broken, path)
    outdir = tmp_path / "out"
    assert main(["bert", str(path), str(outdir), "--preset", "bert_test"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and gone in err and "missing" in err
    assert not outdir.exists()


def test_unknown_preset_is_a_clear_error(sources, tmp_path, capsys):
    _, _, path = sources["swin"]
    outdir = tmp_path / "out"
    assert main(["swin", str(path), str(outdir), "--preset", "swin_huge"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'swin_huge'" in err and "swin_test" in err  # names the known ones
    assert not outdir.exists()


def test_unknown_family_is_rejected_by_argparse(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["vgg", str(tmp_path / "x.bin"), str(tmp_path / "out")])
    assert e.value.code == 2
    assert "invalid choice: 'vgg'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
