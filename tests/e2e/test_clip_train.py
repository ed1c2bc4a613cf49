"""End to end on the synthetic builder: the CLIP task fine-tunes a tiny CLIP, retrieval and
zero-shot scene classification beat chance, evaluate/search read it, frozen towers stay put."""
import json
import pathlib

import numpy as np
import pytest
import torch
from flax import nnx

from rsvl_jax import evaluate, tasks, train
from rsvl_jax.config import ConfigError, load_config
from rsvl_jax.convert import clip as clip_convert
from rsvl_jax.convert.core import export
from rsvl_jax.tasks import clip as clip_task

REPO = pathlib.Path(__file__).resolve().parents[2]


def tiny_overrides(tmp_path, name, *overrides):
    return [
        "--config.model.preset=clip_test", "--config.data.image_size=32",
        "--config.data.synthetic_train_images=200", "--config.data.synthetic_eval_images=100",
        f"--config.data.data_dir={tmp_path / 'datasets'}", "--config.batch_size=32", "--config.eval_batch_size=50",
        f"--config.workdir={tmp_path / name}", "--config.log_every=10", "--config.optim.lr=2e-3",
        "--config.eval_splits=('val',)", "--config.checkpoint_every_steps=0", *overrides]


def tiny_config(tmp_path, name, *overrides):
    return load_config(f"{REPO}/configs/clip.py:demo", tiny_overrides(tmp_path, name, *overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clip")
    # 31 steps per epoch: 248 steps, evaluated once at the end.
    config = tiny_config(tmp, "learn", "--config.epochs=8", "--config.eval_every_epochs=8")
    final = train.train(config)
    return dict(config=config, final=final, tmp=tmp)


def _records(workdir):
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_fine_tuning_learns_and_beats_chance(trained):
    final, config = trained["final"], trained["config"]
    losses = [r["loss"] for r in _records(config.workdir) if "loss" in r]
    assert losses[-1] < 0.6 * losses[0], losses
    # Chance for 100 images x 5 captions: R@1/5/10 = 1/5/10 %, mR ~ 5.3; 10 balanced scenes: 10 %.
    print(f"tiny CLIP fine-tune: val mR {final['val_r_mean']:.2f} (chance ~5.3), "
          f"zero-shot accuracy {final['val_zs_acc']:.1f} % (chance 10 %)")
    assert final["val_r_mean"] > 20.0, final
    assert final["val_zs_acc"] > 30.0, final


def test_evaluate_a_pytorch_file_and_search_embeddings(trained, tmp_path, capsys):
    """The fine-tuned weights exported to the open_clip layout and evaluated as a `.pt` give the
    run's own numbers through `python -m rsvl_jax.evaluate` (Task.load_pytorch)."""
    config = trained["config"]
    task = tasks.get(config)
    model = tasks.load_model(task, config, config.workdir, say=lambda *a: None)
    entries, _ = clip_convert.table(model.config, "openai")
    pt = tmp_path / "tiny_clip.pt"
    torch.save({k: torch.from_numpy(v) for k, v in export(model, entries).items()}, pt)
    argv = ["--config", f"{REPO}/configs/clip.py:demo", *tiny_overrides(trained["tmp"], "learn"),
            "--checkpoint", str(pt), "--split", "val"]
    assert evaluate.main(argv) == 0
    header, values = capsys.readouterr().out.strip().splitlines()[-2:]
    got = dict(zip(header.split(), map(float, values.split())))
    assert got["r_mean"] == pytest.approx(trained["final"]["val_r_mean"], abs=0.02)
    assert got["zs_acc"] == pytest.approx(trained["final"]["val_zs_acc"], abs=0.02)
    # search's hooks: normalised embeddings, the query text finds its scene's prompt.
    img = task.embed_images(model, np.zeros((2, 32, 32, 3), np.float32))
    txt = task.embed_texts(model, ["a satellite photo of forest.", "cars in a parking lot"])
    assert img.shape == (2, 24) and txt.shape == (2, 24)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, rtol=1e-5)


def test_frozen_tower_does_not_change(tmp_path):
    config = tiny_config(tmp_path, "frozen", "--config.model.freeze_vision=True", "--config.max_steps=3",
                         "--config.data.synthetic_train_images=40", "--config.data.synthetic_eval_images=20",
                         "--config.eval_splits=()")
    task = tasks.get(config)
    init = nnx.state(task.make_model(), nnx.Param)
    train.train(config)
    model = tasks.load_model(task, config, config.workdir, say=lambda *a: None)
    after = nnx.state(model, nnx.Param)
    # The eager and the jitted init differ by float rounding (~1e-7); training moves far more.
    moved = {".".join(map(str, p)): float(np.abs(np.asarray(a[...]) - np.asarray(b[...])).max())
             for (p, a), (_, b) in zip(init.flat_state(), after.flat_state())}
    vision = {k: v for k, v in moved.items() if k.startswith(("visual.", "visual_proj"))}
    assert vision and max(vision.values()) < 1e-6, vision
    assert moved["text_projection"] > 1e-4 and moved["logit_scale"] > 1e-4, moved

def test_contrastive_loss_and_config_errors(tmp_path):
    logits = np.array([[5.0, 0.0], [0.0, 5.0]], np.float32)
    expect = float(np.log1p(np.exp(-5.0)))  # -log softmax of the diagonal, both directions alike
    assert float(clip_task.contrastive_loss(logits)) == pytest.approx(expect, rel=1e-5)
    # Two captions of one image: both positives, targets (1/2, 1/2), so equal logits are the
    # optimum (the loss is the targets' entropy, log 2) where identity targets would push them apart.
    same = float(clip_task.contrastive_loss(np.zeros((2, 2), np.float32), np.array([3, 3])))
    assert same == pytest.approx(np.log(2.0), rel=1e-6)
    with pytest.raises(ConfigError, match="model.act"):
        tasks.get(tiny_config(tmp_path, "x", "--config.model.act=relu"))
    with pytest.raises(ConfigError, match="data.bpe"):
        tasks.get(tiny_config(tmp_path, "x", "--config.data.bpe=")).open_data()
