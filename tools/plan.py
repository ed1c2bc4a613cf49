"""Memory per device of a config's training step on a mesh, compiled ahead of time.

    python tools/plan.py --config configs/bita.py:stage=2 [--config.a.b=v ...]
                         [--devices 8] [--mesh data=1,fsdp=8,tensor=1] [--text-len 32]
    python tools/plan.py --config configs/pir.py:dataset=rsitmd --per-device-batch 128 \
                         --mesh data=1 --mesh data=8 --mesh fsdp=8 --mesh data=8,fsdp=8 --fit

`--mesh` may repeat: each mesh is compiled in turn and one summary row per mesh is printed
(the simulated device count defaults to the largest mesh; a smaller mesh uses the first
devices). `--per-device-batch B` sets the global batch to B x (data x fsdp) for each mesh, so
every mesh sees the same per-device work. `--fit` adds which meshes fit on common GPUs and TPU
chips (see `fit_table` for the headroom assumed). `--json PATH` saves the raw numbers.

Nothing is initialised and no data is read: the task's model, the optimiser state and a batch
exist only as shapes (`jax.eval_shape`, `jax.ShapeDtypeStruct`) carrying the shardings the
config's rules give them. The trainer's own step (`train.make_train_step`) is lowered and
compiled for the mesh, and XLA's `memory_analysis()` of the compiled step is printed: the bytes
of its arguments (parameters, optimiser state, batch), outputs, temporaries and code, per
device, plus parameter counts. `--devices N` simulates N CPU devices (it must be given before
JAX starts, so run this as a script); without it the mesh spans the devices JAX sees.

A BITA config needs a tokenizer to build its task; where the config names none, the project's
synthetic OPT / BERT vocabularies stand in (they change no shape: the embeddings keep the
preset's vocabulary size).
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GiB = 1024**3


def _set_device_count(n: int) -> None:
    """Simulated CPU devices: only effective before JAX initialises its backends."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def parse_mesh(text: str | None) -> dict | None:
    """`data=1,fsdp=8,tensor=1` -> {"data": 1, "fsdp": 8, "tensor": 1}; axes not named are 1."""
    if not text:
        return None
    out = {"data": 1, "fsdp": 1, "tensor": 1} if "=" in text else {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        if not name or not size:
            raise SystemExit(f"--mesh {text!r}: expected name=size[,name=size...]")
        out[name.strip()] = int(size)
    return out


def _fill_tokenizers(config) -> list[str]:
    """BITA's task loads a tokenizer when it is built; plan needs no real one."""
    notes = []
    if config.get("task") != "bita":
        return notes
    config.unlock()
    d, m = config.data, config.model
    if config.stage == "1" and not (d.bert_tokenizer or m.bert_dir):
        d.bert_tokenizer = "data/synthetic_vocab"
        notes.append("no BERT vocabulary configured: data/synthetic_vocab stands in (shapes unchanged)")
    if config.stage != "1" and not (d.opt_tokenizer or m.opt_dir):
        d.opt_tokenizer = "data/synthetic_opt_tokenizer"
        notes.append("no OPT tokenizer configured: data/synthetic_opt_tokenizer stands in (shapes unchanged)")
    config.lock()
    return notes


def batch_spec(config, model_config, text_len: int | None) -> dict:
    """Shapes and dtypes of one global training batch, as the task's loader yields it
    (rsvl_jax/data/pipeline.py for PIR, rsvl_jax/data/caption_pipeline.py for BITA)."""
    import jax.numpy as jnp

    b, s = config.batch_size, config.data.image_size
    image = ((b, s, s, 3), jnp.float32)
    if config.task == "pir":
        length = text_len or max(config.data.text_buckets)
        return {"image": image, "input_ids": ((b, length), jnp.int32), "idx": ((b,), jnp.int32),
                "label": ((b,), jnp.int32)}
    if config.task == "bita":
        length = text_len or model_config.max_txt_len
        spec = {"image": image, "text_ids": ((b, length), jnp.int32), "text_mask": ((b, length), jnp.int32)}
        if config.stage != "1":
            spec["targets"] = ((b, length), jnp.int32)
        return spec
    raise SystemExit(f"plan.py knows no batch layout for task {config.task!r}")


def _count(tree) -> int:
    import jax
    import numpy as np

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _bytes(tree) -> int:
    import jax
    import numpy as np

    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
                   if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)))


def plan(config, mesh_axes: dict | None = None, devices: int | None = None, text_len: int | None = None,
         say=print) -> dict:
    """Compiles the trainer's step for `config` on the mesh abstractly; returns the table's numbers."""
    import time

    import jax
    import jax.numpy as jnp
    from rsvl_jax import parallel, tasks, train

    for line in _fill_tokenizers(config):
        say(f"note: {line}")
    task = tasks.get(config)
    all_devices = jax.devices()
    if devices is not None:
        if devices > len(all_devices):
            raise SystemExit(f"--devices {devices}: JAX has only {len(all_devices)} devices "
                             "(run plan.py as a script so it can set the simulated device count)")
        all_devices = all_devices[:devices]
    mesh = parallel.make_mesh(mesh_axes or config.mesh, devices=all_devices)
    train.check_batch_sizes(config, mesh)
    rules = tuple(tuple(r) for r in config.sharding_rules)

    with jax.set_mesh(mesh), parallel.axis_rules(rules):
        # -- model: shapes only, sharded by the config's rules --------------------------------
        built = {}

        def split():
            model = task.make_model()
            built["config"] = getattr(model, "config", None)  # a plain dataclass, no arrays
            return train.split_model(model, task)

        graphdef, trainable, frozen, mutable, rest = jax.eval_shape(split)
        frozen_dtype = config.model.get("frozen_dtype", "float32")
        if frozen_dtype != "float32":  # what the task's load_frozen does to the frozen weights
            dt = jnp.dtype(frozen_dtype)
            frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dt)
                                  if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)

        def place(tree):
            return parallel.abstract_with_shardings(tree, parallel.shardings_for_tree(tree, mesh, rules))

        trainable, frozen, mutable, rest = (place(t) for t in (trainable, frozen, mutable, rest))
        # -- optimiser state: shapes only (the schedule's length does not change them) ---------
        steps_per_epoch = 1000
        tx, _ = task.optimizer(trainable, steps_per_epoch, steps_per_epoch * config.batch_size)
        opt_state = place(jax.eval_shape(tx.init, trainable))
        # -- batch -------------------------------------------------------------------------
        sharding = parallel.batch_sharding(mesh)
        shapes = batch_spec(config, built["config"], text_len)
        batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in shapes.items()}
        step = jax.ShapeDtypeStruct((), jnp.int32)
        # -- the trainer's step, as train.py jits it ---------------------------------------
        step_fn = jax.jit(train.make_train_step(graphdef, task, tx, config.seed), donate_argnums=(0, 2, 4))
        t0 = time.perf_counter()
        lowered = step_fn.lower(trainable, frozen, mutable, rest, opt_state, batch, step)
        compiled = lowered.compile()
        seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    out = {
        "devices": mesh.devices.size,
        "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)),
        "batch": config.batch_size,
        "trainable_params": _count(trainable),
        "frozen_params": _count(frozen),
        "trainable_bytes": _bytes(trainable),
        "frozen_bytes": _bytes(frozen),
        "opt_state_bytes": _bytes(opt_state),
        "argument": mem.argument_size_in_bytes,
        "output": mem.output_size_in_bytes,
        "alias": mem.alias_size_in_bytes,
        "temp": mem.temp_size_in_bytes,
        "generated_code": mem.generated_code_size_in_bytes,
        "compile_s": seconds,
    }
    # Donated inputs alias outputs: they are counted once.
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def format_table(r: dict, config_spec: str = "") -> str:
    def g(x):
        return f"{x / GiB:.3f}"

    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [
        f"plan {config_spec}: {r['devices']} device(s), mesh {mesh}, global batch {r['batch']}, "
        f"compiled in {r['compile_s']:.1f} s",
        f"parameters: trainable {r['trainable_params']:,} ({g(r['trainable_bytes'])} GiB), "
        f"frozen {r['frozen_params']:,} ({g(r['frozen_bytes'])} GiB); optimiser state "
        f"{g(r['opt_state_bytes'])} GiB (all devices together)",
        "memory per device (XLA memory_analysis of the compiled step), GiB:",
    ]
    rows = [("argument", r["argument"]), ("output", r["output"]), ("alias (donated)", r["alias"]),
            ("temp", r["temp"]), ("generated code", r["generated_code"]),
            ("total (arg + out - alias + temp)", r["total"])]
    width = max(len(n) for n, _ in rows)
    lines += [f"  {n.ljust(width)}  {g(v):>10}" for n, v in rows]
    return "\n".join(lines)


# Memory a chip offers, GiB (vendors' "GB" here are binary: an 80 GB A100 has 80 GiB), and
# the share of it the step may take: 10% stays free for the runtime (CUDA context, cuDNN/NCCL
# workspaces, XLA's collective buffers, fragmentation), which memory_analysis does not count.
CHIPS = (("GPU 16 GB", 16), ("GPU 24 GB", 24), ("GPU 40 GB", 40), ("GPU 80 GB", 80),
         ("TPU 16 GB", 16), ("TPU 32 GB", 32))
HEADROOM = 0.10


def mesh_name(mesh: dict) -> str:
    named = [f"{k}={v}" for k, v in mesh.items() if v != 1]
    return ",".join(named) or "1 device"


def summary_table(results: list[dict]) -> str:
    """One row per mesh: bytes per device from memory_analysis, GiB."""
    head = ["mesh", "devices", "global batch", "argument", "output", "alias", "temp", "total GiB"]
    rows = [[mesh_name(r["mesh"]), str(r["devices"]), str(r["batch"])]
            + [f"{r[k] / GiB:.2f}" for k in ("argument", "output", "alias", "temp", "total")] for r in results]
    return _markdown(head, rows)


def fits(result: dict, capacity_gib: float, headroom: float = HEADROOM) -> bool:
    return result["total"] <= (1.0 - headroom) * capacity_gib * GiB


def fit_table(results: list[dict], headroom: float = HEADROOM) -> str:
    """Per mesh and chip: fits (total <= (1 - headroom) x capacity) or the shortfall."""
    head = ["mesh", "total GiB"] + [name for name, _ in CHIPS]
    rows = []
    for r in results:
        cells = ["yes" if fits(r, cap, headroom) else "no" for _, cap in CHIPS]
        rows.append([mesh_name(r["mesh"]), f"{r['total'] / GiB:.2f}"] + cells)
    return _markdown(head, rows)


def _markdown(head, rows) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def _mesh_size(mesh: dict | None) -> int:
    import math

    return math.prod(v for v in mesh.values() if v > 0) if mesh else 0


def main(argv=None) -> dict | list[dict]:
    """One mesh: returns its numbers (dict); several `--mesh`: a list of them, one per mesh."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python tools/plan.py", description=__doc__.splitlines()[0],
                                     epilog="--config SPEC and --config.a.b=value as for python -m rsvl_jax.train")
    parser.add_argument("--devices", type=int, default=None,
                        help="simulated CPU devices (default: JAX's devices; with --mesh, the largest mesh's)")
    parser.add_argument("--mesh", action="append", default=None,
                        help="e.g. data=1,fsdp=8,tensor=1; repeat for several meshes (default: the config's mesh)")
    parser.add_argument("--per-device-batch", type=int, default=None,
                        help="global batch = this x (data x fsdp) for each mesh (default: the config's batch_size)")
    parser.add_argument("--text-len", type=int, default=None,
                        help="text length of the batch (default: BITA max_txt_len, PIR's longest bucket)")
    parser.add_argument("--fit", action="store_true", help="also print which meshes fit on which chips")
    parser.add_argument("--json", default=None, help="write the raw numbers of every mesh to this file")
    from rsvl_jax.config import parse_cli

    config, rest = parse_cli(argv)
    args = parser.parse_args(rest)
    spec = next((a.split("=", 1)[1] if a.startswith("--config=") else argv[i + 1]
                 for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")), "")
    meshes = [parse_mesh(m) for m in args.mesh] if args.mesh else [None]
    results = []
    for mesh in meshes:
        devices = args.devices if args.devices is not None and (mesh is None or len(meshes) == 1) else (
            _mesh_size(mesh) or args.devices)
        if args.per_device_batch:
            dp = (mesh or {}).get("data", 1) * (mesh or {}).get("fsdp", 1) if mesh else (devices or 1)
            config.unlock()
            config.batch_size = args.per_device_batch * dp
            config.lock()
        result = plan(config, mesh, devices, args.text_len)
        print(format_table(result, spec), flush=True)
        results.append(result)
    if len(results) > 1 or args.fit:
        print(f"\nsummary {spec}: bytes per device (XLA memory_analysis), GiB", flush=True)
        print(summary_table(results), flush=True)
    if args.fit:
        print(f"\nfits: total <= {1 - HEADROOM:.0%} of the chip's memory", flush=True)
        print(fit_table(results), flush=True)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"config": spec, "argv": argv, "results": results}, f, indent=1)
    return results[0] if len(results) == 1 else results


if __name__ == "__main__":
    # Simulated devices must be set before JAX starts, so before rsvl_jax (flax imports JAX);
    # main() called from Python (tests) uses the first --devices of the devices JAX has.
    count = 0
    for i, a in enumerate(sys.argv):
        if a == "--devices" and i + 1 < len(sys.argv) or a.startswith("--devices="):
            count = max(count, int(a.split("=", 1)[1] if "=" in a else sys.argv[i + 1]))
        if a == "--mesh" and i + 1 < len(sys.argv) or a.startswith("--mesh="):
            count = max(count, _mesh_size(parse_mesh(a.split("=", 1)[1] if a.startswith("--mesh=") else sys.argv[i + 1])))
    if count:
        _set_device_count(count)
    main()
