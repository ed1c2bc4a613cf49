"""`python -m rsvl_jax.convert` with the model config read from an HF `config.json` (families
opt and clip_vit): tiny random HF models written with `save_pretrained`, converted through the
CLI in process; the restored parameters equal a direct conversion with the same config."""
import json

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from rsvl_jax import checkpoint
from rsvl_jax.convert import clip_vit as clip_conv
from rsvl_jax.convert import from_pytorch, get_family
from rsvl_jax.convert.__main__ import main
from rsvl_jax.convert.core import module_variables
from rsvl_jax.models import opt as opt_lib

from ..torch_models import randomise


def hf_opt():
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                 num_attention_heads=4, max_position_embeddings=40, word_embed_proj_dim=16)
    return randomise(transformers.OPTForCausalLM(cfg), "layer_norm").eval()


def hf_clip():
    torch.manual_seed(1)
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, image_size=16, patch_size=4, hidden_act="quick_gelu")
    return randomise(transformers.CLIPVisionModel(cfg), "norm").eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    out = {}
    for family, model in (("opt", hf_opt()), ("clip_vit", hf_clip())):
        d = tmp_path_factory.mktemp(family)
        model.save_pretrained(d)
        out[family] = (model, d)
    return out


def expected_config(family, d):
    raw = json.loads((d / "config.json").read_text())
    if family == "opt":
        return opt_lib.OPTConfig.from_hf_config_dict(raw)
    return clip_conv.config_from_hf(raw)


def params(module):
    return {k: np.asarray(v.get_value()) for k, v in module_variables(module).items()}


@pytest.mark.parametrize("family", ["opt", "clip_vit"])
@pytest.mark.parametrize("how", ["directory", "--hf-config"])
def test_cli_reads_the_hf_config(family, how, hf_dirs, tmp_path, capsys):
    hf, d = hf_dirs[family]
    cfg = expected_config(family, d)
    if family == "clip_vit":  # the whole tower: every block, the final norm
        assert (cfg.layers, cfg.width, cfg.heads, cfg.mlp_dim, cfg.image_size, cfg.patch_size, cfg.final_norm) == \
            (3, 32, 4, 64, 16, 4, True)
    else:
        assert (cfg.layers, cfg.hidden, cfg.vocab_size, cfg.max_positions) == (2, 16, 64, 40)
    outdir = tmp_path / "out"
    if how == "directory":
        argv = [family, str(d), str(outdir)]
    else:  # a weights file plus the config named explicitly
        weights = tmp_path / "weights.bin"
        torch.save(hf.state_dict(), weights)
        argv = [family, str(weights), str(outdir), "--hf-config", str(d / "config.json")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"config from {d / 'config.json'}" in printed

    meta = checkpoint.read_metadata(outdir)
    assert meta["preset"] is None and meta["hf_config"] == str(d / "config.json")
    direct = from_pytorch(family, hf.state_dict(), cfg)
    model = get_family(family).build(cfg, nnx.Rngs(3))
    nnx.update(model, checkpoint.restore_params(outdir, nnx.state(model, nnx.Param)))
    want, got = params(direct), params(model)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # And it is HF's model: CLIP's tokens after the final LayerNorm / OPT's logits.
    if family == "clip_vit":
        x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
        with torch.no_grad():
            h = hf(torch.from_numpy(x.transpose(0, 3, 1, 2))).last_hidden_state
            ref = hf.post_layernorm(h).numpy() if hasattr(hf, "post_layernorm") else hf.vision_model.post_layernorm(h).numpy()
        ours = np.asarray(model(x))
    else:
        ids = np.random.default_rng(0).integers(3, 64, (2, 7))
        with torch.no_grad():
            ref = hf(torch.from_numpy(ids)).logits.numpy()
        ours = np.asarray(model(ids)[0])  # (logits, cache)
    assert np.abs(ours - ref).max() <= 1e-5


def test_preset_still_wins_and_errors_are_one_line(hf_dirs, tmp_path, capsys):
    _, d = hf_dirs["opt"]
    assert main(["opt", str(d), str(tmp_path / "a"), "--preset", "opt_125m"]) == 2  # shapes differ from the preset
    assert "shape mismatches" in capsys.readouterr().err
    assert main(["opt", str(d), str(tmp_path / "b"), "--preset", "opt_test", "--hf-config", str(d)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["bert", str(d), str(tmp_path / "c"), "--hf-config", str(d)]) == 2
    assert "no HF config reader" in capsys.readouterr().err
    bad = tmp_path / "gelu.json"
    bad.write_text(json.dumps(dict(json.loads((hf_dirs["clip_vit"][1] / "config.json").read_text()), hidden_act="gelu")))
    assert main(["clip_vit", str(hf_dirs["clip_vit"][1]), str(tmp_path / "e"), "--hf-config", str(bad)]) == 2
    assert "QuickGELU" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "abce")
