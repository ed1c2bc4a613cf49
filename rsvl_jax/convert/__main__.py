"""Convert a PyTorch checkpoint into an Orbax checkpoint that train/evaluate load directly.

    python -m rsvl_jax.convert FAMILY SOURCE OUTDIR [--preset NAME]

Prints a summary: tensors converted, tensors skipped (by rule), parameters written.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from flax import nnx

from rsvl_jax import checkpoint
from rsvl_jax.convert import ConversionError, families, from_pytorch, get_family


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rsvl_jax.convert", description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=families())
    parser.add_argument("source", help=".pth / .bin / .safetensors file or an HF model directory")
    parser.add_argument("outdir", help="directory for the Orbax checkpoint (must not exist)")
    parser.add_argument("--preset", help="model preset (default: the family's first preset)")
    args = parser.parse_args(argv)

    if os.path.exists(args.outdir):
        print(f"error: {args.outdir} already exists; choose a new output directory", file=sys.stderr)
        return 2
    family = get_family(args.family)
    preset = args.preset or next(iter(family.presets))
    try:
        module, report = from_pytorch(args.family, args.source, preset, with_report=True)
    except (ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = family.presets[preset]
    meta = {"family": args.family, "preset": preset, "source": str(args.source)}
    if dataclasses.is_dataclass(config):
        meta["config"] = dataclasses.asdict(config)
    checkpoint.save_params(args.outdir, nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat)), metadata=meta)
    print(report.summary())
    print(f"wrote {args.outdir} ({args.family}, preset {preset})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
