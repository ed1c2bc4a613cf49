"""A damaged newest checkpoint is reported in one line, moved aside (never deleted), and the
resume falls back to the newest intact step; a real mismatch is still an error."""
import glob
import os

import jax.numpy as jnp
import numpy as np
import pytest

from rsvl_jax.checkpoint import CheckpointError, CheckpointManager, MissingStepError


def _params(v):
    return {"w": jnp.full((4, 4), float(v)), "b": jnp.arange(3.0) + v}


def _opt(v):
    return {"mu": jnp.full((2,), float(v))}


def _saved(tmp_path, steps=(1, 2)):
    mgr = CheckpointManager(tmp_path / "ckpt", keep=5, best_metrics=())
    for s in steps:
        mgr.save(s, _params(s), _opt(s), {"train": {"pos": s}})
    mgr.close()
    return tmp_path / "ckpt"


def _restore(directory):
    warnings = []
    mgr = CheckpointManager(directory, keep=5, best_metrics=())
    try:
        out = mgr.restore_newest_intact(_params(0), _opt(0), warn=warnings.append)
    finally:
        mgr.close()
    return out, warnings


@pytest.mark.parametrize("damage", ["truncate", "delete_metadata"])
def test_damaged_newest_step_falls_back_and_is_kept(tmp_path, damage):
    directory = _saved(tmp_path)
    if damage == "truncate":
        for f in glob.glob(str(directory / "2" / "params" / "d" / "*")):
            with open(f, "r+b") as fh:
                fh.truncate(10)
    else:
        os.remove(directory / "2" / "params" / "_METADATA")
    (params, opt, data, step), warnings = _restore(directory)
    assert step == 1 and data == {"train": {"pos": 1}}
    np.testing.assert_array_equal(np.asarray(params["w"]), np.full((4, 4), 1.0))
    np.testing.assert_array_equal(np.asarray(opt["mu"]), np.full((2,), 1.0))
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "step 2" in warnings[0]
    assert ("_METADATA" in warnings[0]) if damage == "delete_metadata" else ("size 10" in warnings[0])
    # Nothing was deleted: the intact step is in place and the damaged one was moved aside.
    assert (directory / "1").is_dir()
    assert (tmp_path / "ckpt.damaged" / "2" / "params").is_dir()


def test_all_damaged_is_one_clear_error(tmp_path):
    directory = _saved(tmp_path)
    for s in (1, 2):
        os.remove(directory / str(s) / "opt_state" / "_METADATA")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        _restore(directory)


def test_mismatch_is_an_error_not_damage(tmp_path):
    directory = _saved(tmp_path)
    mgr = CheckpointManager(directory, keep=5, best_metrics=())
    with pytest.raises(CheckpointError, match="missing from checkpoint: extra"):
        mgr.restore_newest_intact({**_params(0), "extra": jnp.zeros(2)}, _opt(0), warn=print)
    mgr.close()
    assert (directory / "2").is_dir()  # not moved: the files are fine, the model is not


def test_unknown_step_lists_the_steps_there(tmp_path):
    mgr = CheckpointManager(_saved(tmp_path), keep=5, best_metrics=())
    with pytest.raises(MissingStepError, match=r"steps there: 1, 2"):
        mgr.restore(7, _params(0))
    mgr.close()
