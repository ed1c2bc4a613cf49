"""Evaluate any system: `python -m rsvl_jax.evaluate --config configs/<file>.py[:args] --checkpoint PATH`.

PATH is a training run's `workdir` (its best checkpoint by the task's first best metric, or
`--step N`), a parameter checkpoint written by `python -m rsvl_jax.convert`, or a released
PyTorch file that the task converts on the fly. Prints the task's metric table as two lines
(header, values) at the end of the output.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
from flax import nnx

from rsvl_jax import checkpoint, parallel, tasks
from rsvl_jax.config import ConfigError, parse_cli, print_help
from rsvl_jax.errors import run_cli

PYTORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def load_model(task: tasks.Task, config, path: str, step: int | None = None, say=print) -> nnx.Module:
    """The task's model, sharded on the current mesh, with the weights at `path`."""
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


def format_table(keys, metrics: dict) -> str:
    return "\n".join([" ".join(f"{k:>8}" for k in keys), " ".join(f"{metrics[k]:8.2f}" for k in keys)])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m rsvl_jax.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a run directory, a converted checkpoint directory, or a PyTorch file")
    parser.add_argument("--step", type=int, default=None, help="a step of the run (default: its best)")
    parser.add_argument("--split", default="test", help="the split to evaluate (default: test)")
    if "-h" in argv or "--help" in argv:
        print_help(parser, argv)
        return 0
    config, rest = parse_cli(argv)
    try:
        args = parser.parse_args(rest)
    except SystemExit as e:  # argparse printed its one-line usage error
        return int(e.code or 0)
    task = tasks.get(config)
    if task.evaluate is None:
        raise ConfigError(f"the {task.name} task of this config has no evaluation")
    with jax.set_mesh(parallel.make_mesh(config.mesh)):
        data = task.open_data()
        model = load_model(task, config, args.checkpoint, args.step)
        metrics = task.evaluate(model, data, args.split, args.step or 0)
    print(format_table([k for k in task.metric_keys if k in metrics], metrics))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
