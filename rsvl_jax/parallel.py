"""Meshes, logical-axis rules and shardings for parameters, optimiser state and batches.

Modules name the axes of every parameter (`embed`, `mlp`, `heads`, ...); this file maps
those logical names to mesh axes with one ordered rule list, so the physical layout is a
config choice, never a model edit.

Rule semantics (one ordered list of `(logical_name, mesh_axes)` pairs, `mesh_axes` a mesh
axis name, a tuple of them, or None): for each dimension of an array, the first rule for that
dimension's logical name whose mesh axes are (a) not already used by an earlier dimension of
the same PartitionSpec and (b) have a total size that divides the dimension wins. If no rule
fits, the dimension is replicated (so a 3-wide bias on a 2-way `tensor` axis simply stays
whole instead of failing). A `None` rule means "replicate" and always fits. Mesh axes a rule
names but the mesh lacks are dropped from that rule; logical names with no rule replicate.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Ordered: the first fitting rule for a logical name wins (see the module docstring).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("length", None),
    ("classes", None),
    ("norm", None),
    ("layers", None),
)

Rules = Sequence[tuple[str, Any]]


def make_mesh(axes: Mapping[str, int] | Sequence[tuple[str, int]] | None = None,
              devices=None) -> jax.sharding.Mesh:
    """Builds a mesh from `{name: size}` (or `[(name, size), ...]`) in the given order; one
    size may be -1 ("the rest of the devices").

    A ConfigDict iterates its keys alphabetically, so for one the standard axes come first
    in `MESH_AXES` order (data, fsdp, tensor), then any others. Axes are explicitly
    `AxisType.Auto` (jax.make_mesh would default to Explicit), so XLA propagates shardings
    from the inputs and from `constrain` hints.
    """
    if isinstance(axes, ml_collections.ConfigDict):
        given = axes.to_dict()
        axes = {**{k: given.pop(k) for k in MESH_AXES if k in given}, **given}
    axes = dict(axes or {"data": -1})
    devices = list(jax.devices() if devices is None else devices)
    names, sizes = tuple(axes), [int(s) for s in axes.values()]
    n = len(devices)
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {axes}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {axes}: sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"mesh {axes}: {n} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh {axes}: product {math.prod(sizes)} != {n} devices")
    return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names),
                         devices=devices)


def normalize_rules(rules: Rules | None) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
    """Turns config rules (lists from ConfigDict, bare strings) into `(name, tuple|None)`."""
    out = []
    for rule in DEFAULT_RULES if rules is None else rules:
        name, target = rule
        if target is not None:
            target = (target,) if isinstance(target, str) else tuple(target)
        out.append((name, target))
    return tuple(out)


def _mesh_sizes(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh,
                    rules: Rules | None = None) -> P:
    """Maps per-dimension logical names to a PartitionSpec for `mesh` (Mesh or AbstractMesh)."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    sizes = _mesh_sizes(mesh)
    rules = normalize_rules(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape):
        chosen = None
        for rule_name, target in rules if name is not None else ():
            if rule_name != name:
                continue
            if target is None:
                break  # explicit replication
            target = tuple(a for a in target if a in sizes)
            if not target or used.intersection(target) or dim % math.prod(sizes[a] for a in target):
                continue
            chosen = target
            break
        if chosen:
            used.update(chosen)
            spec.append(chosen[0] if len(chosen) == 1 else chosen)
        else:
            spec.append(None)
    return P(*spec)


def _logical_axes(var: nnx.Variable):
    """The logical axis names a Variable was built with (`nnx.with_partitioning`), or None."""
    meta = var.get_metadata()
    names = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
    return tuple(names) if names else None


def shardings_for_tree(tree: Any, mesh, rules: Rules | None = None) -> Any:
    """A tree of NamedShardings matching `tree` (concrete or abstract, e.g. `nnx.eval_shape`).

    `nnx.Variable`s with logical-axis metadata are sharded by the rules; every other array
    leaf is replicated. Optax states built from an `nnx.State` of params (`tx.init(params)`)
    hold Variables that copy the params' metadata, so Adam moments get the params' layout
    and counters are replicated. Trees already reduced to pure dicts carry no metadata and
    are replicated wholesale: shard from the `nnx.State` instead.
    """
    def one(x):
        if isinstance(x, nnx.Variable):
            names = _logical_axes(x)
            value = x.get_value()
            spec = P() if names is None else logical_to_spec(names, np.shape(value), mesh, rules)
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


# The name the brief and train.py use; parameters and optimiser states go through one path.
state_shardings = shardings_for_tree


def shard_state(state: Any, shardings: Any) -> Any:
    """Places `state` on devices with `shardings` (a tree from `shardings_for_tree`)."""
    return jax.device_put(state, shardings)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """`ShapeDtypeStruct`s carrying `shardings`: the restore target for checkpoints."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


# ---------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------
_ACTIVE_RULES: list[Rules | None] = [None]


@contextlib.contextmanager
def axis_rules(rules: Rules | None):
    """Sets the rules `constrain` uses when none are passed (trace-time, so models stay
    free of experiment config)."""
    _ACTIVE_RULES.append(rules)
    try:
        yield
    finally:
        _ACTIVE_RULES.pop()


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: Rules | None = None):
    """`with_sharding_constraint` by logical names; a no-op with no mesh set (`jax.set_mesh`).

    Models call it unconditionally: on one device or outside a mesh it returns `x` unchanged.
    Manual axes (inside `jax.shard_map`) are left out of the constraint.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if rules is None:
        rules = _ACTIVE_RULES[-1]
    spec = logical_to_spec(logical_axes, x.shape, mesh, rules)
    manual = set(mesh.manual_axes)
    if manual:
        spec = P(*(_drop(entry, manual) for entry in spec))
    return jax.lax.with_sharding_constraint(x, spec)


def _drop(entry, axes: set[str]):
    """A PartitionSpec entry without `axes` (None when nothing is left)."""
    kept = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a not in axes)
    return None if not kept else kept[0] if len(kept) == 1 else kept


# ---------------------------------------------------------------------------------------
# Batches and hosts
# ---------------------------------------------------------------------------------------
def batch_sharding(mesh, axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
    """Shards the leading (batch) dimension over the `data` and `fsdp` axes of `mesh`."""
    present = tuple(a for a in axes if a in mesh.axis_names)
    return NamedSharding(mesh, P(present or None))


def host_local_to_global(batch: Any, mesh, axes: Sequence[str] = BATCH_AXES) -> Any:
    """Assembles each host's slice of the batch into global arrays sharded over the batch axes.

    Every host passes its own `global_batch / process_count` rows; the result is one global
    array per leaf, so a jitted step sees the whole batch (single host: a plain sharded put).
    """
    sharding = batch_sharding(mesh, axes)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        batch)


def maybe_initialize_distributed(force: bool = False) -> bool:
    """Starts `jax.distributed` only for multi-process runs; returns whether it did.

    Multi-process means `JAX_COORDINATOR_ADDRESS` is set and `JAX_NUM_PROCESSES` > 1 (with
    `JAX_PROCESS_ID` for this process), as our local multi-process tests and hand-made launches
    set them; or a SLURM job step with several tasks; or a TPU pod (several workers). The
    latter two, and `force=True`, use `jax.distributed.initialize()`'s cluster auto-detection.
    Must run before anything touches a device.
    """
    if jax.distributed.is_initialized():
        return False
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = int(os.environ.get("JAX_NUM_PROCESSES", "1"))
    if address and num > 1:
        if "JAX_PROCESS_ID" not in os.environ:
            raise RuntimeError("JAX_NUM_PROCESSES > 1 but JAX_PROCESS_ID is not set")
        _cpu_collectives()
        # A generous shutdown barrier: hosts finish their last host-side work (closing
        # checkpoints, writing files) at different speeds on loaded machines.
        jax.distributed.initialize(address, num, int(os.environ["JAX_PROCESS_ID"]), shutdown_timeout_seconds=900)
        return True
    # JAX's own cluster detection for the launchers our users have: SLURM (`srun`, one task
    # per host or per GPU) and TPU pods (the same command on every worker).
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ
    tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if force or slurm or tpu_pod:
        _cpu_collectives()
        jax.distributed.initialize(shutdown_timeout_seconds=900)
        return True
    return False


def enable_compile_cache(directory: str | None = None) -> str | None:
    """JAX's persistent compilation cache, so re-running a command (a resume, an evaluation,
    the next stage) reuses the compiled step instead of compiling it again (tens of seconds
    for PIR's step on a CPU). `directory` is the config's `compile_cache_dir`: None means
    `RSVL_COMPILE_CACHE` or ~/.cache/rsvl_jax/xla; "" (or "0") turns the cache off."""
    if directory is None:
        directory = os.environ.get("RSVL_COMPILE_CACHE") or os.path.join(
            os.path.expanduser("~"), ".cache", "rsvl_jax", "xla")
    if directory in ("", "0"):
        return None
    directory = os.path.expanduser(directory)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return directory


def _cpu_collectives() -> None:
    """Processes on CPU talk through gloo (JAX's CPU collectives), e.g. local test runs."""
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    if "cpu" in platforms:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def init_sharded(make: Callable[[], nnx.Module], mesh, rules: Rules | None = None) -> nnx.Module:
    """Builds `make()` straight into the mesh's shardings: abstract shapes first, then a
    jitted init with `out_shardings`, so a full copy of the model never sits on one device."""
    # jax.eval_shape, not nnx.eval_shape: the latter turns logical names into mesh shardings.
    graphdef, abstract = jax.eval_shape(lambda: nnx.split(make()))
    shardings = shardings_for_tree(abstract, mesh, rules)
    state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def all_hosts(x) -> np.ndarray:
    """Every host's rows of `x`, concatenated in host order, as numpy on every host.

    `x` is host-local data (numpy, or an array on this host's devices), or a global array
    sharded over the batch axes (the output of an evaluation step fed by `eval_batch`)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def eval_batch(x, mesh=None):
    """An evaluation input: on one host a plain device array (any batch size works); with
    several hosts each host's rows become its part of one global array over the batch axes,
    because a jitted function cannot mix host-local inputs with globally sharded parameters."""
    if jax.process_count() == 1:
        return jax.numpy.asarray(x)
    return host_local_to_global(x, mesh or jax.sharding.get_mesh())


def replicated(x, mesh=None):
    """The same value on every host (e.g. a text batch each host embeds whole), as an input
    of a jitted function; read results with `fetch_replicated`."""
    if jax.process_count() == 1:
        return jax.numpy.asarray(x)
    mesh = mesh or jax.sharding.get_mesh()
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P()), np.asarray(x))


def fetch_replicated(x) -> np.ndarray:
    """numpy of an output that every host holds whole (one host: the array itself)."""
    if jax.process_count() == 1 or x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(x.addressable_data(0))


_BARRIERS = [0]


def host_barrier(name: str, timeout_s: int = 3600) -> None:
    """Waits until every process gets here, through JAX's coordination service rather than a
    device collective: a collective's first use sets up gloo with a 30 s deadline, which a host
    still building a dataset or compiling on a loaded machine would miss."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the coordination-service client (no public accessor)

    _BARRIERS[0] += 1
    distributed.global_state.client.wait_at_barrier(f"rsvl_jax_{name}_{_BARRIERS[0]}", timeout_s * 1000)


def main_process_first(fn: Callable[[], Any]) -> Any:
    """Runs `fn` on process 0 first and on the others after it (e.g. building a dataset into
    a shared cache, which several writers would race on)."""
    if jax.process_count() == 1:
        return fn()
    if jax.process_index() == 0:
        out = fn()
        host_barrier("main_first")
        return out
    host_barrier("main_first")
    return fn()
