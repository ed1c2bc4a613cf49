"""Checkpoints: cross-mesh restore, strict key checks, integer-keyed layers, training manager."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rsvl_jax import parallel as par
from rsvl_jax.checkpoint import (CheckpointError, CheckpointManager, read_metadata,
                                 restore_params, save_params)

wp = nnx.with_partitioning


class Net(nnx.Module):
    """A small model with a `nnx.List` of layers: its state has integer keys 0, 1."""

    def __init__(self, seed: int, dim: int = 8):
        rngs = nnx.Rngs(seed)
        init = nnx.initializers
        self.embed = nnx.Linear(4, dim, kernel_init=wp(init.lecun_normal(), ("embed", "mlp")),
                                bias_init=wp(init.normal(), ("mlp",)), rngs=rngs)
        self.layers = nnx.List([
            nnx.Linear(dim, dim, kernel_init=wp(init.lecun_normal(), ("mlp", "embed")),
                       bias_init=wp(init.normal(), ("embed",)), rngs=rngs) for _ in range(2)])
        self.scale = nnx.Param(jnp.full((dim,), float(seed)))

    def __call__(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return x * self.scale


def params_of(model):
    return nnx.state(model, nnx.Param)


def flat_values(state):
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state)}


def target_on(mesh, model_fn, filt=nnx.Param):
    """Abstract params with the mesh's shardings: what a resumed run passes to restore."""
    abstract = nnx.eval_shape(lambda: nnx.state(model_fn(), filt))
    return par.abstract_with_shardings(abstract, par.state_shardings(abstract, mesh))


@pytest.fixture(scope="module")
def mesh_a():
    return par.make_mesh({"fsdp": 4, "tensor": 2})


@pytest.fixture(scope="module")
def mesh_b():
    return par.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def test_params_roundtrip_onto_other_mesh_and_into_list_layers(tmp_path, mesh_a, mesh_b):
    src = params_of(Net(0))
    src = par.shard_state(src, par.state_shardings(src, mesh_a))
    save_params(tmp_path / "ckpt", src, metadata={"family": "toy", "preset": "tiny",
                                                   "config": {"dims": (4, 8)}})
    assert read_metadata(tmp_path / "ckpt") == {"family": "toy", "preset": "tiny",
                                                "config": {"dims": [4, 8]}, "num_params": 192}

    model = Net(1)  # different values everywhere, including under layers[0], layers[1]
    before = flat_values(params_of(model))
    restored = restore_params(tmp_path / "ckpt", target_on(mesh_b, lambda: Net(1)))
    assert restored["layers"][1]["kernel"].get_value().sharding.spec == P("tensor", "fsdp")
    assert restored["embed"]["kernel"].get_value().sharding.mesh.shape == mesh_b.shape
    nnx.update(model, restored)
    after, want = flat_values(params_of(model)), flat_values(src)
    assert after.keys() == want.keys() and ("layers", 1, "kernel") in after
    for k in want:
        np.testing.assert_array_equal(after[k], want[k])
        assert not np.array_equal(after[k], before[k]), k  # nnx.update really changed it


def test_restore_onto_one_device(tmp_path, mesh_a):
    src = params_of(Net(0))
    save_params(tmp_path / "ckpt", par.shard_state(src, par.state_shardings(src, mesh_a)))
    one = par.make_mesh({"data": 1}, devices=jax.devices()[:1])
    restored = restore_params(tmp_path / "ckpt", target_on(one, lambda: Net(1)))
    leaf = restored["layers"][0]["kernel"].get_value()
    assert leaf.sharding.device_set == {jax.devices()[0]}
    np.testing.assert_array_equal(leaf, src["layers"][0]["kernel"].get_value())


def test_mismatched_tree_names_every_bad_key(tmp_path):
    save_params(tmp_path / "ckpt", params_of(Net(0)))
    target = nnx.eval_shape(lambda: params_of(Net(0, dim=6)))  # every shape differs
    with pytest.raises(CheckpointError, match=r"shape mismatch: layers/0/kernel: "
                                              r"checkpoint \(8, 8\) vs wanted \(6, 6\)"):
        restore_params(tmp_path / "ckpt", target)
    target = {"embed": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)},
              "layers": {0: {"kernel": jnp.zeros((8, 8)), "bias": jnp.zeros(8)}},
              "extra": jnp.zeros(2)}
    with pytest.raises(CheckpointError) as e:
        restore_params(tmp_path / "ckpt", target)
    msg = str(e.value)
    assert "missing from checkpoint: extra" in msg
    assert "unexpected in checkpoint: layers/1/kernel" in msg and "unexpected in checkpoint: scale" in msg


def test_rng_keys_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="RNG key"):
        save_params(tmp_path / "ckpt", {"w": jnp.ones(2), "key": jax.random.key(0)})


def test_manager_keeps_last_n_and_best_and_resumes(tmp_path, mesh_a, mesh_b):
    tx = optax.adamw(1e-2)
    params = params_of(Net(0))
    params = par.shard_state(params, par.state_shardings(params, mesh_a))
    opt_state = tx.init(params)
    val = {1: 0.5, 2: 0.9, 3: 0.1, 4: 0.2, 5: 0.3, 6: 0.4}  # best val_mr at step 2
    test = {1: 0.7}                                          # test_mr only measured at step 1
    mgr = CheckpointManager(tmp_path / "run", keep=2)
    for step in range(1, 7):
        params = jax.tree.map(lambda x: x + 1.0, params)
        metrics = {"val_mr": val[step], **({"test_mr": test[step]} if step in test else {})}
        mgr.save(step, params, opt_state, {"epoch": step // 3, "index": step}, metrics)
    mgr.close()

    mgr = CheckpointManager(tmp_path / "run", keep=2)  # a fresh process resuming
    assert mgr.all_steps() == [1, 2, 5, 6] and mgr.latest_step() == 6
    assert mgr.best_step("val_mr") == 2 and mgr.best_step("test_mr") == 1
    p_target = target_on(mesh_b, lambda: Net(3))
    o_target = jax.eval_shape(tx.init, p_target)
    o_target = par.abstract_with_shardings(o_target, par.state_shardings(o_target, mesh_b))
    p, o, data, step = mgr.restore(None, p_target, o_target)
    assert step == 6 and data == {"epoch": 2, "index": 6}
    for k, v in flat_values(params).items():
        np.testing.assert_array_equal(flat_values(p)[k], v)
    assert p["embed"]["kernel"].get_value().sharding.mesh.shape == mesh_b.shape
    assert o[0].mu["embed"]["kernel"].get_value().sharding.spec == P("fsdp", "tensor")
    assert int(o[0].count) == 0 and type(o) is type(opt_state)

    p2, o2, data2, step2 = mgr.restore(2, p_target)
    assert (step2, data2["index"], o2) == (2, 2, None)
    np.testing.assert_array_equal(np.asarray(p2["scale"].get_value()),
                                  np.asarray(params["scale"].get_value()) - 4.0)
    with pytest.raises(FileNotFoundError, match="step 3"):
        mgr.restore(3, p_target)

    # After the restart, later saves still respect the best steps found before it.
    mgr.save(7, params, opt_state, {}, {"val_mr": 0.2})
    mgr.save(8, params, opt_state, {})
    mgr.close()
    assert CheckpointManager(tmp_path / "run", keep=2).all_steps() == [1, 2, 7, 8]


def test_manager_leafless_opt_state_sync(tmp_path):
    params = {"w": jnp.arange(3.0)}
    tx = optax.sgd(0.1)  # its state has no arrays at all; Orbax refuses empty items
    with CheckpointManager(tmp_path / "run", keep=1, best_metrics=(), async_save=False) as mgr:
        mgr.save(5, params, tx.init(params), {"pos": 5})
        p, o, data, step = mgr.restore(None, jax.eval_shape(lambda: params),
                                       jax.eval_shape(tx.init, params))
    assert step == 5 and data == {"pos": 5} and o == tx.init(params)
    np.testing.assert_array_equal(p["w"], params["w"])
