"""The command line as a person meets it: --help everywhere, one `error:` line and status 2
for every user mistake, naming the key and what it accepts."""
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
DEMO = f"--config={REPO}/configs/pir.py:demo"


def _run(module, *args, devices=1, tmp_path=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.pop("RSVL_DEBUG", None)
    extra = [f"--config.workdir={tmp_path / 'run'}"] if tmp_path is not None and DEMO in args else []
    return subprocess.run([sys.executable, "-m", module, *args, *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module", ["rsvl_jax.train", "rsvl_jax.evaluate"])
def test_help_without_and_with_config(module):
    plain = _run(module, "--help")
    assert plain.returncode == 0, plain.stderr
    assert "--config.a.b=VALUE" in plain.stdout and "Traceback" not in plain.stderr
    with_config = _run(module, DEMO, "--help")
    assert with_config.returncode == 0, with_config.stderr
    assert "resolved configuration" in with_config.stdout
    assert "task: pir" in with_config.stdout


@pytest.mark.parametrize("override, devices, expected", [
    ("--config.loss.kind=tripplet", 1, ["'loss.kind'", "'tripplet'", "'contrastive'", "'triplet'"]),
    ("--config.model.preset=pir_tiny", 1, ["'model.preset'", "'pir_tiny'", "'pir_demo'"]),
    ("--config.model.swin_weights=5", 1, ["'model.swin_weights'", "must be a path"]),
    ("--config.no_such_key=1", 1, ["'no_such_key'"]),
    ("--config.batch_size=31 --config.reference_device_batch=31", 2,
     ["batch_size=31 is not divisible by the 2 data-parallel devices"]),
])
def test_user_errors_are_one_line_and_status_2(tmp_path, override, devices, expected):
    result = _run("rsvl_jax.train", DEMO, *override.split(), devices=devices, tmp_path=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


def test_evaluate_unknown_step_lists_the_steps(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    # A run directory with steps 2 and 4 (tiny trees: the step list is what is checked).
    code = ("import jax.numpy as jnp; from rsvl_jax.checkpoint import CheckpointManager as M; "
            f"m = M({str(ckpts)!r}, best_metrics=()); "
            "[m.save(s, {'w': jnp.ones(2)}, {}, {}) for s in (2, 4)]; m.close()")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=REPO)
    result = _run("rsvl_jax.evaluate", DEMO, "--checkpoint", str(tmp_path / "run"), "--step", "3",
                  "--config.data.synthetic_train_images=8", "--config.data.synthetic_eval_images=4",
                  "--config.model.preset=pir_test", "--config.model.text_vocab_size=256",
                  "--config.data.image_size=32", f"--config.data.data_dir={tmp_path / 'datasets'}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no checkpoint step 3" in result.stderr and "steps there: 2, 4" in result.stderr
