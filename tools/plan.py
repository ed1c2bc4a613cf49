"""Memory per device of a config's training step on a mesh, compiled ahead of time.

    python tools/plan.py --config configs/bita.py:stage=2 [--config.a.b=v ...]
                         [--devices 8] [--mesh data=1,fsdp=8,tensor=1] [--text-len 32]

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
    """`data=1,fsdp=8,tensor=1` -> {"data": 1, "fsdp": 8, "tensor": 1}."""
    if not text:
        return None
    out = {}
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


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python tools/plan.py", description=__doc__.splitlines()[0],
                                     epilog="--config SPEC and --config.a.b=value as for python -m rsvl_jax.train")
    parser.add_argument("--devices", type=int, default=None, help="simulated CPU devices (default: JAX's devices)")
    parser.add_argument("--mesh", default=None, help="e.g. data=1,fsdp=8,tensor=1 (default: the config's mesh)")
    parser.add_argument("--text-len", type=int, default=None,
                        help="text length of the batch (default: BITA max_txt_len, PIR's longest bucket)")
    from rsvl_jax.config import parse_cli

    config, rest = parse_cli(argv)
    args = parser.parse_args(rest)
    spec = next((a.split("=", 1)[1] if a.startswith("--config=") else argv[i + 1]
                 for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")), "")
    result = plan(config, parse_mesh(args.mesh), args.devices, args.text_len)
    print(format_table(result, spec), flush=True)
    return result


if __name__ == "__main__":
    # Simulated devices must be set before JAX starts, so before rsvl_jax (flax imports JAX);
    # main() called from Python (tests) uses the first --devices of the devices JAX has.
    for i, a in enumerate(sys.argv):
        if a == "--devices" and i + 1 < len(sys.argv) or a.startswith("--devices="):
            _set_device_count(int(a.split("=", 1)[1] if "=" in a else sys.argv[i + 1]))
    main()
