"""`python -m rsvl_jax.evaluate` on the synthetic builder: a PyTorch checkpoint converted on the
fly and the same weights as an Orbax checkpoint give the same table; a checkpoint for another
config stops with an error naming the mismatched keys."""
import pathlib

import pytest
import torch
from flax import nnx

from rsvl_jax import checkpoint, evaluate
from rsvl_jax.convert import ConversionError
from rsvl_jax.convert import core
from rsvl_jax.convert import pir as pir_convert
from rsvl_jax.tasks.pir import METRIC_KEYS, model_config

from .test_pir_train import tiny_config


def _table(capsys):
    lines = capsys.readouterr().out.strip().splitlines()
    header, values = lines[-2].split(), [float(v) for v in lines[-1].split()]
    return dict(zip(header, values))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny random PIR as the reference would save it: {'model': state_dict} in a .pth."""
    tmp = tmp_path_factory.mktemp("eval")
    config = tiny_config(tmp, "eval")
    mcfg = model_config(config)
    model = pir_convert.build(mcfg, nnx.Rngs(3))
    state_dict = core.export(model, pir_convert.table(mcfg)[0])
    pth = tmp / "checkpoint_best.pth"
    torch.save({"model": {k: torch.from_numpy(v.copy()) for k, v in state_dict.items()}, "config": {}}, pth)
    orbax_dir = tmp / "converted"
    checkpoint.save_params(orbax_dir, nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
    return tmp, pth, orbax_dir


def _args(tmp):
    cfg = pathlib.Path(__file__).resolve().parents[2] / "configs" / "pir.py"
    return [f"--config={cfg}:demo", "--config.model.preset=pir_test", "--config.model.text_vocab_size=256",
            "--config.data.image_size=32", "--config.data.synthetic_train_images=40",
            "--config.data.synthetic_eval_images=20", f"--config.data.data_dir={tmp / 'datasets'}",
            "--config.eval_batch_size=8"]


def test_pth_and_orbax_checkpoints_give_the_same_table(weights, capsys):
    tmp, pth, orbax_dir = weights
    assert evaluate.main(_args(tmp) + ["--checkpoint", str(pth)]) == 0
    from_pth = _table(capsys)
    assert evaluate.main(_args(tmp) + ["--checkpoint", str(orbax_dir)]) == 0
    from_orbax = _table(capsys)
    assert list(from_pth) == list(METRIC_KEYS)
    assert from_pth == from_orbax
    assert all(0.0 <= v <= 100.0 for v in from_pth.values())


def test_checkpoint_for_another_config_is_rejected(weights):
    tmp, pth, _ = weights
    args = _args(tmp) + ["--config.model.preset=pir_demo", "--checkpoint", str(pth)]
    with pytest.raises(ConversionError, match="does not match the config") as err:
        evaluate.main(args)
    assert "embed_dim=32 (config: 128)" in str(err.value)
