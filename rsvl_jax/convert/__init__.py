"""PyTorch checkpoint conversion: `from_pytorch(family, source, config_or_preset)`.

Each family lives in its own module (`swin.py`, `bert.py`, ...) and exposes `FAMILY`, a
`Family` that knows the model's presets, how to build it and how to map a checkpoint's keys
(detecting which of the accepted key layouts the checkpoint uses). `core.py` does the strict
merge.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from rsvl_jax.convert.core import ConversionError, Entry, Report, Skip, Tensors, convert, read_state_dict

# family name -> module under rsvl_jax.convert that defines FAMILY
_MODULES = {
    "swin": "swin",
    "bert": "bert",
    "resnet50": "resnet",
    "clip_vit": "clip_vit",
    "clip": "clip",
    "pir": "pir",
    "opt": "opt",
    "blip2_qformer": "qformer",
    "bita_stage1": "bita",
    "bita_opt": "bita",
}


@dataclasses.dataclass(frozen=True)
class Family:
    """How to build one model family and map its PyTorch checkpoints.

    `plan(config, tensors)` detects the key layout and returns the (possibly renamed)
    tensors, the entries and the skip rules for that layout. `hf_config(path)`, for families
    with HF releases, reads the model config from an HF `config.json` (a file or the model
    directory holding it).
    """

    name: str
    presets: Mapping[str, Any]
    build: Callable[[Any, nnx.Rngs], nnx.Module]
    plan: Callable[[Any, Tensors], tuple[Tensors, list[Entry], list[Skip]]]
    hf_config: Callable[[Any], Any] | None = None


def families() -> list[str]:
    return sorted(_MODULES)


def get_family(name: str) -> Family:
    if name not in _MODULES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(families())}")
    module = importlib.import_module(f"rsvl_jax.convert.{_MODULES[name]}")
    fams = getattr(module, "FAMILIES", None) or {module.FAMILY.name: module.FAMILY}
    return fams[name]


def resolve_config(family: Family, config_or_preset):
    if isinstance(config_or_preset, str):
        if config_or_preset not in family.presets:
            raise ValueError(
                f"unknown preset {config_or_preset!r} for {family.name}; known: {', '.join(sorted(family.presets))}"
            )
        return family.presets[config_or_preset]
    return config_or_preset


def from_pytorch(family: str, source, config_or_preset, *, with_report: bool = False, seed: int = 0):
    """Build the `family` model for `config_or_preset` with weights from a PyTorch checkpoint.

    `source` is a path (.pth/.bin/.safetensors or an HF directory) or an in-memory state dict.
    The module is built abstractly (no random init at real size) and every variable is then
    filled from the checkpoint, or a `ConversionError` lists what does not match.
    """
    fam = get_family(family)
    config = resolve_config(fam, config_or_preset)
    tensors = read_state_dict(source)
    tensors, entries, skips = fam.plan(config, tensors)
    # jax.eval_shape (not nnx.eval_shape, which would turn the logical axis names into
    # shardings of whatever mesh is active) gives an abstract module to fill.
    module = nnx.merge(*jax.eval_shape(lambda: nnx.split(fam.build(config, nnx.Rngs(0)))))
    name = source if isinstance(source, str) else getattr(source, "name", "state dict")
    report = convert(module, tensors, entries, skips, source=str(name) if not isinstance(source, Mapping) else "state dict")
    materialize_rngs(module, seed)
    return (module, report) if with_report else module


def materialize_rngs(module: nnx.Module, seed: int = 0) -> None:
    """Give a module built with `nnx.eval_shape` real RNG keys and counters (they are left
    abstract by the abstract build), so dropout works and `nnx.jit` accepts the module."""
    base = jax.random.key(seed)
    state = nnx.state(module, nnx.RngState)
    for i, (_, var) in enumerate(state.flat_state()):
        value = var.get_value()
        if isinstance(value, jax.ShapeDtypeStruct):
            if isinstance(var, nnx.RngKey):
                var.set_value(jax.random.fold_in(base, i))
            else:
                var.set_value(jnp.zeros(value.shape, value.dtype))
    nnx.update(module, state)


__all__ = ["ConversionError", "Family", "Report", "from_pytorch", "get_family", "families", "read_state_dict"]
