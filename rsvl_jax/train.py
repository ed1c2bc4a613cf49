"""Train PIR: `python -m rsvl_jax.train --config configs/pir.py:dataset=rsitmd [--config.a.b=v]`.

One readable loop: config, mesh, data, model and optimiser (abstract shapes first, then a
sharded init), restore, the jitted step, evaluation, checkpoints, logging. Re-running the
same command resumes from the last checkpoint in `workdir`.
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rsvl_jax import checkpoint, evaluate, losses, optim, parallel
from rsvl_jax.config import parse_cli
from rsvl_jax.convert import from_pytorch
from rsvl_jax.convert import pir as pir_convert
from rsvl_jax.models import pir as pir_lib


class TrainingError(RuntimeError):
    """A run cannot continue (NaN loss, bad data); the last good checkpoint is kept."""


def model_config(config) -> pir_lib.PIRConfig:
    """The model's frozen dataclass config: a preset plus the experiment's switches."""
    import dataclasses

    m = config.model
    preset = pir_lib.PRESETS[m.preset]
    resnet = preset.resnet and dataclasses.replace(preset.resnet, bn_group_size=config.reference_device_batch)
    bert = preset.bert
    if m.text_vocab_size and bert is not None:
        bert = dataclasses.replace(bert, vocab_size=m.text_vocab_size)
    return dataclasses.replace(
        preset, resnet=resnet, bert=bert, is_baseline=m.is_baseline, text_mask=m.text_mask,
        temp_clamp=True if m.temp_clamp else None, prior_bn_mode=m.prior_bn_mode,
        sort_on_logits=m.sort_on_logits,
        use_affil_loss=config.loss.affiliation_weight > 0 and not m.is_baseline,
        use_triplet_loss=config.loss.kind == "triplet")


def build_model(mcfg: pir_lib.PIRConfig, mesh, rules, seed: int):
    """Abstract shapes first, then a jitted init straight into the mesh's shardings, so a full
    copy of the model never sits on one device."""
    make = lambda: pir_lib.PIR(mcfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))  # noqa: E731
    # jax.eval_shape, not nnx.eval_shape: the latter turns logical names into mesh shardings.
    graphdef, abstract = jax.eval_shape(lambda: nnx.split(make()))
    shardings = parallel.shardings_for_tree(abstract, mesh, rules)
    state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state), shardings


def load_backbones(model: pir_lib.PIR, config) -> list[str]:
    """Pretrained encoder weights from local files (PIR.md §6.2; the Q1/Q2 'fixed' modes)."""
    m, done = config.model, []
    if m.init_checkpoint:
        src = from_pytorch("pir", m.init_checkpoint, model.config)
        nnx.update(model, nnx.state(src, nnx.Any(nnx.Param, nnx.BatchStat)))
        return [f"pir <- {m.init_checkpoint}"]
    for family, path, sub, cfg in (
        ("swin", m.swin_weights, "vision_encoder", model.config.swin),
        ("bert", m.bert_weights, "text_encoder", model.config.bert),
        ("resnet50", m.resnet_weights, "conv_encoder", model.config.resnet),
    ):
        target = getattr(model, sub, None)
        if path and target is not None:
            src, report = from_pytorch(family, path, cfg, with_report=True)
            nnx.update(target, nnx.state(src, nnx.Any(nnx.Param, nnx.BatchStat)))
            done.append(report.summary())
    return done


def make_optimizer(config, mcfg: pir_lib.PIRConfig, params, num_items: int):
    """AdamW over the reference's parameter groups with its schedule (PIR.md §4)."""
    names = pir_convert.reference_names(mcfg)
    labels = optim.pir_labels(params, names, frozen_prefixes=() if mcfg.finetune_prior else ("conv_encoder",))
    sched_steps = config.epochs * -(-num_items // config.batch_size)  # Q16: ceil, not the real count
    schedule = optim.linear_warmup_decay(
        config.optim.lr, sched_steps, int(config.optim.warmup_fraction * sched_steps))
    tx = optim.pir_optimizer(labels, schedule, b1=config.optim.b1, b2=config.optim.b2,
                             eps=config.optim.eps, weight_decay=config.optim.weight_decay,
                             grad_clip=config.optim.grad_clip)
    return tx, schedule


def make_train_step(graphdef, tx, config, num_shards: int):
    """The pure step: (params, stats, rng_state, opt_state, batch, step) -> new state, metrics."""
    w_affil = float(config.loss.affiliation_weight)
    triplet = config.loss.kind == "triplet"

    def loss_fn(params, stats, rng_state, batch):
        # copy=True: fresh Variables at this trace level (dropout advances its RNG counters).
        model = nnx.merge(graphdef, params, stats, rng_state, copy=True)
        img, _ = model.encode_image(batch["image"], deterministic=False, train_prior_bn=True)
        txt, _ = model.encode_text(batch["input_ids"], deterministic=False)
        temp, temp2 = model.temperatures()
        metrics = {}
        if triplet:
            loss = losses.triplet_loss(img, txt)
            metrics["loss_triplet"] = loss
        else:
            loss = metrics["loss_contr"] = losses.pir_contrastive_loss(img, txt, temp, batch["idx"])
            metrics["temp"] = temp
        if w_affil > 0 and temp2 is not None:
            metrics["loss_affil"] = losses.pir_affiliation_loss(
                img, txt, batch["label"], temp2, num_shards=num_shards)
            metrics["temp2"] = temp2
            loss = loss + w_affil * metrics["loss_affil"]
        new_stats = nnx.state(model, nnx.BatchStat)
        return loss, (metrics, new_stats)

    def step_fn(params, stats, rng_state, opt_state, batch, step):
        # Dropout keys come from (seed, step), so a resumed run draws the same masks and no
        # RNG key object needs to be checkpointed.
        model = nnx.merge(graphdef, params, stats, rng_state, copy=True)
        nnx.reseed(model, dropout=jax.random.fold_in(jax.random.key(config.seed), step))
        rng_state = nnx.split(model, nnx.Param, nnx.BatchStat, ...)[3]
        (loss, (metrics, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, stats, rng_state, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics.update(loss=loss, grad_norm=optax.global_norm(grads))
        return params, stats, opt_state, metrics

    return step_fn


def _log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(config) -> dict:
    """Runs (or resumes) training; returns the last evaluation metrics."""
    # ===================================================================== mesh
    parallel.maybe_initialize_distributed()
    mesh = parallel.make_mesh(config.mesh)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    workdir = os.path.abspath(config.workdir)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0

    with jax.set_mesh(mesh), parallel.axis_rules(rules):
        # ================================================================= data
        from rsvl_jax.data import pipeline  # grain/TFDS only where data is read

        data = evaluate.open_data(config)
        tokenizer = data.tokenizer
        loader = pipeline.TrainLoader(
            data.splits["train"], tokenizer, batch_size=config.batch_size // jax.process_count(),
            image_size=config.data.image_size, seed=config.seed,
            transform=evaluate.train_transform(config), text_bucket=tuple(config.data.text_buckets),
            max_words=config.data.max_words)
        steps_per_epoch = loader.steps_per_epoch
        total_steps = steps_per_epoch * config.epochs
        if config.max_steps > 0:
            total_steps = min(total_steps, config.max_steps)

        # ================================================================= model + optimiser
        mcfg = model_config(config)
        if mcfg.bert is not None and tokenizer.get_vocab_size() > mcfg.bert.vocab_size:
            raise ValueError(
                f"the vocabulary {config.data.vocab} has {tokenizer.get_vocab_size()} tokens but the "
                f"text encoder embeds {mcfg.bert.vocab_size}; set --config.model.text_vocab_size")
        model, _ = build_model(mcfg, mesh, rules, config.seed)
        graphdef, params, stats, rng_state = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
        tx, schedule = make_optimizer(config, mcfg, params, loader.num_items)
        opt_shardings = parallel.shardings_for_tree(jax.eval_shape(tx.init, params), mesh, rules)
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)

        # ================================================================= restore
        ckpt = checkpoint.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                            keep=config.keep_checkpoints,
                                            best_metrics=tuple(f"{s}_r_mean" for s in config.eval_splits))
        model_vars = lambda: nnx.State.merge(params, stats)  # noqa: E731
        step = 0
        if ckpt.latest_step() is not None:
            restored, opt_state, data_state, step = ckpt.restore(None, model_vars(), opt_state)
            nnx.update(model, restored)
            _, params, stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
            loader.set_state(data_state["train"])
            print(f"resumed from step {step} in {workdir}", flush=True)
        else:
            for line in load_backbones(model, config):
                print(line, flush=True)
            _, params, stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
            params = jax.device_put(params, parallel.shardings_for_tree(params, mesh, rules))

        # ================================================================= step
        num_shards = max(1, config.batch_size // config.reference_device_batch)
        step_fn = jax.jit(make_train_step(graphdef, tx, config, num_shards), donate_argnums=(0, 1, 3))
        encoders = evaluate.Encoders(graphdef, rng_state)

        # ================================================================= loop
        log_path = os.path.join(workdir, "metrics.jsonl")
        writer = _tensorboard(workdir) if is_main else None
        last_eval: dict = {}
        t0, seen = time.time(), 0
        progress = _progress(total_steps, step, is_main)
        while step < total_steps:
            batch = parallel.host_local_to_global(next(loader), mesh)
            params, stats, opt_state, metrics = step_fn(params, stats, rng_state, opt_state, batch,
                                                        jnp.asarray(step, jnp.int32))
            step += 1
            seen += config.batch_size
            progress.update(1)
            end_of_epoch = step % steps_per_epoch == 0
            if step % config.log_every == 0 or end_of_epoch or step == total_steps:
                metrics = jax.device_get(metrics)
                if not all(np.isfinite(float(v)) for v in metrics.values()):
                    ckpt.close()
                    raise TrainingError(
                        f"non-finite loss or gradient at step {step}: {metrics}; the last good "
                        f"checkpoint in {workdir}/checkpoints is kept")
                record = {"step": step, "epoch": step / steps_per_epoch,
                          "lr": float(schedule(step - 1)),
                          "images_per_s": seen / (time.time() - t0),
                          **{k: float(v) for k, v in metrics.items()}}
                t0, seen = time.time(), 0
                progress.set_postfix(loss=f"{record['loss']:.4f}")
                if is_main:
                    _log(log_path, record)
                    for k, v in record.items():
                        writer.add_scalar(f"train/{k}", v, step)
            if end_of_epoch or step == total_steps:
                eval_metrics = {}
                if end_of_epoch and (step // steps_per_epoch) % config.eval_every_epochs == 0:
                    for split in config.eval_splits:
                        if split in data.splits:
                            res = encoders.retrieval(params, stats, data, split, config)
                            eval_metrics.update({f"{split}_{k}": v for k, v in res.items()})
                    last_eval = eval_metrics
                    if is_main:
                        progress.write(f"epoch {step // steps_per_epoch}: " + evaluate.format_metrics(eval_metrics))
                        _log(log_path, {"step": step, "epoch": step // steps_per_epoch, **eval_metrics})
                        for k, v in eval_metrics.items():
                            writer.add_scalar(f"eval/{k}", v, step)
                ckpt.save(step, model_vars(), opt_state, {"train": loader.get_state()},
                          metrics=eval_metrics or None)
        progress.close()
        ckpt.close()
        if writer is not None:
            writer.close()
        for split in config.eval_splits:
            best = ckpt.best_step(f"{split}_r_mean")
            if best is not None and is_main:
                print(f"best {split} r_mean: step {best}", flush=True)
        return last_eval


def _tensorboard(workdir):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # logging to JSONL still works
        return _NullWriter()
    return SummaryWriter(os.path.join(workdir, "tensorboard"))


class _NullWriter:
    def add_scalar(self, *a, **k):
        pass

    def close(self):
        pass


def _progress(total, initial, enabled):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True,
                desc="train", file=sys.stdout)


def main(argv=None) -> int:
    config, rest = parse_cli(sys.argv[1:] if argv is None else argv)
    if rest:
        raise SystemExit(f"unrecognised arguments: {' '.join(rest)}")
    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
