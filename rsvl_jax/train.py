"""Train any system: `python -m rsvl_jax.train --config configs/<file>.py[:args] [--config.a.b=v]`.

One generic loop; what differs between systems lives in their task (`rsvl_jax/tasks/`). Re-running
the same command resumes from the newest intact checkpoint in `workdir`. SIGTERM or SIGINT
(preemption on TPU VMs and SLURM) finishes the current step, saves a checkpoint and exits.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rsvl_jax import checkpoint, parallel, tasks
from rsvl_jax.config import ConfigError, load_config, parse_cli, print_help
from rsvl_jax.errors import UserError, run_cli


class TrainingError(UserError):
    """A run cannot continue (NaN loss, bad data); the last good checkpoint is kept."""


def split_model(model: nnx.Module, task: tasks.Task):
    """`graphdef, trainable, frozen, mutable, rest` (see `rsvl_jax.tasks`)."""
    return nnx.split(model, task.trainable, nnx.Param, nnx.BatchStat, ...)


def make_train_step(graphdef, task: tasks.Task, tx: optax.GradientTransformation, seed: int):
    """The pure step `(trainable, frozen, mutable, rest, opt_state, batch, step) ->
    (trainable, mutable, opt_state, metrics)`. Only `trainable` is differentiated: frozen
    parameters are plain inputs, so XLA computes no gradient for them."""
    loss_and_grad = make_loss_and_grad(graphdef, task, seed)

    def step_fn(trainable, frozen, mutable, rest, opt_state, batch, step):
        loss, metrics, mutable, grads = loss_and_grad(trainable, frozen, mutable, rest, batch, step)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics.update(loss=loss, grad_norm=optax.global_norm(grads))
        return trainable, mutable, opt_state, metrics

    return step_fn


def make_loss_and_grad(graphdef, task: tasks.Task, seed: int):
    """`(trainable, frozen, mutable, rest, batch, step) -> (loss, metrics, mutable, grads)`
    from the task's `embed` and `batch_loss`: the whole batch at once, in GradCache chunks (`task.chunk_size`), or one micro-batch of
    an accumulated update (`task.accumulate_steps`); see `rsvl_jax.tasks.Task`.

    Dropout keys come from (seed, update, block), so a resumed run draws the same masks, no
    RNG key object needs to be checkpointed, and a block draws the same masks whether it runs
    in the full batch, in a chunk or in a micro-batch."""
    accum = task.accumulate_steps

    def model_of(trainable, frozen, mutable, rest):
        # copy=True: fresh Variables at this trace level (dropout advances its RNG counters).
        return nnx.merge(graphdef, trainable, frozen, mutable, rest, copy=True)

    def update_key(step):
        return jax.random.fold_in(jax.random.key(seed), step // accum)

    def embed_blocks(trainable, frozen, mutable, rest, blocks, ids, key):
        """Blocks (n, block, ...) with ids (n,) -> representations stacked (n, ...) and the
        batch statistics of the first block (the reference keeps rank 0's)."""
        def one(block, i):
            model = model_of(trainable, frozen, mutable, rest)
            nnx.reseed(model, dropout=jax.random.fold_in(key, i))
            return task.embed(model, block), nnx.state(model, nnx.BatchStat)

        reps, stats = jax.vmap(one)(blocks, ids)
        return reps, jax.tree.map(lambda s: s[0], stats)

    def batch_loss(trainable, frozen, mutable, rest, reps, batch):
        return task.batch_loss(model_of(trainable, frozen, mutable, rest), reps, batch)

    def blockwise(trainable, frozen, mutable, rest, batch, step):
        n = jax.tree.leaves(batch)[0].shape[0]
        size = task.block_size or n
        blocks = _spread(jax.tree.map(lambda x: x.reshape((n // size, size) + x.shape[1:]), batch), lead=1)
        ids = (step % accum) * (n // size) + jnp.arange(n // size)  # block ids within the update
        key = update_key(step)
        if task.chunk_size:
            return _grad_cache(embed_blocks, batch_loss, (trainable, frozen, mutable, rest), blocks, ids, key,
                               batch, chunks=n // task.chunk_size)

        def loss_of(trainable):
            reps, stats = embed_blocks(trainable, frozen, mutable, rest, blocks, ids, key)
            loss, metrics = batch_loss(trainable, frozen, mutable, rest, reps, batch)
            return loss, (metrics, stats)

        (loss, (metrics, stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
        return loss, metrics, stats, grads

    return blockwise


def _spread(tree, lead: int):
    """Every block split over all data-parallel devices (the `lead` dims before the examples
    replicated): the layout the models' own "batch" constraints give each vmapped block, so
    XLA never has to re-shard activations between the two."""
    return jax.tree.map(lambda x: parallel.constrain(x, (None,) * lead + ("batch",) + (None,) * (x.ndim - lead - 1)),
                        tree)


def _grad_cache(embed_blocks, batch_loss, model_parts, blocks, ids, key, batch, chunks: int):
    """GradCache: the full-batch loss and gradient with one chunk's activations in memory.

    1. Embed every chunk without keeping activations. 2. Take the loss of all representations
    and its gradient with respect to them (and to the parameters the loss itself uses, e.g.
    temperatures). 3. Re-run each chunk with the same dropout keys and back-propagate its slice
    of that gradient; the sum over chunks is the full batch's parameter gradient. Chunk j holds
    blocks j, j + chunks, j + 2 chunks, ..., so every chunk spans all data-parallel devices."""
    trainable, frozen, mutable, rest = model_parts
    per_chunk = ids.shape[0] // chunks

    def to_chunks(x):  # (blocks, ...) -> (chunks, blocks per chunk, ...)
        return x.reshape((per_chunk, chunks) + x.shape[1:]).swapaxes(0, 1)

    def from_chunks(x):
        return x.swapaxes(0, 1).reshape((per_chunk * chunks,) + x.shape[2:])

    c_blocks, c_ids = _spread(jax.tree.map(to_chunks, blocks), lead=2), to_chunks(ids)
    frozen_trainable = jax.lax.stop_gradient(trainable)
    reps, stats = jax.lax.map(lambda xs: embed_blocks(frozen_trainable, frozen, mutable, rest, *xs, key),
                              (c_blocks, c_ids))
    reps, stats = jax.tree.map(from_chunks, reps), jax.tree.map(lambda s: s[0], stats)  # chunk 0 has block 0
    (loss, metrics), (grads, d_reps) = jax.value_and_grad(
        lambda t, r: batch_loss(t, frozen, mutable, rest, r, batch), argnums=(0, 1), has_aux=True)(trainable, reps)

    def backward(acc, xs):
        chunk_blocks, chunk_ids, d_chunk = xs
        _, vjp = jax.vjp(lambda t: embed_blocks(t, frozen, mutable, rest, chunk_blocks, chunk_ids, key)[0],
                         trainable)
        return jax.tree.map(jnp.add, acc, vjp(d_chunk)[0]), None

    grads, _ = jax.lax.scan(backward, grads, (c_blocks, c_ids, jax.tree.map(to_chunks, d_reps)))
    return loss, metrics, stats, grads


def check_batch_sizes(config, mesh, accum: int = 1) -> None:
    """Batch sizes the mesh or the hosts cannot split, said in the user's terms."""
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    dp = int(np.prod([sizes.get(a, 1) for a in parallel.BATCH_AXES]))
    hosts = jax.process_count()
    for key, devices in (("batch_size", dp), ("eval_batch_size", 1)):
        value = config[key]
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
        what, value = (key, value) if key != "batch_size" or accum == 1 else (
            f"batch_size / accumulate_steps = {value}/{accum}", value // accum)
        if value % devices:
            raise ConfigError(f"{what}={value} is not divisible by the {devices} data-parallel devices "
                              f"(mesh data x fsdp); use a multiple of {devices}")
        if value % hosts:
            raise ConfigError(f"{what}={value} is not divisible by the {hosts} processes")


class Preemption:
    """SIGTERM / SIGINT set a flag that the loop checks after every step; a second SIGINT
    interrupts at once. Installed only in the main thread (signals cannot be caught elsewhere)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def requested(self, sync: bool) -> bool:
        """Whether to stop now. With several processes the hosts agree (an all-gather), but
        only on `sync` steps, so the others keep their asynchronous dispatch."""
        flag = self.signal is not None
        if jax.process_count() > 1:
            if not sync:
                return False
            from jax.experimental import multihost_utils

            flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
        return flag

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class MetricsLog:
    """`metrics.jsonl` and TensorBoard with one record per step, never going backwards: on
    resume, records past the restored step (written after the last checkpoint) are dropped
    and TensorBoard is told to purge them."""

    def __init__(self, workdir: str, resumed_step: int, enabled: bool, eval_splits=()):
        self.eval_prefixes = tuple(f"{s}_" for s in eval_splits)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resumed_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # logging to JSONL still works
            return
        self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                    purge_step=resumed_step + 1 if resumed_step else None)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k not in ("step", "epoch"):
                    group = "eval" if k.startswith(self.eval_prefixes) else "train"
                    self.writer.add_scalar(f"{group}/{k}", v, record["step"])

    def images(self, split: str, step: int, report_dir: str, limit: int) -> None:
        """The first `limit` pictures of an evaluation report page, in page order (plots first,
        then the worst queries or captions), as TensorBoard image summaries."""
        page = os.path.join(report_dir, "index.html")
        if self.writer is None or not os.path.exists(page):
            return
        import re

        from PIL import Image

        with open(page) as f:
            sources = list(dict.fromkeys(re.findall(r'<img[^>]*\ssrc="([^"]+)"', f.read())))
        for src in sources[:limit]:
            with Image.open(os.path.join(report_dir, src)) as im:
                pixels = np.asarray(im.convert("RGB"))
            self.writer.add_image(f"{split}/{os.path.splitext(src)[0]}", pixels, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train(config, command: str | None = None) -> dict:
    """Runs (or resumes) training; returns the last evaluation metrics."""
    # ===================================================================== config + task
    task = tasks.get(config)
    workdir = os.path.abspath(config.workdir)

    # ===================================================================== mesh
    parallel.maybe_initialize_distributed()
    mesh = parallel.make_mesh(config.mesh)
    check_batch_sizes(config, mesh, task.accumulate_steps)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    say = (lambda *a: print(*a, flush=True)) if is_main else (lambda *a: None)
    say(f"run directory: {workdir}")
    if is_main:  # what this run is, for `evaluate` and for the next stage that starts from it
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=1))

    with jax.set_mesh(mesh), parallel.axis_rules(rules):
        # ================================================================= data
        data = task.open_data()
        accum = task.accumulate_steps  # the loop's steps are micro-batches when > 1
        loader = task.train_loader(data, config.batch_size // accum // jax.process_count())
        steps_per_epoch = loader.steps_per_epoch
        total_steps = steps_per_epoch * config.epochs
        if config.max_steps > 0:
            total_steps = min(total_steps, config.max_steps)

        # ================================================================= model + optimiser
        model = parallel.init_sharded(task.make_model, mesh, rules)
        for line in task.load_frozen(model):
            say(line)
        graphdef, trainable, frozen, mutable, rest = split_model(model, task)
        tx, schedule = task.optimizer(trainable, steps_per_epoch // accum, loader.num_items)
        if accum > 1:
            tx = optax.MultiSteps(tx, every_k_schedule=accum)
        opt_shardings = parallel.shardings_for_tree(jax.eval_shape(tx.init, trainable), mesh, rules)
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(trainable)

        # ================================================================= restore
        parallel.host_barrier("checkpoints")  # Orbax's manager syncs the hosts with a collective
        ckpt = checkpoint.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                            keep=config.keep_checkpoints, best_metrics=task.best_metrics)
        step = 0
        if ckpt.all_steps():
            saved, opt_state, data_state, step = ckpt.restore_newest_intact(
                nnx.state(model, task.saved), opt_state, warn=say)
            nnx.update(model, saved)
            loader.set_state(data_state["train"])
            say(f"resumed from step {step} in {workdir}")
        else:
            for line in task.load_pretrained(model):
                say(line)
        _, trainable, frozen, mutable, rest = split_model(model, task)
        trainable = jax.device_put(trainable, parallel.shardings_for_tree(trainable, mesh, rules))

        # ================================================================= step
        step_fn = jax.jit(make_train_step(graphdef, task, tx, config.seed), donate_argnums=(0, 2, 4))
        compiled = set()  # batch shapes compiled so far
        cache = jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache else None

        def run_step(*args):
            """With several hosts, compiles each new batch shape ahead of time and waits for the
            other hosts before running it, so all enter the step's collectives together (a host
            still compiling on a loaded machine makes the others miss gloo's 30 s set-up
            deadline). The run then reuses that compilation through the persistent cache."""
            shapes = tuple(x.shape for x in jax.tree.leaves(args[5]))
            if shapes in compiled:
                return step_fn(*args)
            say(f"compiling the train step for batch shapes {sorted(set(shapes))} ...")
            t = time.time()
            if jax.process_count() > 1:
                step_fn.lower(*args).compile()
                parallel.host_barrier("compiled")
            out = jax.block_until_ready(step_fn(*args))
            compiled.add(shapes)
            say(f"  compiled and ran it in {time.time() - t:.1f} s (compile cache: {cache or 'off'})")
            return out

        # ================================================================= loop
        log = MetricsLog(workdir, step, is_main, task.eval_splits)
        images = int(config.get("tensorboard_images", 0))
        last_eval: dict = {}
        every = config.checkpoint_every_steps
        t0, seen = time.time(), 0
        progress = _progress(total_steps, step, is_main)
        with Preemption() as preemption:
            while step < total_steps:
                batch = parallel.host_local_to_global(next(loader), mesh)
                trainable, mutable, opt_state, metrics = run_step(
                    trainable, frozen, mutable, rest, opt_state, batch, jnp.asarray(step, jnp.int32))
                step += 1
                seen += config.batch_size // accum
                progress.update(1)
                end_of_epoch = step % steps_per_epoch == 0
                record = {}
                # ------------------------------------------------------------- logging
                if step % config.log_every == 0 or end_of_epoch or step == total_steps:
                    metrics = jax.device_get(metrics)
                    if not all(np.isfinite(float(v)) for v in metrics.values()):
                        ckpt.close()
                        raise TrainingError(
                            f"non-finite loss or gradient at step {step}: {metrics}; the last good "
                            f"checkpoint in {workdir}/checkpoints is kept")
                    record = {"step": step, "epoch": step / steps_per_epoch,
                              "lr": float(schedule((step - 1) // accum)),
                              "images_per_s": seen / (time.time() - t0),
                              **{k: float(v) for k, v in metrics.items()}}
                    t0, seen = time.time(), 0
                    progress.set_postfix(loss=f"{record['loss']:.4f}")
                # ------------------------------------------------------------- evaluation
                eval_metrics = {}
                epoch = step // steps_per_epoch
                every_epochs = config.eval_every_epochs
                if end_of_epoch and task.eval_splits and every_epochs > 0 and epoch % every_epochs == 0:
                    current = nnx.merge(graphdef, trainable, frozen, mutable, rest)
                    parallel.host_barrier("eval")
                    for split in task.eval_splits:
                        if images and task.report is not None:  # the same pass, plus its pictures
                            out = os.path.join(workdir, "reports", f"{split}_step{step}")
                            res = task.report(current, data, split, step, out)
                            log.images(split, step, out, images)
                        else:
                            res = task.evaluate(current, data, split, step)
                        eval_metrics.update({f"{split}_{k}": v for k, v in res.items()})
                    last_eval = eval_metrics
                    if is_main:
                        progress.write(f"epoch {epoch}: " + task.format_metrics(eval_metrics))
                    record.update(eval_metrics)  # an epoch end always logs: one record per step
                if record:
                    log.write(record)
                # ------------------------------------------------------------- checkpoint
                stop = preemption.requested(sync=bool(record))
                if end_of_epoch or step == total_steps or stop or (every > 0 and step % every == 0):
                    ckpt.save(step, nnx.state(nnx.merge(graphdef, trainable, frozen, mutable, rest), task.saved),
                              opt_state, {"train": loader.get_state()}, metrics=eval_metrics or None)
                if stop:
                    ckpt.close()
                    progress.close()
                    log.close()
                    say(f"stopped by signal {preemption.signal} after step {step}; checkpoint saved in "
                        f"{ckpt.directory}/{step}; re-run the same command to resume")
                    return last_eval
        progress.close()
        ckpt.wait()
        model = nnx.merge(graphdef, trainable, frozen, mutable, rest)  # the live (undonated) state

        # ================================================================= final evaluation
        final = {}
        if task.final_splits and task.best_metrics:
            best = ckpt.best_step(task.best_metrics[0]) or ckpt.latest_step()
            saved, _, _, _ = ckpt.restore(best, nnx.state(model, task.saved), None)
            nnx.update(model, saved)
            for split in task.final_splits:
                res = task.evaluate(model, data, split, best)
                final.update({f"{split}_{k}": v for k, v in res.items()})
            say(f"{'/'.join(task.final_splits)} with the best checkpoint (step {best}): "
                + task.format_metrics(final))
            if is_main:
                with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
                    json.dump({"step": best, **final}, f, indent=1)
        ckpt.close()
        log.close()
        parallel.host_barrier("train_done")  # every host is done before any leaves

        # ================================================================= summary
        say(f"done: {step} steps in {workdir}")
        for name in task.best_metrics:
            best = ckpt.best_step(name)
            if best is not None:
                value = (ckpt.metrics(best) or {}).get(name, float("nan"))
                say(f"  best {name} {value:.2f} at step {best}: {ckpt.directory}/{best}")
        say(f"  latest checkpoint: {ckpt.directory}/{ckpt.latest_step()}")
        if command and task.evaluate is not None:
            say(f"  evaluate: python -m rsvl_jax.evaluate {command} --checkpoint {workdir}")
        say(f"  curves:   tensorboard --logdir {os.path.join(workdir, 'tensorboard')}")
        return final or last_eval


def _progress(total, initial, enabled):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True,
                desc="train", file=sys.stdout)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m rsvl_jax.train", add_help=False,
        description="Train (or resume) a system on the mesh of this host or pod. Re-running the same "
                    "command resumes from the newest intact checkpoint in the config's workdir.")
    parser.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    if "-h" in argv or "--help" in argv:
        print_help(parser, argv)
        return 0
    config, rest = parse_cli(argv)
    if rest:
        raise ConfigError(f"unrecognised arguments: {' '.join(rest)}")
    parallel.enable_compile_cache(config.get("compile_cache_dir"))
    for earlier in stages_first(config, argv):
        train(earlier)
    train(config, command=" ".join(a for a in argv))
    return 0


def stages_first(config, argv) -> list:
    """The configs of `config.run_first` (arguments of the same config file, e.g. the BITA
    demo's stages 1 and 2), each in a sibling directory of `workdir` named like its own
    default, started from the stage before it. Command-line overrides of keys they share
    apply to them too (data paths, sizes), except `workdir` and `model.init_checkpoint`."""
    firsts = tuple(config.get("run_first", ()))
    if not firsts:
        return []
    spec = next(a.split("=", 1)[1] if a.startswith("--config=") else argv[i + 1]
                for i, a in enumerate(argv) if a == "--config" or a.startswith("--config="))
    path = spec.split(".py:", 1)[0] + ".py" if ".py:" in spec else spec
    own = ("--config.workdir=", "--config.model.init_checkpoint=")
    shared = [a for a in argv if a.startswith("--config.") and not a.startswith(own)]
    base = os.path.dirname(os.path.abspath(config.workdir))
    out, previous = [], None
    for arg in firsts:
        default = load_config(f"{path}:{arg}")
        overrides = [o for o in shared if _has_key(default, o[len("--config."):].split("=", 1)[0])]
        overrides.append(f"--config.workdir={os.path.join(base, os.path.basename(default.workdir))}")
        if previous is not None:
            overrides.append(f"--config.model.init_checkpoint={previous}")
        out.append(load_config(f"{path}:{arg}", overrides))
        previous = out[-1].workdir
    if not any(a.startswith("--config.model.init_checkpoint=") for a in argv):
        config.model.init_checkpoint = previous  # a locked ConfigDict still takes new values
    return out


def _has_key(config, key: str) -> bool:
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


if __name__ == "__main__":
    sys.exit(run_cli(main))
