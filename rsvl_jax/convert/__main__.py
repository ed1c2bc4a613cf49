"""Convert a PyTorch checkpoint into an Orbax checkpoint that train/evaluate load directly.

    python -m rsvl_jax.convert FAMILY SOURCE OUTDIR [--preset NAME | --hf-config PATH]

The model config is a preset (`--preset`, default: the family's first preset) or, for the
families with HF releases (opt, clip_vit), read from an HF `config.json`: `--hf-config PATH`,
or automatically when SOURCE is a directory holding a `config.json` and no `--preset` is given.
Prints a summary: tensors converted, tensors skipped (by rule), parameters written.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys

from flax import nnx

from rsvl_jax import checkpoint
from rsvl_jax.convert import ConversionError, families, from_pytorch, get_family


def _model_config(family, args):
    """(config, description for the summary and metadata)."""
    auto = pathlib.Path(args.source) / "config.json"
    if args.hf_config and args.preset:
        raise ValueError("give --preset or --hf-config, not both")
    hf_path = args.hf_config or (str(auto) if not args.preset and family.hf_config and auto.is_file() else None)
    if hf_path:
        if family.hf_config is None:
            raise ValueError(f"family {family.name} has no HF config reader; use --preset "
                             f"(known: {', '.join(sorted(family.presets))})")
        try:
            return family.hf_config(hf_path), {"preset": None, "hf_config": str(hf_path)}, f"config from {hf_path}"
        except (KeyError, TypeError, OSError) as e:
            raise ValueError(f"cannot read an HF {family.name} config from {hf_path}: {e!r}") from e
    preset = args.preset or next(iter(family.presets))
    if preset not in family.presets:
        raise ValueError(f"unknown preset {preset!r} for {family.name}; known: {', '.join(sorted(family.presets))}")
    return family.presets[preset], {"preset": preset}, f"preset {preset}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rsvl_jax.convert", description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=families())
    parser.add_argument("source", help=".pth / .bin / .safetensors file or an HF model directory")
    parser.add_argument("outdir", help="directory for the Orbax checkpoint (must not exist)")
    parser.add_argument("--preset", help="model preset (default: the family's first preset, or the HF config.json "
                                         "of a SOURCE directory for opt / clip_vit)")
    parser.add_argument("--hf-config", help="build the model config from this HF config.json (opt, clip_vit)")
    args = parser.parse_args(argv)

    if os.path.exists(args.outdir):
        print(f"error: {args.outdir} already exists; choose a new output directory", file=sys.stderr)
        return 2
    family = get_family(args.family)
    try:
        config, meta_config, described = _model_config(family, args)
        module, report = from_pytorch(args.family, args.source, config, with_report=True)
    except (ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = {"family": args.family, **meta_config, "source": str(args.source)}
    if dataclasses.is_dataclass(config):
        meta["config"] = dataclasses.asdict(config)
    checkpoint.save_params(args.outdir, nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat)), metadata=meta)
    print(report.summary())
    print(f"wrote {args.outdir} ({args.family}, {described})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
