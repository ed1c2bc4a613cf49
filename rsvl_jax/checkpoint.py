"""Checkpoints: parameter files for the converter and a training manager. Only module using Orbax.

On disk every array tree is a nested dict with *string* keys, built from the tree's key
paths (`layers/0/kernel`, `0/mu/up/kernel` for an optax state); `nnx.Variable`s are
unwrapped to their arrays. On restore, values are put back into the caller's target tree
(an abstract `nnx.State`, optax state or dict), so the target decides the structure and key
types. This is how we avoid the Orbax pitfall from STYLE.md: Orbax turns integer dict keys
(`nnx.List` layers) into strings, after which `nnx.update` silently changes nothing. Before a
restore, the checkpoint's key set and shapes are compared with the target and every missing,
unexpected or mis-shaped key is named; after it, every leaf is checked again.

Restores always go into the shardings carried by the target (`jax.ShapeDtypeStruct(...,
sharding=...)` or live arrays), so a run can resume on a different mesh. RNG key arrays are
refused: runs reseed from (seed, step).
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rsvl_jax.errors import UserError

PARAMS, METADATA = "params", "metadata"
_EMPTY = "__empty__"


def _handlers(**kinds: str) -> dict:
    """Named Orbax item handlers: a fresh process must know them to read item metadata."""
    make = {"arrays": ocp.StandardCheckpointHandler, "json": ocp.JsonCheckpointHandler}
    return {name: make[kind]() for name, kind in kinds.items()}


def _params_checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
        **_handlers(**{PARAMS: "arrays", METADATA: "json"})))


class CheckpointError(UserError, ValueError):
    """A checkpoint does not match what the caller asked to restore."""


class MissingStepError(CheckpointError, FileNotFoundError):
    """A step that is not in the checkpoint directory; the message lists the steps that are."""


# ---------------------------------------------------------------------------------------
# Tree <-> on-disk nested dict
# ---------------------------------------------------------------------------------------
def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey/FlattenedIndexKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _flatten(tree: Any) -> tuple[list[tuple[str, ...]], list[Any], Any, list[Any]]:
    """Key paths (strings), array values, treedef and the original leaves (maybe Variables)."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_var)
    paths, values, leaves = [], [], []
    for path, leaf in with_path:
        paths.append(tuple(_key_str(k) for k in path))
        values.append(leaf.get_value() if _is_var(leaf) else leaf)
        leaves.append(leaf)
    return paths, values, treedef, leaves


def _name(path: Sequence[str]) -> str:
    return "/".join(path)


def _nest(paths, values) -> dict:
    """`[('a','0','k')], [x]` -> `{'a': {'0': {'k': x}}}`; refuses keys that collide as strings."""
    out: dict = {}
    for path, value in zip(paths, values):
        if jax.dtypes.issubdtype(getattr(value, "dtype", np.float32), jax.dtypes.prng_key):
            raise CheckpointError(f"refusing to save RNG key {_name(path)!r}: filter it out "
                                  "(e.g. nnx.state(model, nnx.Param)); runs reseed from seed+step")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"key {_name(path)!r} collides with another leaf")
        if path[-1] in node:
            raise CheckpointError(f"key {_name(path)!r} appears twice once keys are strings")
        node[path[-1]] = value
    return out


def _flat_metadata(tree, prefix=()) -> dict[tuple[str, ...], Any]:
    """Flattens Orbax's saved-tree metadata (nested dicts of ArrayMetadata) by key path."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat_metadata(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def _replicated() -> NamedSharding:
    """Fallback for target leaves that carry no sharding: a copy on every device."""
    return NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("all",)), P())


def _abstract(value) -> jax.ShapeDtypeStruct:
    sharding = getattr(value, "sharding", None) or _replicated()
    return jax.ShapeDtypeStruct(np.shape(value), value.dtype, sharding=sharding)


def _check_keys(saved: Mapping, paths, values, what: str, where: str) -> None:
    """Raises naming every missing, unexpected and mis-shaped key (big_vision merge_params)."""
    target = {p: v for p, v in zip(paths, values)}
    missing = sorted(_name(p) for p in target if p not in saved)
    unexpected = sorted(_name(p) for p in saved if p not in target)
    shapes = sorted(f"{_name(p)}: checkpoint {tuple(saved[p].shape)} vs wanted {tuple(np.shape(v))}"
                    for p, v in target.items()
                    if p in saved and tuple(saved[p].shape) != tuple(np.shape(v)))
    if missing or unexpected or shapes:
        lines = [f"{what} in {where} does not match the target tree:"]
        lines += [f"  missing from checkpoint: {k}" for k in missing]
        lines += [f"  unexpected in checkpoint: {k}" for k in unexpected]
        lines += [f"  shape mismatch: {s}" for s in shapes]
        raise CheckpointError("\n".join(lines))


def _saved_tree_metadata(item_metadata) -> dict:
    tree = getattr(item_metadata, "tree", item_metadata)
    return _flat_metadata(tree or {})


def _prepare_restore(target, saved_meta, what, where):
    """Checks keys; returns (nested abstract target or None if nothing to read, rebuild fn)."""
    paths, values, treedef, leaves = _flatten(target)
    saved = _saved_tree_metadata(saved_meta)
    if not paths and set(saved) == {(_EMPTY,)}:
        return None, lambda _: jax.tree.unflatten(treedef, [])
    _check_keys(saved, paths, values, what, where)
    abstract = _nest(paths, [_abstract(v) for v in values])

    def rebuild(restored: Mapping) -> Any:
        flat = _flat_metadata(restored)
        out = []
        for path, value, leaf in zip(paths, values, leaves):
            got = flat.get(path)
            if got is None or tuple(got.shape) != tuple(np.shape(value)):
                raise CheckpointError(f"{what} in {where}: {_name(path)!r} was not restored")
            out.append(leaf.replace(got) if _is_var(leaf) else got)
        return jax.tree.unflatten(treedef, out)

    return abstract, rebuild


def _to_disk(tree) -> dict:
    """The on-disk form; a leafless tree (plain SGD state) becomes a placeholder because
    Orbax refuses empty items."""
    paths, values, _, _ = _flatten(tree)
    return _nest(paths, values) if paths else {_EMPTY: np.zeros((), np.int8)}


def _jsonable(obj: Any) -> Any:
    """Dataclass configs, ConfigDicts, tuples and numpy scalars -> plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "to_dict"):
        return _jsonable(obj.to_dict())
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, np.dtype) or (isinstance(obj, type) and hasattr(obj, "dtype")):
        return np.dtype(obj).name  # config dtypes (jnp.float32) -> "float32"
    return obj


# ---------------------------------------------------------------------------------------
# Parameter checkpoints (converter output, evaluation input)
# ---------------------------------------------------------------------------------------
def save_params(path: str | os.PathLike, state: Any, metadata: Mapping | None = None,
                overwrite: bool = False) -> None:
    """Saves a parameter tree (`nnx.State` or dict) plus a small JSON metadata item.

    `metadata` holds what a reader needs to rebuild the model, e.g. `family`, `preset`
    and the model's dataclass config (converted to plain JSON here).
    """
    path = os.path.abspath(os.fspath(path))
    tree = _to_disk(state)
    meta = _jsonable(dict(metadata or {}))
    meta.setdefault("num_params", int(sum(np.size(x) for x in jax.tree.leaves(tree))))
    with _params_checkpointer() as ckptr:
        ckptr.save(path, ocp.args.Composite(**{PARAMS: ocp.args.StandardSave(tree),
                                               METADATA: ocp.args.JsonSave(meta)}),
                   force=overwrite)


def restore_params(path: str | os.PathLike, target: Any) -> Any:
    """Restores into `target`'s structure and shardings and returns the filled tree.

    `target` is typically the abstract params state of the current model with shardings
    from `parallel.state_shardings` (e.g. `parallel.abstract_with_shardings`), or live
    sharded params. The result has the target's type and keys, ready for `nnx.update`.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no parameter checkpoint at {path}")
    with _params_checkpointer() as ckptr:
        saved = ckptr.metadata(path).item_metadata[PARAMS]
        abstract, rebuild = _prepare_restore(target, saved, "params", path)
        if abstract is None:
            return rebuild(None)
        restored = ckptr.restore(path, ocp.args.Composite(
            **{PARAMS: ocp.args.StandardRestore(abstract)}))
    return rebuild(restored[PARAMS])


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata stored by `save_params` (family, preset, model config, ...)."""
    path = os.path.abspath(os.fspath(path))
    with _params_checkpointer() as ckptr:
        return ckptr.restore(path, ocp.args.Composite(
            **{METADATA: ocp.args.JsonRestore()}))[METADATA]


def _short_error(e: BaseException) -> str:
    """The informative part of a tensorstore/Orbax read error: Orbax wraps the tensorstore
    error (which names the array and the file) in an exception carrying a long JSON spec."""
    cause = e.__cause__ or e
    text = str(cause).split("[tensorstore_spec", 1)[0].split("See full TensorStore", 1)[0].strip()
    text = " ".join(text.split()) or type(cause).__name__
    return text if len(text) <= 800 else text[:797] + "..."


def _quiet_damaged_reads() -> None:
    """After a failed read, tensorstore's abandoned coroutines report each damaged array (and
    "Event loop is closed") as unraisable exceptions, hundreds of lines; the one-line warning
    already said it all, so those reports are dropped for the rest of the process."""
    import sys

    previous = sys.unraisablehook
    if getattr(previous, "_rsvl_quiet", False):
        return

    def hook(unraisable):
        text = str(unraisable.exc_value)
        if "Event loop is closed" in text or "Encountered error while reading array" in text:
            return
        previous(unraisable)

    hook._rsvl_quiet = True
    sys.unraisablehook = hook


# ---------------------------------------------------------------------------------------
# Training checkpoints
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class _BestBy(ocp.checkpoint_managers.PreservationPolicy):
    """Keeps the one step with the best finite value of `metrics[name]` (steps lacking it
    are left to the other policies)."""
    name: str
    mode: str = "max"

    def should_preserve(self, checkpoints, *, context):
        scored = [(cp.metrics[self.name], i) for i, cp in enumerate(checkpoints)
                  if cp.metrics and np.isfinite(cp.metrics.get(self.name, np.nan))]
        keep = None
        if scored:
            sign = 1 if self.mode == "max" else -1
            keep = max(scored, key=lambda s: (sign * s[0], -s[1]))[1]  # ties: earliest
        return [i == keep for i in range(len(checkpoints))]


class CheckpointManager:
    """Saves (params, opt_state, data iterator state) per step; keeps the last `keep` steps
    plus, for each name in `best_metrics`, the step with the best value of that metric.

    One Orbax manager over `directory/<step>/` with an "any of" preservation policy (latest N
    or best-by-each-metric), so a best step is never written twice and survives later saves.
    Metrics are stored in Orbax's step metadata; a step saved without a metric simply does
    not compete for that metric. Saves are async and atomic (Orbax commits a temporary
    directory); `wait()` blocks until the last save is on disk and `close()` waits too.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3,
                 best_metrics: Sequence[str] = ("val_mr", "test_mr"), best_mode: str = "max",
                 async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        self.best_metrics = tuple(best_metrics)
        policies = [ocp.checkpoint_managers.LatestN(keep)]
        policies += [_BestBy(name, best_mode) for name in self.best_metrics]
        first = self.best_metrics[0] if self.best_metrics else None
        worst = -np.inf if best_mode == "max" else np.inf
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            # Orbax writes per-step metrics (which the policy needs after a restart) only when
            # a best_fn is set; with our own policy it decides nothing else.
            best_fn=lambda m: float(m.get(first, worst)) if first else 0.0,
            best_mode=best_mode, enable_async_checkpointing=async_save, create=True)
        self._mgr = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers=_handlers(params="arrays", opt_state="arrays", data_state="json"))
        self._best_mode = best_mode

    def save(self, step: int, params: Any, opt_state: Any, data_state: Mapping | None = None,
             metrics: Mapping[str, float] | None = None) -> bool:
        """Starts an async save of one step; returns whether Orbax accepted it."""
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(_to_disk(params)),
            opt_state=ocp.args.StandardSave(_to_disk(opt_state)),
            data_state=ocp.args.JsonSave(_jsonable(dict(data_state or {}))))
        metrics = {k: float(v) for k, v in (metrics or {}).items()}  # {}: competes for nothing
        return self._mgr.save(int(step), args=args, metrics=metrics, force=True)

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def metrics(self, step: int) -> dict | None:
        return self._mgr.metrics(step)

    def best_step(self, name: str) -> int | None:
        """The kept step with the best value of metric `name`, or None if none has it."""
        scored = [(m[name], s) for s in self.all_steps()
                  if (m := self.metrics(s)) and np.isfinite(m.get(name, np.nan))]
        if not scored:
            return None
        sign = 1 if self._best_mode == "max" else -1
        return max(scored, key=lambda v: (sign * v[0], -v[1]))[1]

    def restore(self, step: int | None = None, abstract_params: Any = None,
                abstract_opt_state: Any = None) -> tuple[Any, Any, dict, int]:
        """Restores `(params, opt_state, data_state, step)` into the targets' shardings.

        `step=None` takes the latest step. The targets decide structure and placement, so a
        run can resume on another mesh. Pass `abstract_opt_state=None` to skip the optimiser
        state (evaluation); it is then returned as None.
        """
        self.wait()
        step = self.latest_step() if step is None else int(step)
        if step is None or step not in self._mgr.all_steps():
            have = ", ".join(map(str, self.all_steps())) or "none"
            raise MissingStepError(f"no checkpoint step {step} in {self.directory} (steps there: {have})")
        where = os.path.join(self.directory, str(step))
        saved = self._mgr.item_metadata(step)
        items, rebuilders = {}, {}
        for name, target in (("params", abstract_params), ("opt_state", abstract_opt_state)):
            if target is not None:
                abstract, rebuilders[name] = _prepare_restore(target, saved[name], name, where)
                if abstract is not None:
                    items[name] = ocp.args.StandardRestore(abstract)
        items["data_state"] = ocp.args.JsonRestore()
        restored = self._mgr.restore(step, args=ocp.args.Composite(**items))
        out = {name: rebuild(restored[name] if name in items else None)
               for name, rebuild in rebuilders.items()}
        return out.get("params"), out.get("opt_state"), dict(restored["data_state"] or {}), step

    def damage(self, step: int) -> str | None:
        """Why the files of `step` are incomplete (a missing metadata file), or None.

        Without this check a deleted `_METADATA` reads as an empty tree, which the key check
        would report as hundreds of misleading "missing" keys."""
        where = os.path.join(self.directory, str(step))
        for name in ("_CHECKPOINT_METADATA", "params/_METADATA", "opt_state/_METADATA", "data_state"):
            if not os.path.exists(os.path.join(where, name)):
                return f"{name} is missing"
        return None

    def restore_newest_intact(self, abstract_params: Any, abstract_opt_state: Any,
                              warn=print) -> tuple[Any, Any, dict, int]:
        """`restore` of the newest step whose files are whole, for resuming a run.

        A damaged step (missing metadata, a truncated or unreadable array file) is reported
        in one line and moved aside to `<directory>.damaged/<step>` (nothing is deleted, and
        the step number is free for the resumed run to write again); older steps are tried
        next. A checkpoint that is intact but does not match the model is a real error, not
        damage, and is raised at once."""
        self.wait()
        steps = sorted(self.all_steps(), reverse=True)
        for step in steps:
            problem = self.damage(step)
            if problem is None:
                try:
                    return self.restore(step, abstract_params, abstract_opt_state)
                except CheckpointError:
                    raise
                except Exception as e:  # tensorstore/Orbax read errors: the files are damaged
                    problem = _short_error(e)
                    _quiet_damaged_reads()
            moved = self._move_aside(step)
            warn(f"warning: checkpoint step {step} in {self.directory} is damaged ({problem}); "
                 f"moved it to {moved} and trying the previous step")
        raise CheckpointError(f"no intact checkpoint in {self.directory} (damaged: "
                              f"{', '.join(map(str, steps))}, moved to {self.directory}.damaged); "
                              "start afresh with another workdir")

    def _move_aside(self, step: int) -> str:
        target = os.path.join(self.directory + ".damaged", str(step))
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.exists(target):
                target = f"{target}.{int(time.time())}"
            os.rename(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:  # the coordination service, not a device collective
            from jax._src import distributed

            distributed.global_state.client.wait_at_barrier(f"rsvl_jax_move_aside_{step}", 3_600_000)
        self._mgr.reload()
        return target

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, then releases Orbax's threads."""
        self._mgr.wait_until_finished()
        self._mgr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
