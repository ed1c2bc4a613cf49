"""BITA through the generic trainer on the synthetic captions: the three stages chained, each
started from the previous run; frozen parts without gradient or optimiser state; an exact
resume; export to the reference layout and evaluation from it."""
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rsvl_jax import checkpoint, evaluate, export, parallel, tasks, train
from rsvl_jax.config import load_config
from rsvl_jax.convert import bita as bita_convert

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = f"{REPO}/configs/bita.py"


def _args(tmp_path, stage, name, *extra):
    return [f"--config={CONFIG}:stage={stage},demo", f"--config.workdir={tmp_path / name}",
            f"--config.data.data_dir={tmp_path.parent / 'bita_data'}", "--config.log_every=1",
            "--config.eval_batch_size=20", *extra]


def _config(tmp_path, stage, name, *extra):
    args = _args(tmp_path, stage, name, *extra)
    return load_config(args[0].split("=", 1)[1], args[1:])


def _records(workdir):
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Stage 1 -> stage 2 -> caption, a few steps each, through the CLI entry point."""
    tmp = tmp_path_factory.mktemp("chain")
    assert train.main(_args(tmp, "1", "s1", "--config.max_steps=3")) == 0
    assert train.main(_args(tmp, "2", "s2", "--config.max_steps=3", f"--config.model.init_checkpoint={tmp / 's1'}")) == 0
    assert train.main(_args(tmp, "caption", "cap", "--config.max_steps=3",
                            f"--config.model.init_checkpoint={tmp / 's2'}")) == 0
    return tmp


def test_each_stage_trains_from_the_previous_one(chain, capsys):
    for name, stage in (("s1", "1"), ("s2", "2"), ("cap", "caption")):
        records = _records(chain / name)
        assert [r["step"] for r in records] == [1, 2, 3]
        assert all(np.isfinite(r["loss"]) for r in records)
        assert json.loads((chain / name / "config.json").read_text())["stage"] == stage
    final = json.loads((chain / "cap" / "final_metrics.json").read_text())
    assert final["step"] == 3 and {"test_CIDEr", "test_Bleu_4", "test_agg_metrics"} <= set(final)
    captions = json.loads((chain / "cap" / "captions" / "test_step3.json").read_text())
    assert len(captions) == 60 and {"image_id", "file_name", "caption", "CIDEr"} <= set(captions[0])
    assert len({c["image_id"] for c in captions}) == 60


@pytest.mark.parametrize("stage, init", [("2", None), ("caption", "nowhere")])
def test_a_missing_initial_checkpoint_is_one_clear_line(tmp_path, stage, init):
    extra = [f"--config.model.init_checkpoint={tmp_path / init}"] if init else ["--config.model.init_checkpoint="]
    result = subprocess.run([sys.executable, "-m", "rsvl_jax.train", *_args(tmp_path, stage, "run", *extra)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model.init_checkpoint" in lines[0], lines


def test_frozen_parts_get_no_gradient_and_no_optimiser_state(tmp_path):
    config = _config(tmp_path, "2", "frozen", "--config.model.freeze_opt=True")
    task = tasks.get(config)
    mesh = parallel.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        model = parallel.init_sharded(task.make_model, mesh, parallel.DEFAULT_RULES)
        graphdef, trainable, frozen, mutable, rest = train.split_model(model, task)
        tops = lambda state: {str(p[0]) for p, _ in state.flat_state()}  # noqa: E731
        assert tops(trainable) == {"bridge"} and tops(frozen) == {"visual_encoder", "opt_model"}
        tx, _ = task.optimizer(trainable, 10, 100)
        opt_state = tx.init(trainable)
        n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
        n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
        # Adam's two moments cover the bridge exactly: nothing for the frozen ViT / OPT.
        n_opt = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)
        assert n_opt == 2 * n_trainable and n_frozen > 0
        # The step's gradient tree is the trainable tree: the same structure as its updates.
        step = jax.jit(train.make_train_step(graphdef, task, tx, 0))
        data = task.open_data()
        batch = parallel.host_local_to_global(next(task.train_loader(data, 32)), mesh)
        out = jax.eval_shape(step, trainable, frozen, mutable, rest, opt_state, batch, jnp.int32(0))
        assert jax.tree.structure(out[0]) == jax.tree.structure(trainable)
        # The frozen weights are not inputs the step differentiates or returns.
        assert sum(x.size for x in jax.tree.leaves(out[0])) == n_trainable


@pytest.mark.slow
def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    init = f"--config.model.init_checkpoint={tmp_path / 's1'}"
    train.train(_config(tmp_path, "1", "s1", "--config.max_steps=2"))
    straight = _config(tmp_path, "2", "straight", init, "--config.max_steps=6")
    train.train(straight)
    train.train(_config(tmp_path, "2", "resumed", init, "--config.max_steps=3"))
    resumed = _config(tmp_path, "2", "resumed", init, "--config.max_steps=6")
    train.train(resumed)
    losses = [{r["step"]: r["loss"] for r in _records(c.workdir)} for c in (straight, resumed)]
    assert sorted(losses[1]) == [1, 2, 3, 4, 5, 6]
    for s in range(1, 7):
        np.testing.assert_allclose(losses[0][s], losses[1][s], rtol=1e-5, err_msg=f"step {s}")
    params = []
    for c in (straight, resumed):
        task = tasks.get(c)
        _, abstract, _ = jax.eval_shape(lambda: nnx.split(task.make_model(), task.saved, ...))
        mgr = checkpoint.CheckpointManager(pathlib.Path(c.workdir) / "checkpoints", best_metrics=())
        params.append(mgr.restore(6, abstract, None)[0])
        mgr.close()
    for (k, a), (_, b) in zip(params[0].flat_state(), params[1].flat_state()):
        np.testing.assert_allclose(a[...], b[...], atol=2e-6, err_msg=str(k))


def _table(capsys):
    lines = capsys.readouterr().out.strip().splitlines()
    return dict(zip(lines[-2].split(), map(float, lines[-1].split())))


@pytest.mark.slow
def test_export_then_import_and_evaluate_from_both(chain, tmp_path, capsys):
    """A frozen-OPT caption run exports to the reference layout; the .pth holds the same
    parameters and evaluates to the same table as the run directory."""
    frozen = ("--config.max_steps=2", "--config.model.freeze_opt=True")
    assert train.main(_args(tmp_path, "2", "s2_frozen", *frozen, f"--config.model.init_checkpoint={chain / 's1'}")) == 0
    extra = (*frozen, f"--config.model.init_checkpoint={tmp_path / 's2_frozen'}")
    run = _args(tmp_path, "caption", "frozen_opt", *extra)
    assert train.main(run) == 0
    pth = tmp_path / "exported.pth"
    assert export.main(run + ["--checkpoint", str(tmp_path / "frozen_opt"), str(pth)]) == 0
    state = bita_convert.read_state_dict(pth)
    assert bita_convert.TIED_LM_HEAD in state and all(not k.startswith("visual_encoder") for k in state)

    config = _config(tmp_path, "caption", "frozen_opt", *extra)
    task = tasks.get(config)
    with jax.set_mesh(parallel.make_mesh(config.mesh)):
        from_run = tasks.load_model(task, config, str(tmp_path / "frozen_opt"), say=lambda *a: None)
        from_pth = tasks.load_model(task, config, str(pth), say=lambda *a: None)
    a, b = nnx.state(from_run, task.saved), nnx.state(from_pth, task.saved)
    for (k, x), (_, y) in zip(a.flat_state(), b.flat_state()):
        np.testing.assert_array_equal(np.asarray(x[...]), np.asarray(y[...]), err_msg=str(k))

    capsys.readouterr()
    assert evaluate.main(run + ["--checkpoint", str(tmp_path / "frozen_opt")]) == 0
    table_run = _table(capsys)
    assert evaluate.main(run + ["--checkpoint", str(pth)]) == 0
    table_pth = _table(capsys)
    assert table_run == table_pth and "CIDEr" in table_run and "Bleu_4" in table_run


@pytest.mark.slow
def test_the_demo_learns_to_caption(tmp_path, capsys):
    """`configs/bita.py:demo`: stages 1, 2 and caption in one command on the synthetic captions;
    CIDEr on the test split far above always emitting the most common training caption."""
    args = [f"--config={CONFIG}:demo", f"--config.workdir={tmp_path / 'demo' / 'caption'}",
            f"--config.data.data_dir={tmp_path.parent / 'bita_data'}"]
    assert train.main(args) == 0
    for stage in ("stage1", "stage2", "caption"):
        assert (tmp_path / "demo" / stage / "checkpoints").is_dir(), stage
    final = json.loads((tmp_path / "demo" / "caption" / "final_metrics.json").read_text())
    assert final["test_CIDEr"] > 2 * final["test_baseline_CIDEr"], final
    assert final["test_CIDEr"] > final["test_baseline_CIDEr"] + 0.3, final
