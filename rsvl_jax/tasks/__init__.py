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
import os
from typing import Any, Callable, Sequence

import jax
import optax
from flax import nnx

from rsvl_jax import checkpoint, parallel
from rsvl_jax.config import ConfigError, check_choice, parse_cli, print_help

TASKS = ("pir", "bita", "clip")

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
    # The loss of one batch in two parts. The batch runs as blocks of `block_size` examples
    # (the reference's per-device batch: each block has its own dropout key and batch
    # statistics, as each GPU had); `embed(model, block)` gives a block's representations (an
    # LM stage: its loss) and `batch_loss(model, reps, batch)` the loss from all of them
    # (stacked by block, see `merge_blocks`). So the trainer can chunk the batch (GradCache,
    # `chunk_size`) and accumulate it (`accumulate_steps`) with the full batch's result.
    embed: Callable[[nnx.Module, dict], Any]
    batch_loss: Callable[[nnx.Module, Any, dict], tuple[jax.Array, dict]]
    block_size: int = 0  # examples per block; 0 = the whole batch
    chunk_size: int = 0  # examples per GradCache chunk (a multiple of block_size); 0 = off
    accumulate_steps: int = 1  # optax.MultiSteps: micro-batches per update (per-block losses only)
    # -- evaluation ------------------------------------------------------------------------
    evaluate: Callable[[nnx.Module, Any, str, int], Metrics] | None = None  # (model, data, split, step)
    eval_splits: tuple[str, ...] = ()  # evaluated every `eval_every_epochs` epochs
    final_splits: tuple[str, ...] = ()  # evaluated once after training, with the best checkpoint
    best_metrics: tuple[str, ...] = ()  # "<split>_<name>": the best step of each is kept
    metric_keys: tuple[str, ...] = ()  # the columns of evaluate's table
    metric_format: str = "8.2f"  # PIR's recalls in %; BITA's caption metrics are fractions
    load_frozen: Callable[[nnx.Module], list[str]] = _nothing  # every start, resumes included
    load_pytorch: Callable[[nnx.Module, str], str] | None = None  # evaluate: a released .pth
    export_pytorch: Callable[[nnx.Module, str], str] | None = None  # the reference's .pth layout
    # -- your own images: python -m rsvl_jax.caption / search, evaluate --report -----------
    # uint8 (H, W, 3) -> the model's float32 input, exactly as evaluation preprocesses a split
    eval_transform: Callable[[Any], Any] | None = None
    # retrieval: (model, inputs (B, S, S, 3)) -> (B, D) and (model, texts) -> (N, D) float32
    # numpy embeddings, L2-normalised, so a dot product is the model's similarity
    embed_images: Callable[[nnx.Module, Any], Any] | None = None
    embed_texts: Callable[[nnx.Module, Sequence[str]], Any] | None = None
    # captioning: (model, inputs (B, S, S, 3), alternatives) -> per image [(caption, score)],
    # best first: the caption evaluation would give, then up to `alternatives` more beams
    caption_images: Callable[[nnx.Module, Any, int], list[list[tuple[str, float]]]] | None = None
    # (model, data, split, step, out_dir) -> the metrics `evaluate` gives, and an HTML report
    # (out_dir/index.html) of the same pass
    report: Callable[[nnx.Module, Any, str, int, str], Metrics] | None = None

    def format_metrics(self, metrics: Metrics) -> str:
        """`val_r_mean 12.30  test_r_mean 11.00` for the keys of the table, in order."""
        keys = [k for k in metrics if k.split("_", 1)[-1] in self.metric_keys]
        return "  ".join(f"{k} {format(metrics[k], self.metric_format).strip()}" for k in keys)


def merge_blocks(reps):
    """Block-stacked representations (blocks, block_size, ...) -> (batch, ...) in batch order."""
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), reps)


def batch_layout(config, *, block: int, coupled: bool) -> dict:
    """The `Task` fields `block_size`, `chunk_size`, `accumulate_steps` from the config's
    `chunk_size` and `accumulate_steps`, checked. `coupled`: the loss compares every example
    with the whole batch (contrastive), so accumulation would change it; chunking does not."""
    accum = int(config.get("accumulate_steps", 1))
    chunk = int(config.get("chunk_size", 0))
    batch = config.batch_size
    if accum < 1 or batch % accum:
        raise ConfigError(f"accumulate_steps={accum} must be >= 1 and divide batch_size={batch}")
    if accum > 1 and coupled:
        raise ConfigError(f"accumulate_steps={accum}: the {config.task} loss compares each example with the "
                          "whole batch, so accumulating smaller batches changes it; use chunk_size instead")
    step_batch = batch // accum
    if not block or step_batch % block:
        if block and accum > 1:
            raise ConfigError(f"batch_size / accumulate_steps = {step_batch} is not a multiple of "
                              f"reference_device_batch={block}")
        block = step_batch
    if chunk < 0 or (chunk and (chunk % block or step_batch % chunk)):
        raise ConfigError(f"chunk_size={chunk} must be a multiple of the block of {block} examples "
                          f"(reference_device_batch) that divides the batch of {step_batch}; 0 = off")
    return {"block_size": block, "chunk_size": 0 if chunk == step_batch else chunk, "accumulate_steps": accum}


def get(config) -> Task:
    """The task named by `config.task`, built for this config (which it also checks)."""
    name = config.get("task")
    if name is None:
        raise ConfigError("the config has no `task` field (one of: " + ", ".join(TASKS) + ")")
    check_choice(config, "task", TASKS)
    return importlib.import_module(f"rsvl_jax.tasks.{name}").make(config)


PYTORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def load_model(task: Task, config, path: str, step: int | None = None, say=print) -> nnx.Module:
    """The task's model, sharded on the current mesh, with the weights at `path`: a run
    directory (its best step by the task's first best metric, else its latest, or `step`), a
    parameter checkpoint written by `python -m rsvl_jax.convert`, or a PyTorch file."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = tuple(tuple(r) for r in config.sharding_rules)
    model = parallel.init_sharded(task.make_model, parallel.make_mesh(config.mesh) if mesh.empty else mesh, rules)
    for line in task.load_frozen(model):
        say(line)
    run_ckpts = os.path.join(path, "checkpoints")
    if os.path.isdir(run_ckpts):
        mgr = checkpoint.CheckpointManager(run_ckpts, best_metrics=task.best_metrics)
        try:
            if step is None:
                best = task.best_metrics and mgr.best_step(task.best_metrics[0])
                step = best or mgr.latest_step()
            if step is None:
                raise checkpoint.CheckpointError(f"the run {path} has no checkpoint yet")
            saved, _, _, step = mgr.restore(step, nnx.state(model, task.saved), None)
        finally:
            mgr.close()
        nnx.update(model, saved)
        say(f"restored step {step} from {run_ckpts}")
    elif step is not None:
        raise ConfigError(f"--step needs a run directory; {path} is not one (it has no checkpoints/)")
    elif path.endswith(PYTORCH_SUFFIXES):
        if task.load_pytorch is None:
            raise ConfigError(f"the {task.name} task cannot read PyTorch files; convert {path} first")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no checkpoint file {path}")
        say(task.load_pytorch(model, path))
    elif os.path.isdir(path):
        nnx.update(model, checkpoint.restore_params(path, nnx.state(model, task.saved)))
        say(f"restored {path}")
    else:
        raise FileNotFoundError(f"no checkpoint at {path} (expected a run directory, a converted "
                                f"checkpoint directory or a {'/'.join(PYTORCH_SUFFIXES)} file)")
    return model


def parse_entry(parser, argv):
    """The entry points' common start: `--help` (with the resolved config when `--config` is
    given), the config and its overrides, `parser` for the rest, the compile cache, the task.
    Returns `(config, args, task)`, or the exit status when help or a usage error ended it."""
    if "-h" in argv or "--help" in argv:
        print_help(parser, argv)
        return 0
    config, rest = parse_cli(argv)
    try:
        args = parser.parse_args(rest)
    except SystemExit as e:  # argparse printed its one-line usage error
        return int(e.code or 0)
    parallel.enable_compile_cache(config.get("compile_cache_dir"))
    return config, args, get(config)
