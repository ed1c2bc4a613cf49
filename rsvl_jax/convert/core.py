"""Strict PyTorch -> NNX weight conversion: a mapping table plus hooks.

A model family describes conversion as a list of `Entry`s (our parameter path <- PyTorch
key(s) + a hook that turns the torch tensors into our layout) and a list of named `Skip`
rules for source tensors we deliberately drop (buffers, heads we do not build). `convert`
then insists that

* every variable of the target module is filled by exactly one entry,
* every source tensor is consumed by an entry or dropped by a named skip rule,
* every converted array has the target's shape,

and otherwise raises one `ConversionError` listing *all* missing, unexpected and mismatched
keys, so a wrong checkpoint never loads as fluent garbage.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from rsvl_jax.errors import UserError

Tensors = Mapping[str, np.ndarray]


class ConversionError(ValueError, UserError):
    """A checkpoint does not match the model: lists every offending key."""


# ----------------------------------------------------------------------------------------
# Hooks: torch layout -> our layout.
# ----------------------------------------------------------------------------------------
def identity(t):
    return t


def linear(t):
    """torch Linear weight (out, in) -> kernel (in, out)."""
    return t.T


def conv(t):
    """torch Conv2d weight (O, I, kh, kw) -> (kh, kw, I, O)."""
    return t.transpose(2, 3, 1, 0)


class rows:
    """Hook: take rows [start, stop) of a fused tensor (e.g. `in_proj_weight`), then apply
    `hook`. A class (not a closure) so `export` can put the pieces back together."""

    def __init__(self, start: int, stop: int, hook: Callable = identity):
        self.start, self.stop, self.hook = start, stop, hook
        self.__name__ = f"rows[{start}:{stop}]"

    def __call__(self, t):
        return self.hook(t[self.start:self.stop])


def concat_linear(*ts):
    """Separate q/k/v torch weights -> one fused (in, 3*out) kernel (or fused bias)."""
    return np.concatenate([t.T if t.ndim == 2 else t for t in ts], axis=-1)


# ----------------------------------------------------------------------------------------
# Tables.
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Entry:
    """Our variable at dotted `target` path <- `hook(*[tensors[k] for k in sources])`."""

    target: str
    sources: tuple[str, ...]
    hook: Callable[..., np.ndarray] = identity


@dataclasses.dataclass(frozen=True)
class Skip:
    """Source keys matching `pattern` (a regex, full match) are dropped on purpose."""

    name: str
    pattern: str


def entry(target: str, source: str | Sequence[str], hook: Callable = identity) -> Entry:
    sources = (source,) if isinstance(source, str) else tuple(source)
    return Entry(target, sources, hook)


def prefixed(entries: Iterable[Entry], target_prefix: str = "", source_prefix: str = "") -> list[Entry]:
    """Re-root a sub-module's table (e.g. a BERT table inside PIR)."""
    tp = f"{target_prefix}." if target_prefix else ""
    return [Entry(tp + e.target, tuple(source_prefix + s for s in e.sources), e.hook) for e in entries]


def linear_entries(target: str, source: str, bias: bool = True) -> list[Entry]:
    """The two entries of a Linear: kernel (transposed) and bias."""
    out = [Entry(f"{target}.kernel", (f"{source}.weight",), linear)]
    if bias:
        out.append(Entry(f"{target}.bias", (f"{source}.bias",)))
    return out


def norm_entries(target: str, source: str, scale: str = "weight", bias: str = "bias") -> list[Entry]:
    """LayerNorm: weight -> scale (`gamma`/`beta` in old BERT files)."""
    return [Entry(f"{target}.scale", (f"{source}.{scale}",)), Entry(f"{target}.bias", (f"{source}.{bias}",))]


# ----------------------------------------------------------------------------------------
# Reading checkpoints.
# ----------------------------------------------------------------------------------------
def _to_numpy(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor; avoid importing torch for the check
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        # A copy: .numpy() shares torch's storage, and jnp.asarray may share it again on CPU,
        # so a later in-place torch update (BN running stats) would leak into our model.
        return value.numpy().copy()
    return np.asarray(value)


def _unwrap(obj: Any, origin: str) -> dict:
    """Find the state dict inside common wrappers ({'model': ...}, {'state_dict': ...})."""
    while isinstance(obj, Mapping) and not any(hasattr(v, "shape") for v in obj.values()):
        for key in ("model", "state_dict", "module"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        else:
            raise ConversionError(f"{origin}: no tensors found (top-level keys: {sorted(obj)[:10]})")
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{origin}: expected a state dict, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if hasattr(v, "shape") or isinstance(v, (int, float))}


def read_state_dict(source: str | os.PathLike | Mapping) -> dict[str, np.ndarray]:
    """Tensors as numpy arrays from a `.pth`/`.bin`/`.safetensors` file, an HF model directory
    or an in-memory state dict (torch tensors or arrays). `module.` prefixes are stripped."""
    if isinstance(source, Mapping):
        raw, origin = _unwrap(source, "state dict"), "state dict"
    else:
        path = pathlib.Path(source)
        origin = str(path)
        if path.is_dir():
            candidates = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")) or sorted(path.glob("*.pth"))
            if not candidates:
                raise ConversionError(f"{path}: no .safetensors, .bin or .pth weights in this directory")
            raw = {}
            for f in candidates:
                raw.update(read_state_dict(f))
            return raw
        if not path.exists():
            raise ConversionError(f"{path}: checkpoint file not found")
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            raw = load_file(str(path))
        elif path.suffix == ".npz":
            with np.load(path) as z:
                raw = dict(z)
        else:
            try:
                import torch
            except ImportError as e:  # pragma: no cover - depends on the install
                raise ConversionError(f"{path}: reading PyTorch files needs torch (pip install 'rsvl_jax[convert]')") from e
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ConversionError(f"{path}: cannot read as a PyTorch checkpoint: {e}") from e
            raw = _unwrap(obj, origin)
    out = {}
    for k, v in raw.items():
        k = k[len("module."):] if k.startswith("module.") else k
        out[k] = _to_numpy(v)
    return out


def strip_prefix(tensors: Tensors, prefix: str) -> dict[str, np.ndarray]:
    """Keys starting with `prefix` lose it; other keys are kept unchanged (reported if unused)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in tensors.items()}


# ----------------------------------------------------------------------------------------
# The strict merge.
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Report:
    source: str
    converted: int = 0  # source tensors consumed
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # rule name -> count
    parameters: int = 0  # scalar values written into the module

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {name}" for name, n in sorted(self.skipped.items())) or "none"
        return (
            f"{self.source}: {self.converted} tensors converted, "
            f"{sum(self.skipped.values())} skipped ({skipped}), {self.parameters:,} parameters"
        )


def path_str(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path)


def module_variables(module: nnx.Module) -> dict[str, Any]:
    """Our convertible variables (params and batch statistics), by dotted path."""
    state = nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat))
    return {path_str(p): v for p, v in state.flat_state()}


def convert(
    module: nnx.Module,
    tensors: Tensors,
    entries: Sequence[Entry],
    skips: Sequence[Skip] = (),
    *,
    source: str = "state dict",
) -> Report:
    """Fill every variable of `module` from `tensors` through `entries`, strictly (see module doc)."""
    targets = module_variables(module)
    problems: list[str] = []
    missing_sources: list[str] = []
    mismatched: list[str] = []
    unknown_targets: list[str] = []
    values: dict[str, np.ndarray] = {}
    consumed: set[str] = set()
    for e in entries:
        if e.target not in targets:
            unknown_targets.append(e.target)
            continue
        absent = [s for s in e.sources if s not in tensors]
        if absent:
            missing_sources.extend(absent)
            continue
        consumed.update(e.sources)
        value = np.asarray(e.hook(*[tensors[s] for s in e.sources]))
        want = tuple(targets[e.target].shape)
        if value.shape != want:
            src = ", ".join(f"{s} {tuple(tensors[s].shape)}" for s in e.sources)
            mismatched.append(f"{e.target}: expected {want}, got {value.shape} from {src}")
            continue
        values[e.target] = value
    unfilled = sorted(set(targets) - set(values) - {e.target for e in entries})
    report = Report(source=source)
    unexpected = []
    compiled = [(s.name, re.compile(s.pattern)) for s in skips]
    for key in tensors:
        if key in consumed:
            continue
        rule = next((name for name, rx in compiled if rx.fullmatch(key)), None)
        if rule is None:
            unexpected.append(key)
        else:
            report.skipped[rule] = report.skipped.get(rule, 0) + 1
    if missing_sources:
        problems.append("missing keys (needed, not in checkpoint):\n  " + "\n  ".join(sorted(set(missing_sources))))
    if unexpected:
        problems.append("unexpected keys (in checkpoint, not used):\n  " + "\n  ".join(sorted(unexpected)))
    if mismatched:
        problems.append("shape mismatches:\n  " + "\n  ".join(mismatched))
    if unfilled or unknown_targets:  # a bug in a mapping table, not in the checkpoint
        problems.append(
            "mapping table does not match the model:\n  "
            + "\n  ".join([f"no entry for {t}" for t in unfilled] + [f"no such variable {t}" for t in unknown_targets])
        )
    if problems:
        raise ConversionError(f"cannot load {source}:\n" + "\n".join(problems))

    state = nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat))
    for path, var in state.flat_state():
        var.set_value(jnp.asarray(values[path_str(path)], dtype=var.dtype))
    nnx.update(module, state)
    report.converted = len(consumed)
    report.parameters = int(sum(v.size for v in values.values()))
    return report


# ----------------------------------------------------------------------------------------
# The way back: our variables -> a PyTorch-named state dict.
# ----------------------------------------------------------------------------------------
_INVERSE = {identity: lambda a: a, linear: lambda a: a.T, conv: lambda a: a.transpose(3, 2, 0, 1)}


def export(module: nnx.Module, entries: Sequence[Entry]) -> dict[str, np.ndarray]:
    """Write `module`'s variables under the PyTorch names of `entries` (for one-to-one entries
    whose hook is identity, linear, conv or `rows` of one of those - fused tensors such as
    `in_proj_weight` are reassembled from their row blocks; other hooks are shape-only, e.g.
    scalars, and are treated as identity). Used to hand weights back to the reference code
    and in tests."""
    variables = module_variables(module)
    out, pieces = {}, {}
    for e in entries:
        if len(e.sources) != 1:
            raise ValueError(f"cannot export {e.target}: it is built from {len(e.sources)} tensors")
        value = np.asarray(variables[e.target].get_value())
        if isinstance(e.hook, rows):
            inner = _INVERSE.get(e.hook.hook, lambda a: a)(value)
            pieces.setdefault(e.sources[0], []).append((e.hook.start, e.hook.stop, inner))
            continue
        if e.sources[0] in out:
            raise ValueError(f"cannot export {e.sources[0]}: written by more than one entry")
        # .copy(order="C"), not np.ascontiguousarray, which turns a 0-d scalar (`temp`) into shape (1,)
        out[e.sources[0]] = np.asarray(_INVERSE.get(e.hook, lambda a: a)(value)).copy(order="C")
    for key, parts in pieces.items():
        parts.sort(key=lambda p: p[0])
        if parts[0][0] != 0 or any(a[1] != b[0] for a, b in zip(parts, parts[1:])) or key in out:
            raise ValueError(f"cannot export {key}: its row blocks {[(a, b) for a, b, _ in parts]} do not tile it")
        out[key] = np.concatenate([p for _, _, p in parts], axis=0)
    return out
