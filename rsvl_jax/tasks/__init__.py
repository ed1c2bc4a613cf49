"""Systems as the generic trainer sees them: one module per system, each with `make(config)`.

A `Task` answers what `train.py` and `evaluate.py` cannot know about a system: how to build
its model and load pretrained parts, which parameters train, the optimiser and schedule, the
loss of one batch, the data, the evaluators and the metric that picks the best checkpoint,
and what a checkpoint holds. It is a frozen record of plain functions (closures over the
experiment config), not a class hierarchy: `tasks/pir.py` and `tasks/bita.py` each build one.

The loop splits the model once into four parts:

    trainable  nnx.Params matching `trainable`: differentiated, updated, optimiser state
    frozen     the other nnx.Params: inputs of the step only (no gradient, no optimiser state)
    mutable    nnx.BatchStat: updated by the forward pass, returned by the step
    rest       RNG streams and the like: reseeded from (seed, step) inside the step

A checkpoint's `params` item holds the variables matching `saved` (PIR: everything; BITA: the
trainable bridge), plus the optimiser state of `trainable`, the step and the data state.
Frozen weights that are not saved are re-read from the user's files by `load_frozen` on every
start, including resumes.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import jax
import optax
from flax import nnx

from rsvl_jax.config import ConfigError, check_choice

TASKS = ("pir", "bita")

Metrics = dict[str, float]


def _nothing(model: nnx.Module) -> list[str]:
    return []


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    # -- model -----------------------------------------------------------------------------
    make_model: Callable[[], nnx.Module]  # random init; the loop runs it abstractly, then sharded
    trainable: Any  # nnx filter of the Params that train
    saved: Any  # nnx filter of what a checkpoint's params item holds
    load_pretrained: Callable[[nnx.Module], list[str]]  # fresh runs only; returns report lines
    # -- data, optimisation, loss ----------------------------------------------------------
    open_data: Callable[[], Any]
    train_loader: Callable[[Any, int], Any]  # (data, per-host batch) -> iterator with state
    optimizer: Callable[[nnx.State, int, int], tuple[optax.GradientTransformation, optax.Schedule]]
    #          (trainable params, steps per epoch, training items) -> (tx, lr schedule of the step)
    loss: Callable[[nnx.Module, dict], tuple[jax.Array, dict]]  # inside the jitted step
    # -- evaluation ------------------------------------------------------------------------
    evaluate: Callable[[nnx.Module, Any, str, int], Metrics] | None = None  # (model, data, split, step)
    eval_splits: tuple[str, ...] = ()  # evaluated every `eval_every_epochs` epochs
    final_splits: tuple[str, ...] = ()  # evaluated once after training, with the best checkpoint
    best_metrics: tuple[str, ...] = ()  # "<split>_<name>": the best step of each is kept
    metric_keys: tuple[str, ...] = ()  # the columns of evaluate's table
    load_frozen: Callable[[nnx.Module], list[str]] = _nothing  # every start, resumes included
    load_pytorch: Callable[[nnx.Module, str], str] | None = None  # evaluate: a released .pth

    def format_metrics(self, metrics: Metrics) -> str:
        """`val_r_mean 12.30  test_r_mean 11.00` for the keys of the table, in order."""
        keys = [k for k in metrics if k.split("_", 1)[-1] in self.metric_keys]
        return "  ".join(f"{k} {metrics[k]:.2f}" for k in keys)


def get(config) -> Task:
    """The task named by `config.task`, built for this config (which it also checks)."""
    name = config.get("task")
    if name is None:
        raise ConfigError("the config has no `task` field (one of: " + ", ".join(TASKS) + ")")
    check_choice(config, "task", TASKS)
    return importlib.import_module(f"rsvl_jax.tasks.{name}").make(config)
