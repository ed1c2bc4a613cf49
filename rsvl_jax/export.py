"""Export a run to the reference's PyTorch layout: `python -m rsvl_jax.export --config ... --checkpoint RUN OUT.pth`.

For sharing with PyTorch users of the original code: the task writes the weights it trains
under the reference's key names (BITA: `{"model": state_dict, ...}` as its runner saves it).
"""
from __future__ import annotations

import argparse
import sys

import jax

from rsvl_jax import parallel, tasks
from rsvl_jax.config import ConfigError
from rsvl_jax.errors import run_cli


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m rsvl_jax.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a run directory or a converted checkpoint")
    parser.add_argument("--step", type=int, default=None, help="a step of the run (default: its best)")
    parser.add_argument("out", help="the .pth file to write")
    parsed = tasks.parse_entry(parser, argv)
    if isinstance(parsed, int):
        return parsed
    config, args, task = parsed
    if task.export_pytorch is None:
        raise ConfigError(f"the {task.name} task of this config has no PyTorch export")
    with jax.set_mesh(parallel.make_mesh(config.mesh)):
        model = tasks.load_model(task, config, args.checkpoint, args.step)
        print(task.export_pytorch(model, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
