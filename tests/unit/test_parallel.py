"""Mesh construction, logical-axis rules and sharded placement on 8 simulated CPU devices."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from rsvl_jax import parallel as par

wp = nnx.with_partitioning


class MLP(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers
        self.up = nnx.Linear(8, 16, kernel_init=wp(init.lecun_normal(), ("embed", "mlp")),
                             bias_init=wp(init.normal(), ("mlp",)), rngs=rngs)
        self.down = nnx.Linear(16, 8, kernel_init=wp(init.lecun_normal(), ("mlp", "embed")),
                               bias_init=wp(init.normal(), ("embed",)), rngs=rngs)
        self.odd = nnx.Param(wp(init.normal(), ("mlp", "embed"))(rngs.params(), (3, 8)))
        self.plain = nnx.Param(jnp.ones((8,)))  # no axis names: replicated

    def __call__(self, x):
        h = par.constrain(jax.nn.gelu(self.up(x)), ("batch", "mlp"))
        return self.down(h) + self.plain + self.odd.sum(0)


@pytest.fixture(scope="module")
def mesh():
    return par.make_mesh({"fsdp": 4, "tensor": 2})


def test_make_mesh_fills_minus_one_with_auto_axes():
    m = par.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert m.axis_types == (AxisType.Auto,) * 3
    assert dict(par.make_mesh({"data": 8}).shape) == {"data": 8}
    # A ConfigDict sorts its keys; the standard axes still come out in canonical order.
    cfg = ml_collections.ConfigDict({"tensor": 2, "fsdp": 1, "data": -1})
    assert par.make_mesh(cfg).axis_names == ("data", "fsdp", "tensor")
    assert par.make_mesh([("tensor", 2), ("data", -1)]).axis_names == ("tensor", "data")


@pytest.mark.parametrize("axes, msg", [
    ({"data": 3, "fsdp": 2}, "product 6 != 8"),
    ({"data": -1, "fsdp": -1}, "at most one"),
    ({"data": -1, "fsdp": 3}, "not divisible by 3"),
    ({"data": 0, "fsdp": -1}, "positive"),
])
def test_make_mesh_bad_sizes(axes, msg):
    with pytest.raises(ValueError, match=msg):
        par.make_mesh(axes)


def test_rules_to_specs(mesh):
    spec = par.logical_to_spec
    assert spec(("embed", "mlp"), (8, 16), mesh) == P("fsdp", "tensor")
    assert spec(("mlp",), (3,), mesh) == P(None)  # 3 is not divisible by tensor=2: replicated
    assert spec(("kv", None, "unknown"), (8, 8, 8), mesh) == P(None, None, None)
    # `data` is not in this mesh, so batch uses fsdp alone; embed then finds fsdp taken.
    assert spec(("batch", "length", "embed"), (8, 5, 16), mesh) == P("fsdp", None, None)
    m3 = par.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert spec(("batch", "embed"), (8, 4), m3) == P(("data", "fsdp"), None)
    assert spec(("batch", "embed"), (6, 4), m3) == P(None, "fsdp")  # 6 % 4 != 0
    # An axis used by an earlier dim moves the name to its next rule.
    rules = [("embed", "tensor"), ("embed", "fsdp"), ("mlp", "tensor")]
    assert spec(("mlp", "embed"), (16, 8), mesh, rules) == P("tensor", "fsdp")
    assert spec(("embed",), (4,), mesh, [["embed", ["tensor"]]]) == P("tensor")  # config lists
    with pytest.raises(ValueError, match="do not match shape"):
        spec(("embed",), (4, 4), mesh)


def test_shard_mlp_and_jitted_forward_matches(mesh):
    model = MLP(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    placed = par.shard_state(state, par.state_shardings(state, mesh))
    specs = {"/".join(map(str, k)): v.sharding.spec for k, v in nnx.to_flat_state(placed)}
    assert specs == {"up/kernel": P("fsdp", "tensor"), "up/bias": P("tensor"),
                     "down/kernel": P("tensor", "fsdp"), "down/bias": P("fsdp"),
                     "odd": P(None, "fsdp"), "plain": P()}
    # The abstract state gives the same shardings without allocating anything.
    abstract = nnx.eval_shape(lambda: nnx.state(MLP(nnx.Rngs(0))))
    abstract_specs = jax.tree.leaves(jax.tree.map(lambda s: s.spec,
                                                  par.state_shardings(abstract, mesh)))
    assert abstract_specs == jax.tree.leaves(jax.tree.map(lambda a: a.sharding.spec, placed))

    x = jax.random.normal(jax.random.key(1), (8, 8))
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    with jax.set_mesh(mesh):
        y = fwd(placed, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(model(x)), atol=1e-5)


def test_optimizer_state_follows_params(mesh):
    params = nnx.state(MLP(nnx.Rngs(0)), nnx.Param)
    opt_state = jax.eval_shape(optax.adamw(1e-3).init, params)
    sh = par.shardings_for_tree(opt_state, mesh)
    adam = sh[0]
    assert adam.count.spec == P()
    assert adam.mu["up"]["kernel"].get_value().spec == P("fsdp", "tensor")
    assert adam.nu["down"]["kernel"].get_value().spec == P("tensor", "fsdp")
    placed = par.shard_state(optax.adamw(1e-3).init(params), sh)
    assert placed[0].mu["up"]["kernel"].get_value().sharding.spec == P("fsdp", "tensor")


def test_constrain(mesh):
    x = jnp.ones((8, 6))
    assert par.constrain(x, ("batch", "embed")) is x  # no mesh: untouched
    with jax.set_mesh(mesh):
        y = jax.jit(lambda x: par.constrain(x * 2, ("batch", "mlp")))(x)
        with par.axis_rules([("batch", "tensor")]):
            z = jax.jit(lambda x: par.constrain(x * 2, ("batch", None)))(x)
    assert y.sharding.spec == P("fsdp", "tensor")
    assert z.sharding.spec == P("tensor")
    np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((8, 6)))


def test_batch_to_global(mesh):
    m3 = par.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert par.batch_sharding(m3).spec == P(("data", "fsdp"))
    assert par.batch_sharding(mesh).spec == P(("fsdp",))
    batch = {"image": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "ids": np.arange(8)}
    out = par.host_local_to_global(batch, m3)
    assert out["image"].shape == (8, 3) and out["image"].sharding.spec == P(("data", "fsdp"))
    assert len(out["image"].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(out["ids"]), batch["ids"])


def test_single_process_does_not_initialize(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    assert par.maybe_initialize_distributed() is False
