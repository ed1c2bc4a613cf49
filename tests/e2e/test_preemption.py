"""Preemption: SIGTERM mid-epoch saves and exits; the same command resumes exactly, and the
logs hold one record per step. A damaged newest checkpoint falls back to the previous step."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rsvl_jax import train

from .test_pir_train import REPO, _final_params, _records, tiny_config, tiny_overrides

EXTRA = ("--config.max_steps=8", "--config.checkpoint_every_steps=0")


def _command(tmp_path, name):
    return [sys.executable, "-m", "rsvl_jax.train", f"--config={REPO}/configs/pir.py:demo",
            *tiny_overrides(tmp_path, name, *EXTRA)]


def _logged_steps(workdir):
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_sigterm_mid_epoch_then_rerun_equals_uninterrupted_run(tmp_path):
    straight = tiny_config(tmp_path, "straight", *EXTRA)
    train.train(straight)
    killed = tiny_config(tmp_path, "killed", *EXTRA)

    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_command(tmp_path, "killed"), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 400
        while not any(s >= 2 for s in _logged_steps(killed.workdir)):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()
            assert time.time() < deadline, "the run never logged step 2"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    first = (tmp_path / "first.log").read_text()
    assert "re-run the same command to resume" in first, first
    stopped_at = max(int(s) for s in os.listdir(pathlib.Path(killed.workdir) / "checkpoints") if s.isdigit())
    assert 2 <= stopped_at < 8  # mid-epoch (an epoch is 12 steps), before the end of the run

    rerun = subprocess.run(_command(tmp_path, "killed"), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resumed from step {stopped_at}" in rerun.stdout

    p1, d1, s1 = _final_params(straight)
    p2, d2, s2 = _final_params(killed)
    assert s1 == s2 == 8 and d1 == d2
    for (k, a), (_, b) in zip(p1.flat_state(), p2.flat_state()):
        np.testing.assert_allclose(a[...], b[...], atol=2e-6, err_msg=str(k))
    steps = _logged_steps(killed.workdir)
    assert steps == list(range(1, 9))  # exactly one record per logged step, in order
    losses1 = {r["step"]: r["loss"] for r in _records(straight.workdir)}
    losses2 = {r["step"]: r["loss"] for r in _records(killed.workdir)}
    for step in range(1, 9):
        np.testing.assert_allclose(losses1[step], losses2[step], rtol=1e-5, err_msg=f"step {step}")


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_previous_step(tmp_path):
    args = ("--config.max_steps=4", "--config.checkpoint_every_steps=2")
    train.train(tiny_config(tmp_path, "damaged", *args))
    ckpts = tmp_path / "damaged" / "checkpoints"
    assert {"2", "4"} <= set(os.listdir(ckpts))
    # Array data lives in the OCDBT data files (`.../d/<hash>`), not in the metadata files. Which
    # of them a restore reads (the per-process ones or the merged copy) varies from run to run,
    # so every one is truncated: damaging only the largest let a restore succeed now and then.
    arrays = [p for p in (ckpts / "4" / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    largest = max(arrays, key=lambda p: p.stat().st_size)
    for path in arrays:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)

    # Re-run the same command, as a user would (a fresh process: nothing cached in memory).
    command = [sys.executable, "-m", "rsvl_jax.train", f"--config={REPO}/configs/pir.py:demo",
               *tiny_overrides(tmp_path, "damaged", *args)]
    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out
    warning = [line for line in out.splitlines() if line.startswith("warning: checkpoint step 4")]
    assert len(warning) == 1, out
    assert "resumed from step 2" in rerun.stdout
    assert "Event loop is closed" not in out and "Traceback" not in out, out[-3000:]
    # Both checkpoint directories are still on disk: step 2 in place, the damaged 4 moved aside.
    assert (ckpts / "2").is_dir()
    assert (tmp_path / "damaged" / "checkpoints.damaged" / "4" / largest.relative_to(ckpts / "4")).is_file()
    assert (ckpts / "4").is_dir()  # written again by the resumed run
