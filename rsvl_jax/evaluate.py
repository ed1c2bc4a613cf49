"""Evaluate any system: `python -m rsvl_jax.evaluate --config configs/<file>.py[:args] --checkpoint PATH`.

PATH is a training run's `workdir` (its best checkpoint by the task's first best metric, or
`--step N`), a parameter checkpoint written by `python -m rsvl_jax.convert`, or a released
PyTorch file that the task converts on the fly. Prints the task's metric table as two lines
(header, values) at the end of the output; `--report DIR` also writes an HTML report of the
same pass (`DIR/index.html`, pictures beside it).
"""
from __future__ import annotations

import argparse
import sys

import jax

from rsvl_jax import parallel, tasks
from rsvl_jax.config import ConfigError
from rsvl_jax.errors import run_cli


def format_table(keys, metrics: dict, fmt: str = "8.2f") -> str:
    width = max([8] + [len(k) for k in keys])
    return "\n".join([" ".join(f"{k:>{width}}" for k in keys),
                      " ".join(f"{metrics[k]:{fmt}}".rjust(width) for k in keys)])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m rsvl_jax.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a run directory, a converted checkpoint directory, or a PyTorch file")
    parser.add_argument("--step", type=int, default=None, help="a step of the run (default: its best)")
    parser.add_argument("--split", default="test", help="the split to evaluate (default: test)")
    parser.add_argument("--report", metavar="DIR", default=None,
                        help="also write an HTML report of the same pass to DIR/index.html (retrieval: "
                             "recall@K curves, sampled queries with their top-5, VIR heatmaps; captioning: "
                             "every image with its caption, references and CIDEr, worst first)")
    parsed = tasks.parse_entry(parser, argv)
    if isinstance(parsed, int):
        return parsed
    config, args, task = parsed
    if task.evaluate is None:
        raise ConfigError(f"the {task.name} task of this config has no evaluation")
    with jax.set_mesh(parallel.make_mesh(config.mesh)):
        data = task.open_data()
        model = tasks.load_model(task, config, args.checkpoint, args.step)
        if args.report:
            if task.report is None:
                raise ConfigError(f"the {task.name} task of this config writes no report")
            metrics = task.report(model, data, args.split, args.step or 0, args.report)
        else:
            metrics = task.evaluate(model, data, args.split, args.step or 0)
    print(format_table([k for k in task.metric_keys if k in metrics], metrics, task.metric_format))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
