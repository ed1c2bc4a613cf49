"""The paper's batch in pieces: GradCache chunks give the full batch's loss and every gradient
(PIR, BITA stage 1; dropout on; 1 and 8 devices), and optax.MultiSteps micro-batches give the
large batch's update for BITA's LM stage."""
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rsvl_jax import parallel, tasks, train
from rsvl_jax.config import ConfigError, load_config

REPO = pathlib.Path(__file__).resolve().parents[2]
BATCH = 16


def _pir_config(*extra):
    return load_config(f"{REPO}/configs/pir.py:demo", [
        "--config.model.preset=pir_test", "--config.model.text_vocab_size=256", "--config.data.image_size=32",
        f"--config.batch_size={BATCH}", "--config.reference_device_batch=4", *extra])


def _bita_config(stage, *extra):
    return load_config(f"{REPO}/configs/bita.py:stage={stage},demo",
                       [f"--config.batch_size={BATCH}", "--config.reference_device_batch=4", *extra])


def _pir_batch(rng):
    return {"image": rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32),
            "input_ids": rng.integers(1, 256, size=(BATCH, 12)).astype(np.int32),
            "idx": np.repeat(np.arange(BATCH // 2), 2).astype(np.int32),  # two captions per image
            "label": rng.integers(0, 3, size=BATCH).astype(np.int32)}


def _bita_batch(rng, vocab):
    lengths = rng.integers(4, 10, size=BATCH)
    mask = (np.arange(10)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask, rng.integers(4, vocab, size=(BATCH, 10)), 1).astype(np.int32)  # pad id 1 (OPT)
    return {"image": rng.normal(size=(BATCH, 64, 64, 3)).astype(np.float32), "text_ids": ids, "text_mask": mask}


def _loss_and_grads(config, batch, mesh, chunk, steps=(5,)):
    """[(loss, metrics, batch stats, grads)] of the step at each of `steps` with GradCache
    chunks of `chunk` examples (0 = off)."""
    with jax.set_mesh(mesh), parallel.axis_rules(parallel.DEFAULT_RULES):
        task = dataclasses.replace(tasks.get(config), chunk_size=chunk)
        model = parallel.init_sharded(task.make_model, mesh, parallel.DEFAULT_RULES)
        graphdef, trainable, frozen, mutable, rest = train.split_model(model, task)
        fn = jax.jit(train.make_loss_and_grad(graphdef, task, seed=3))
        batch = parallel.host_local_to_global(batch, mesh)
        return [jax.device_get(fn(trainable, frozen, mutable, rest, batch, jnp.int32(s))) for s in steps]


def _assert_same(full, chunked):
    loss, metrics, stats, grads = full
    c_loss, c_metrics, c_stats, c_grads = chunked
    np.testing.assert_allclose(c_loss, loss, rtol=1e-6)
    for k in metrics:
        np.testing.assert_allclose(c_metrics[k], metrics[k], rtol=1e-6, err_msg=k)
    for (k, a), (_, b) in zip(stats.flat_state(), c_stats.flat_state()):
        np.testing.assert_allclose(b[...], a[...], rtol=1e-5, atol=1e-6, err_msg=str(k))
    flat, c_flat = dict(grads.flat_state()), dict(c_grads.flat_state())
    assert flat.keys() == c_flat.keys()
    scale = max(float(np.abs(g[...]).max()) for g in flat.values())
    for k in flat:
        np.testing.assert_allclose(c_flat[k][...], flat[k][...], rtol=1e-4, atol=1e-6 * scale, err_msg=str(k))


# (mesh, devices, chunk sizes compared with the full batch of 16 in blocks of 4; each size
# is a compilation, so PIR, the slower one, takes one per mesh)
MESHES = {"1 device": ({"data": 1, "fsdp": 1, "tensor": 1}, 1, (4, 8)),
          "8 devices": ({"data": 4, "fsdp": 2, "tensor": 1}, 8, (8,))}


@pytest.mark.parametrize("mesh_name", MESHES)
def test_pir_chunks_give_the_full_batch_loss_and_gradients(mesh_name):
    spec, n, chunks = MESHES[mesh_name]
    mesh = parallel.make_mesh(spec, devices=jax.devices()[:n])
    config = _pir_config()
    batch = _pir_batch(np.random.default_rng(0))
    full, other_step = _loss_and_grads(config, batch, mesh, 0, steps=(5, 6))
    assert float(full[1]["loss_affil"]) > 0 and np.isfinite(full[0])
    # Dropout is on (else the comparison would not test the keys): another step's masks
    # give another loss.
    assert abs(float(full[0]) - float(other_step[0])) > 1e-4
    for chunk in chunks[:1]:
        _assert_same(full, _loss_and_grads(config, batch, mesh, chunk)[0])


@pytest.mark.parametrize("mesh_name", MESHES)
def test_bita_stage1_chunks_give_the_full_batch_loss_and_gradients(mesh_name):
    spec, n, chunks = MESHES[mesh_name]
    mesh = parallel.make_mesh(spec, devices=jax.devices()[:n])
    config = _bita_config("1")
    batch = _bita_batch(np.random.default_rng(1), vocab=200)
    full, other_step = _loss_and_grads(config, batch, mesh, 0, steps=(5, 6))
    assert abs(float(full[0]) - float(other_step[0])) > 1e-5
    for chunk in chunks:
        _assert_same(full, _loss_and_grads(config, batch, mesh, chunk)[0])


def test_chunk_size_and_accumulation_are_checked():
    with pytest.raises(ConfigError, match="chunk_size=6"):
        tasks.get(_pir_config("--config.chunk_size=6"))
    with pytest.raises(ConfigError, match="use chunk_size instead"):
        tasks.get(_bita_config("1", "--config.accumulate_steps=2"))
    with pytest.raises(ConfigError, match="not a multiple of reference_device_batch=4"):
        tasks.get(_bita_config("2", "--config.accumulate_steps=8"))


def test_multisteps_micro_batches_give_the_large_batch_update():
    """Two micro-batches of 8 through optax.MultiSteps = one step of 16 (BITA stage 2, dropout on)."""
    mesh = parallel.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:2])
    batch = _bita_batch(np.random.default_rng(2), vocab=600)

    def run(accum):
        config = _bita_config("2", f"--config.accumulate_steps={max(accum, 1)}")
        with jax.set_mesh(mesh), parallel.axis_rules(parallel.DEFAULT_RULES):
            task = tasks.get(config)
            model = parallel.init_sharded(task.make_model, mesh, parallel.DEFAULT_RULES)
            graphdef, trainable, frozen, mutable, rest = train.split_model(model, task)
            tx, _ = task.optimizer(trainable, 10, 100)
            if accum > 1:
                tx = optax.MultiSteps(tx, every_k_schedule=accum)
            step = jax.jit(train.make_train_step(graphdef, task, tx, 0))
            opt_state, losses = tx.init(trainable), []
            if not accum:  # the initial parameters
                return jax.device_get(trainable), None
            for i in range(accum):
                micro = {k: v[i * BATCH // accum:(i + 1) * BATCH // accum] for k, v in batch.items()}
                trainable, mutable, opt_state, metrics = step(trainable, frozen, mutable, rest, opt_state,
                                                             parallel.host_local_to_global(micro, mesh),
                                                             jnp.int32(i))
                losses.append(float(metrics["loss"]))
            return jax.device_get(trainable), np.mean(losses)

    start, _ = run(0)
    large, loss = run(1)
    micro, micro_loss = run(2)
    np.testing.assert_allclose(micro_loss, loss, rtol=1e-6)
    moved = 0
    for (k, a), (_, b), (_, s) in zip(large.flat_state(), micro.flat_state(), start.flat_state()):
        np.testing.assert_allclose(b[...], a[...], rtol=1e-5, atol=1e-6, err_msg=str(k))
        moved += int(np.any(a[...] != s[...]))
    assert moved > 10  # the update happened (in the micro run: after the second micro-batch)
