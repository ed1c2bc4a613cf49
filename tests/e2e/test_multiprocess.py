"""Two local processes (gloo CPU collectives over 127.0.0.1), 2 CPU devices each, train the PIR
demo and a BITA caption stage exactly as one process with 4 devices does: same losses,
parameters and evaluation; a checkpoint written by two processes restores in one, and one
written by one resumes in two."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from .test_pir_train import REPO, _final_params, tiny_config, tiny_overrides

SMALL = ("--config.data.synthetic_train_images=10", "--config.checkpoint_every_steps=0")  # 3 steps an epoch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(tmp_path, name, *extra):
    return [sys.executable, "-m", "rsvl_jax.train", f"--config={REPO}/configs/pir.py:demo",
            *tiny_overrides(tmp_path, name, *SMALL, *extra)]


def _bita_command(tmp_path, stage, name, *extra):
    return [sys.executable, "-m", "rsvl_jax.train", f"--config={REPO}/configs/bita.py:stage={stage},demo",
            f"--config.workdir={tmp_path / name}", f"--config.data.data_dir={tmp_path / 'bita_data'}",
            "--config.log_every=1", "--config.eval_batch_size=20", *extra]


def _env(devices, **extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.update(extra)
    return env


def _run_processes(tmp_path, name, n, *extra, timeout=600, command=None):
    """Starts `n` processes of one run, waits for all, kills them all on failure or timeout."""
    port = _free_port()
    logs = [open(tmp_path / f"{name}.{i}.log", "w") for i in range(n)]
    procs = [subprocess.Popen(command or _command(tmp_path, name, *extra), cwd=REPO, stdout=logs[i], stderr=subprocess.STDOUT,
                              env=_env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n),
                                       JAX_PROCESS_ID=str(i)))
             for i in range(n)]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    texts = [(tmp_path / f"{name}.{i}.log").read_text() for i in range(n)]
    assert codes == [0] * n, "\n".join(t[-3000:] for t in texts)
    return "\n".join(texts)  # whole logs: a line early in the run must stay findable


def _records(workdir):
    return {r["step"]: r for r in map(json.loads, (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines())}


def _assert_same_run(a, b, lr=5e-4):
    ra, rb = _records(a.workdir), _records(b.workdir)
    assert sorted(ra) == sorted(rb)
    for step, rec in ra.items():
        for key in ("loss", "loss_contr", "loss_affil", "val_r_mean", "test_r_mean", "val_txt_r1"):
            if key in rec:
                np.testing.assert_allclose(rec[key], rb[step][key], rtol=1e-4, atol=1e-4, err_msg=f"{key} {step}")
    pa, da, sa = _final_params(a)
    pb, db, sb = _final_params(b)
    assert sa == sb
    for (k, x), (_, y) in zip(pa.flat_state(), pb.flat_state()):
        # Attention key biases have a zero true gradient (softmax ignores them): their float-noise
        # gradients become Adam steps of up to lr either way, so they agree to steps x lr only.
        key_bias = k[-1] == "bias" and any(str(p) in ("key", "linear_k") for p in k)
        np.testing.assert_allclose(x[...], y[...], atol=sa * lr if key_bias else 2e-5, err_msg=str(k))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_train_and_evaluate_like_one(tmp_path):
    one = subprocess.run(_command(tmp_path, "one", "--config.max_steps=3"), cwd=REPO, env=_env(4),
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    _run_processes(tmp_path, "two", 2, "--config.max_steps=3")
    a = tiny_config(tmp_path, "one", *SMALL, "--config.max_steps=3")
    b = tiny_config(tmp_path, "two", *SMALL, "--config.max_steps=3")
    assert "val_r_mean" in _records(a.workdir)[3]  # the epoch ended: both evaluated
    _assert_same_run(a, b)  # the two-process checkpoint restores here, in one process

    # One process's checkpoint resumes in two processes, and goes on as one process would.
    (tmp_path / "cont_two").mkdir()
    subprocess.run(["cp", "-r", str(tmp_path / "one" / "checkpoints"), str(tmp_path / "cont_two")], check=True)
    subprocess.run(["cp", str(tmp_path / "one" / "metrics.jsonl"), str(tmp_path / "cont_two")], check=True)
    log = _run_processes(tmp_path, "cont_two", 2, "--config.max_steps=6")
    assert "resumed from step 3" in log
    cont = subprocess.run(_command(tmp_path, "one", "--config.max_steps=6"), cwd=REPO, env=_env(4),
                          capture_output=True, text=True, timeout=600)
    assert cont.returncode == 0, cont.stdout[-3000:] + cont.stderr[-3000:]
    _assert_same_run(tiny_config(tmp_path, "one", *SMALL, "--config.max_steps=6"),
                     tiny_config(tmp_path, "cont_two", *SMALL, "--config.max_steps=6"))


def _run_one(command, devices=4):
    result = subprocess.run(command, cwd=REPO, env=_env(devices), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_train_a_bita_caption_stage_like_one(tmp_path):
    """Caption fine-tuning (beam-search evaluation, tiny models) from one stage-2 run."""
    _run_one(_bita_command(tmp_path, "1", "s1", "--config.max_steps=1"))
    _run_one(_bita_command(tmp_path, "2", "s2", "--config.max_steps=1", f"--config.model.init_checkpoint={tmp_path / 's1'}"))
    extra = (f"--config.model.init_checkpoint={tmp_path / 's2'}", "--config.max_steps=2")
    _run_one(_bita_command(tmp_path, "caption", "one", *extra))
    _run_processes(tmp_path, "two", 2, command=_bita_command(tmp_path, "caption", "two", *extra))
    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2]
    for step in one:
        np.testing.assert_allclose(one[step]["loss"], two[step]["loss"], rtol=1e-5)
    finals = [json.loads((tmp_path / run / "final_metrics.json").read_text()) for run in ("one", "two")]
    assert finals[0].keys() == finals[1].keys() and "test_CIDEr" in finals[0]
    for key in finals[0]:
        np.testing.assert_allclose(finals[1][key], finals[0][key], rtol=1e-6, err_msg=key)
    captions = [json.loads((tmp_path / run / "captions" / "test_step2.json").read_text()) for run in ("one", "two")]
    assert [c["caption"] for c in captions[0]] == [c["caption"] for c in captions[1]]
