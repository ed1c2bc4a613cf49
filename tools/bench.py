"""Benchmarks: `python tools/bench.py encoders|pir|bita|generate [--dtype bfloat16] [--quick]`.

encoders  forward throughput of Swin-T, BERT-base (47 tokens), ResNet-50 and BITA's 21-block
          CLIP ViT-L/14 at real size, ours (jitted) vs the `transformers` PyTorch models on the
          same (random) weights and the same thread count.
pir       PIR train-step and eval images/s for the paper configuration (configs/pir.py, rsitmd,
          captions of --text-len BERT ids), with MFU: XLA's FLOP count of the compiled step /
          (step time x a measured matmul peak). The step is the trainer's own (the task's model,
          optimiser and loss through `train.make_train_step`). `--reference CHECKOUT` also times
          the original PIR code of a checkout of jaychempan/PIR (tools/bench_reference.py).
bita      BITA stage-2 training images/s (configs/bita.py:stage=2: ViT-L/14 21 blocks + the full
          IFT, with an OPT-125m-shaped frozen decoder, or --opt another preset's), the trainer's
          step vs a PyTorch stand-in built from HF modules at the same shapes (Blip2QFormerModel
          mixes tokens by self-attention, not BITA's Fourier mixing), MFU of both from our step's
          FLOP count.
generate  5-beam captioning throughput vs HF generate (tools/bench_generate.py; --opt, --device cuda).
chunks    the GradCache step (config chunk_size) against the full-batch step at the same global
          batch: time and XLA's peak temporary memory (memory_analysis) of the trainer's step.

--quick runs tiny presets, only to check that the tool itself works. Timings exclude
compilation (one warm-up call); each number is the median of the repeats.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

# torch's OpenMP threads otherwise spin between its calls and take the cores from XLA while
# our side is timed (ResNet-50 measured 10.4 instead of 13.1 img/s); they sleep with this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if __name__ == "__main__":  # never when imported (a test process must not re-execute itself)
    from rsvl_jax import allocator

    allocator.use_jemalloc()  # as `python -m rsvl_jax.train` runs (both sides of a comparison get it)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timing  # noqa: E402  (tools/timing.py)


def timed(fn, repeats: int) -> float:
    """Median wall seconds of `fn()` (a JAX computation) after one warm-up call (compilation)."""
    return timing.seconds(lambda: jax.block_until_ready(fn()), repeats)


def matmul_peak(dtype=jnp.float32, n: int | None = None, repeats: int = 10) -> float:
    """Measured FLOP/s of a large jitted matmul, the best of `repeats` (a peak, and steadier
    than a median on a shared machine): the denominator of our MFU."""
    n = n or (2048 if jax.devices()[0].platform == "cpu" else 8192)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    return 2 * n**3 / timing.seconds(lambda: jax.block_until_ready(f(a)), repeats, min)


def torch_matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """The same measurement in PyTorch (float32, its current thread count): torch's MFU denominator."""
    import torch

    a = torch.randn(n, n)
    return 2 * n**3 / timing.seconds(lambda: a @ a, repeats, min)


def print_peaks(dtype=jnp.float32) -> tuple[float, float]:
    """Both frameworks' matmul peaks, measured in this run (MFU denominators)."""
    ours, torch_peak = matmul_peak(dtype), torch_matmul_peak()
    print(f"measured matmul peak (jitted n x n): XLA {jnp.dtype(dtype).name} {ours / 1e9:.1f} GFLOP/s, "
          f"torch float32 {torch_peak / 1e9:.1f} GFLOP/s", flush=True)
    return ours, torch_peak


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def _table(rows, columns):
    widths = [max(len(c), *(len(f"{r[c]}") for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(f"{r[c]}".ljust(w) for c, w in zip(columns, widths)))


# ---------------------------------------------------------------------------------------
# encoders
# ---------------------------------------------------------------------------------------
def _encoder_cases(quick: bool):
    """(name, batch, build torch model, converter family, our preset, input makers)."""
    import transformers as tf

    from rsvl_jax.models import bert, resnet, swin, vit

    def swin_t():
        c = swin.PRESETS["swin_tiny_224"]
        return tf.SwinModel(tf.SwinConfig(image_size=224, patch_size=4, embed_dim=c.embed_dim, depths=list(c.depths),
                                          num_heads=list(c.num_heads), window_size=7, hidden_act="gelu",
                                          layer_norm_eps=1e-5, drop_path_rate=0.0)), c

    def bert_base():
        c = bert.PRESETS["bert_base_uncased"]
        return tf.BertModel(tf.BertConfig(), add_pooling_layer=False), c

    def resnet50():
        c = resnet.PRESETS["resnet50"]
        return tf.ResNetModel(tf.ResNetConfig(layer_type="bottleneck", depths=[3, 4, 6, 3],
                                              hidden_sizes=[256, 512, 1024, 2048],
                                              downsample_in_bottleneck=False)), c

    def vit_l():
        c = vit.PRESETS["clip_vit_l14_bita"]
        return tf.CLIPVisionModel(tf.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=21,
                                                      num_attention_heads=16, image_size=224, patch_size=14,
                                                      hidden_act="quick_gelu")), c

    image = lambda b: np.random.default_rng(0).normal(size=(b, 224, 224, 3)).astype(np.float32)  # noqa: E731
    tokens = lambda b: np.random.default_rng(0).integers(1000, 30000, size=(b, 47)).astype(np.int32)  # noqa: E731
    n = 1 if quick else None
    return [
        ("Swin-T 224", n or 8, swin_t, "swin", image),
        ("BERT-base L=47", n or 32, bert_base, "bert", tokens),
        ("ResNet-50 224", n or 8, resnet50, "resnet50", image),
        ("CLIP ViT-L/14 (21 blocks)", n or 4, vit_l, "clip_vit", image),
    ]


def bench_encoders(repeats: int, quick: bool, only: str | None = None):
    import torch

    from rsvl_jax.convert import from_pytorch

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    peak, torch_peak = print_peaks()
    rows = []
    for name, batch, make, family, inputs in _encoder_cases(quick):
        if only and only.lower() not in name.lower():
            continue
        torch.manual_seed(0)
        ref, cfg = make()
        ref.eval()
        ours = from_pytorch(family, ref.state_dict(), cfg)
        graphdef, state = nnx.split(ours)
        x = inputs(batch)

        @jax.jit
        def fwd(state, x):
            out = nnx.merge(graphdef, state)(x)
            return out[0] if isinstance(out, tuple) else out

        xj = jnp.asarray(x)
        flops = _flops(fwd.lower(state, xj).compile())  # one count for both sides
        t_ours = timed(lambda: fwd(state, xj), repeats)
        if x.dtype == np.int32:
            xt = torch.from_numpy(x.astype(np.int64))
            call = lambda: ref(input_ids=xt)  # noqa: E731
        else:
            xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
            call = lambda: ref(pixel_values=xt)  # noqa: E731
        with torch.inference_mode():
            t_ref = timing.seconds(call, repeats)
        rows.append({"model": name, "batch": batch, "ours items/s": f"{batch / t_ours:.2f}",
                     "torch items/s": f"{batch / t_ref:.2f}", "ratio": f"{t_ref / t_ours:.2f}x",
                     "ours MFU": f"{100 * flops / t_ours / peak:.0f}%",
                     "torch MFU": f"{100 * flops / t_ref / torch_peak:.0f}%"})
    print(f"encoder forward, float32, {threads} threads (torch.set_num_threads), jax {jax.__version__}, "
          f"torch {torch.__version__}, device {jax.devices()[0].platform}; MFU: XLA's FLOP count of our "
          "forward / (time x that framework's matmul peak)")
    _table(rows, list(rows[0]) if rows else [])
    return rows


# ---------------------------------------------------------------------------------------
# The trainer's step, built as train.py builds it
# ---------------------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(spec: str, overrides=()):
    from rsvl_jax.config import load_config

    return load_config(f"{ROOT}/{spec}", list(overrides))


class TrainerStep:
    """The task's model, optimiser and `train.make_train_step`, jitted with the trainer's
    donation and compiled for `batch`: what one step of `python -m rsvl_jax.train` runs, here
    on one device (the config's mesh axes, all of size 1)."""

    def __init__(self, config, task, batch: dict, steps_per_epoch: int, num_items: int):
        from rsvl_jax import parallel, train

        self.mesh = parallel.make_mesh(config.mesh, devices=jax.local_devices()[:1])
        self.rules = tuple(tuple(r) for r in config.sharding_rules)
        with jax.set_mesh(self.mesh), parallel.axis_rules(self.rules):
            model = parallel.init_sharded(task.make_model, self.mesh, self.rules)
            task.load_frozen(model)  # no weight paths here: only the frozen_dtype cast, if any
            self.graphdef, trainable, self.frozen, mutable, self.rest = train.split_model(model, task)
            tx, _ = task.optimizer(trainable, steps_per_epoch, num_items)
            opt_shardings = parallel.shardings_for_tree(jax.eval_shape(tx.init, trainable), self.mesh, self.rules)
            opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(trainable)
            self.batch = parallel.host_local_to_global(batch, self.mesh)
            step_fn = jax.jit(train.make_train_step(self.graphdef, task, tx, config.seed), donate_argnums=(0, 2, 4))
            self.compiled = step_fn.lower(trainable, self.frozen, mutable, self.rest, opt_state, self.batch,
                                          jnp.int32(0)).compile()
        self.state = [trainable, mutable, opt_state]
        self.flops = _flops(self.compiled)

    def __call__(self):
        trainable, mutable, opt_state = self.state
        trainable, mutable, opt_state, metrics = self.compiled(
            trainable, self.frozen, mutable, self.rest, opt_state, self.batch, jnp.int32(0))
        self.state = [trainable, mutable, opt_state]
        return metrics["loss"]

    def model(self):
        return nnx.merge(self.graphdef, self.state[0], self.frozen, self.state[1], self.rest)


# ---------------------------------------------------------------------------------------
# PIR
# ---------------------------------------------------------------------------------------
def bench_pir(repeats: int, batch: int, dtype: str, quick: bool, text_len: int = 24, reference: str | None = None,
              threads: int | None = None):
    """PIR's training step through its task (configs/pir.py:dataset=rsitmd at `batch`); with
    `reference`, also the original PIR code of that checkout (tools/bench_reference.py)."""
    from rsvl_jax import tasks
    from rsvl_jax.models import pir as pir_lib
    from rsvl_jax.tasks import pir as pir_task

    if reference:
        from bench_reference import check_checkout, time_original_pir

        check_checkout(reference)  # a wrong path fails before our side's minutes of work
    overrides = [f"--config.batch_size={batch}", f"--config.reference_device_batch={batch}"]
    if quick:
        overrides += ["--config.model.preset=pir_test", "--config.data.image_size=32"]
    config = _config("configs/pir.py:dataset=rsitmd", overrides)
    task = tasks.get(config)
    if dtype != "float32":  # configs/pir.py has no compute-dtype switch: the same task, another model
        dt, rep = jnp.dtype(dtype), dataclasses.replace
        mcfg = pir_task.model_config(config)
        mcfg = rep(mcfg, dtype=dt, swin=rep(mcfg.swin, dtype=dt), bert=rep(mcfg.bert, dtype=dt),
                   resnet=rep(mcfg.resnet, dtype=dt))
        task = rep(task, make_model=lambda: pir_lib.PIR(mcfg, rngs=nnx.Rngs(params=config.seed,
                                                                            dropout=config.seed + 1)))
    size = config.data.image_size
    rng = np.random.default_rng(0)
    vocab = pir_task.model_config(config).bert.vocab_size
    batch_data = {
        "image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
        "input_ids": rng.integers(min(1000, vocab // 2), min(30000, vocab), size=(batch, text_len)).astype(np.int32),
        "idx": np.arange(batch, dtype=np.int32) // 2,
        "label": rng.integers(0, 4, size=batch).astype(np.int32),
    }
    step = TrainerStep(config, task, batch_data, steps_per_epoch=-(-17175 // batch), num_items=17175)
    t_train = timed(step, repeats)
    with jax.set_mesh(step.mesh):
        graphdef, state = nnx.split(step.model())
        encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_image(x)[0])
        t_eval = timed(lambda: encode(state, step.batch["image"]), repeats)
    peak, _ = print_peaks(jnp.dtype(dtype))
    mfu = step.flops / t_train / peak
    row = {"config": f"PIR {config.model.preset} {size}px L={text_len}", "dtype": dtype, "batch": batch,
           "train s/step": f"{t_train:.3f}", "train img/s": f"{batch / t_train:.2f}",
           "eval img/s": f"{batch / t_eval:.2f}", "step GFLOP": f"{step.flops / 1e9:.1f}",
           "matmul peak GFLOP/s": f"{peak / 1e9:.1f}", "MFU": f"{100 * mfu:.1f}%"}
    rows = [row]
    if reference:
        # The original Swin-T (window 7) takes 224 px, not --quick's 32: then shapes differ.
        ref_size = 224 if quick else size
        ref = time_original_pir(reference, batch, text_len, ref_size, repeats, threads)
        torch_peak = torch_matmul_peak()
        same = ref_size == size
        row["ref/ours s/step"] = "1.00x"
        rows.append({"config": f"original PIR (torch {ref['torch']}) {ref_size}px L={text_len}", "dtype": "float32",
                     "batch": batch, "train s/step": f"{ref['s_per_step']:.3f}",
                     "train img/s": f"{ref['images_per_s']:.2f}", "eval img/s": "-",
                     "step GFLOP": "(ours)" if same else "-", "matmul peak GFLOP/s": f"{torch_peak / 1e9:.1f}",
                     "MFU": f"{100 * step.flops / ref['s_per_step'] / torch_peak:.1f}%" if same else "n/a",
                     "ref/ours s/step": f"{ref['s_per_step'] / t_train:.2f}x" if same else "n/a (shapes differ)"})
        print(f"reference side: {reference}, {ref['threads']} torch threads, random init "
              f"(checkpoints not read: {', '.join(ref['skipped_checkpoints']) or 'none'}); "
              + "; ".join(ref["notes"] + ["its MFU uses our step's XLA FLOP count"]))
    else:
        print("reference side: none (the original PIR code is not a dependency); `--reference CHECKOUT` "
              "times a checkout of jaychempan/PIR at the same shapes")
    print(f"PIR training step (the trainer's: task loss, fwd+bwd+AdamW, jitted), "
          f"device {jax.devices()[0].device_kind}")
    _table(rows, list(row))
    return row


def bench_chunks(repeats: int, batch: int, quick: bool, block: int = 16):
    """PIR's demo model (64 px; --quick: the test model) at a global batch of `batch` in blocks
    of `block`: the full-batch step and GradCache chunks of 1, 2, ... blocks."""
    from rsvl_jax import tasks

    preset = ["--config.model.preset=pir_test", "--config.data.image_size=32"] if quick else []
    config = _config("configs/pir.py:demo", [f"--config.batch_size={batch}",
                                             f"--config.reference_device_batch={block}", *preset])
    size, rng = config.data.image_size, np.random.default_rng(0)
    batch_data = {"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
                  "input_ids": rng.integers(1, 200, size=(batch, 24)).astype(np.int32),
                  "idx": np.arange(batch, dtype=np.int32) // 2, "label": rng.integers(0, 4, size=batch).astype(np.int32)}
    rows = []
    for chunk in [0] + [block * 2**i for i in range(8) if block * 2**i < batch]:
        task = dataclasses.replace(tasks.get(config), chunk_size=chunk)
        step = TrainerStep(config, task, batch_data, steps_per_epoch=100, num_items=100 * batch)
        t = timed(step, repeats)
        mem = step.compiled.memory_analysis()
        rows.append({"step": f"GradCache, chunks of {chunk}" if chunk else "full batch", "batch": batch,
                     "s/step": f"{t:.3f}", "temp MiB": f"{mem.temp_size_in_bytes / 2**20:.0f}",
                     "loss": f"{float(step()):.6f}"})
    print(f"PIR {config.model.preset} {size}px, global batch {batch} in blocks of {block}, float32, "
          f"device {jax.devices()[0].device_kind}")
    _table(rows, list(rows[0]))
    return rows


# ---------------------------------------------------------------------------------------
# BITA stage 2
# ---------------------------------------------------------------------------------------
OPT_SHAPE_FIELDS = ("vocab_size", "hidden", "layers", "heads", "ffn_dim", "max_positions", "word_embed_proj_dim",
                    "do_layer_norm_before")


def bita_config(batch: int, dtype: str, quick: bool, opt_preset: str = "opt_125m"):
    """configs/bita.py:stage=2 (ViT-L/14 21 blocks + the full IFT) with an OPT of `opt_preset`'s
    shape (model.opt_overrides), or the tiny test models with a frozen OPT for `quick`."""
    from ml_collections import ConfigDict

    from rsvl_jax.models.opt import PRESETS as OPT_PRESETS

    overrides = [f"--config.batch_size={batch}", f"--config.model.dtype={dtype}",
                 f"--config.model.frozen_dtype={dtype}", "--config.data.opt_tokenizer=data/synthetic_opt_tokenizer"]
    if quick:
        config = _config("configs/bita.py:stage=2,demo", overrides + ["--config.model.freeze_opt=True"])
        return config
    config = _config("configs/bita.py:stage=2", overrides)
    opt = OPT_PRESETS[opt_preset]
    config.unlock()
    config.model.opt_overrides = ConfigDict({k: getattr(opt, k) for k in OPT_SHAPE_FIELDS})
    config.lock()
    return config


def _bita_batch(batch: int, size: int, text_len: int, vocab: int, seed: int = 0) -> dict:
    """A stage-2 batch as caption_pipeline yields it: BOS + caption ids, right-padded (pad 1)."""
    from rsvl_jax.data.caption_pipeline import opt_targets

    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(2, text_len // 2), text_len + 1, size=batch)
    ids = rng.integers(4, vocab, size=(batch, text_len)).astype(np.int32)
    ids[:, 0] = 2  # BOS
    mask = (np.arange(text_len)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask > 0, ids, 1).astype(np.int32)
    return {"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32), "text_ids": ids,
            "text_mask": mask, "targets": opt_targets(ids, mask, 0)}


def _torch_bita_step(bcfg, batch: dict, threads: int):
    """The stage-2 step at the same shapes from HF modules (a stand-in: see bench_bita)."""
    import torch
    import transformers as tf
    from bench_generate import hf_opt_config  # tools/bench_generate.py

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    v, q, o = bcfg.vit, bcfg.qformer, bcfg.opt
    vit = tf.CLIPVisionModel(tf.CLIPVisionConfig(
        hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.layers, num_attention_heads=v.heads,
        image_size=v.image_size, patch_size=v.patch_size, hidden_act="quick_gelu"))
    qformer = tf.Blip2QFormerModel(tf.Blip2QFormerConfig(
        hidden_size=q.hidden, num_hidden_layers=q.layers, num_attention_heads=q.heads,
        intermediate_size=q.intermediate, encoder_hidden_size=v.width, cross_attention_frequency=q.cross_attention_freq,
        hidden_dropout_prob=q.hidden_dropout, attention_probs_dropout_prob=q.attention_dropout))
    opt = tf.OPTForCausalLM(hf_opt_config(o))
    ln_vision = torch.nn.LayerNorm(v.width)
    query_tokens = torch.nn.Parameter(torch.randn(1, q.num_query_tokens, q.hidden) * 0.02)
    opt_proj = torch.nn.Linear(q.hidden, o.embed_dim)
    for frozen in (vit, opt):
        frozen.requires_grad_(False)
    vit.eval()  # frozen ViT; the frozen OPT keeps its dropout on (Q13, as ours)
    qformer.train()
    opt.train()
    params = [query_tokens, *ln_vision.parameters(), *qformer.parameters(), *opt_proj.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    pixels = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy())
    ids = torch.from_numpy(batch["text_ids"].astype(np.int64))
    mask = torch.from_numpy(batch["text_mask"].astype(np.int64))
    targets = torch.from_numpy(batch["targets"].astype(np.int64))
    b, nq = ids.shape[0], q.num_query_tokens

    def step():
        image_embeds = ln_vision(vit(pixel_values=pixels).last_hidden_state)
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long)
        out = qformer(query_embeds=query_tokens.expand(b, -1, -1), encoder_hidden_states=image_embeds,
                      encoder_attention_mask=image_mask).last_hidden_state
        inputs_opt = opt_proj(out)
        embeds = torch.cat([inputs_opt, opt.get_input_embeddings()(ids)], dim=1)
        att = torch.cat([torch.ones(b, nq, dtype=torch.long), mask], dim=1)
        labels = torch.cat([torch.full((b, nq), -100, dtype=torch.long), targets], dim=1)
        loss = opt(inputs_embeds=embeds, attention_mask=att, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    n_train = sum(p.numel() for p in params)
    return step, n_train


def bench_bita(repeats: int, batch: int, dtype: str, quick: bool, text_len: int = 24, threads: int | None = None,
               torch_side: bool = True, opt_preset: str = "opt_125m"):
    """BITA stage-2 training images/s: our trainer's step vs an HF-module stand-in in PyTorch."""
    from rsvl_jax import tasks
    from rsvl_jax.tasks import bita as bita_task

    threads = threads or os.cpu_count()
    config = bita_config(batch, dtype, quick, opt_preset)
    task = tasks.get(config)
    bcfg = bita_task.model_config(config)
    text_len = min(text_len, bcfg.max_txt_len)
    batch_data = _bita_batch(batch, config.data.image_size, text_len, min(bcfg.opt.vocab_size, 50000))
    step = TrainerStep(config, task, batch_data, steps_per_epoch=1000, num_items=1000 * batch)
    t_ours = timed(step, repeats)
    peak, torch_peak = print_peaks(jnp.dtype(dtype))
    n_train = sum(x.size for x in jax.tree.leaves(step.state[0]))
    n_frozen = sum(x.size for x in jax.tree.leaves(step.frozen))
    shape = (f"ViT-L/14 {bcfg.vit.layers} blocks {bcfg.vit.image_size}px + IFT {bcfg.qformer.layers} layers "
             f"({bcfg.qformer.num_query_tokens} queries) + OPT {bcfg.opt.layers}x{bcfg.opt.hidden} frozen, "
             f"text {text_len}" if not quick else "tiny test models (--quick)")
    rows = [{"side": "ours (trainer step, jitted)", "dtype": dtype, "batch": batch, "s/step": f"{t_ours:.3f}",
             "img/s": f"{batch / t_ours:.2f}", "step GFLOP": f"{step.flops / 1e9:.1f}",
             "MFU": f"{100 * step.flops / t_ours / peak:.1f}%"}]
    if torch_side and dtype == "float32":
        try:
            torch_step, n_torch = _torch_bita_step(bcfg, batch_data, threads)
        except ImportError as e:
            print(f"torch side skipped: {e}")
        else:
            t_torch = timing.seconds(torch_step, repeats)
            rows.append({"side": "torch stand-in (HF CLIP + Blip2QFormer + OPT)", "dtype": dtype, "batch": batch,
                         "s/step": f"{t_torch:.3f}", "img/s": f"{batch / t_torch:.2f}",
                         "step GFLOP": f"{step.flops / 1e9:.1f} (ours)",
                         "MFU": f"{100 * step.flops / t_torch / torch_peak:.1f}%"})
            print(f"torch trainable parameters {n_torch:,} (ours {n_train:,})")
    print(f"BITA stage-2 training step: {shape}; trainable {n_train:,} / frozen {n_frozen:,} parameters; "
          f"{threads} threads, device {jax.devices()[0].device_kind}, jax {jax.__version__}")
    if len(rows) > 1:
        print("torch side: a STAND-IN built from HF modules at the same shapes (CLIPVisionModel, "
              "Blip2QFormerModel = self-attention token mixing, NOT BITA's Fourier mixing; OPTForCausalLM "
              "frozen; fwd+bwd+AdamW over the bridge). MFU of both uses our step's XLA FLOP count.")
    _table(rows, list(rows[0]))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["encoders", "pir", "bita", "generate", "chunks"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None, help="default: pir 8, bita 4")
    parser.add_argument("--text-len", type=int, default=24,
                        help="caption tokens of the batch (pir: BERT ids, the rsitmd bucket; bita: OPT ids incl. BOS)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--no-torch", action="store_true", help="bita: skip the PyTorch side")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the tool itself runs")
    parser.add_argument("--reference", default=None, metavar="CHECKOUT",
                        help="pir: a checkout of the original PIR code (jaychempan/PIR) to time at the same shapes")
    parser.add_argument("--opt", default="opt_125m", help="bita, generate: the OPT preset's shape (e.g. opt_2_7b)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="generate: where both sides run")
    parser.add_argument("--only", default=None, help="encoders: only the models whose name contains this (e.g. resnet)")
    args = parser.parse_args(argv)
    from rsvl_jax.models.opt import PRESETS as OPT_PRESETS

    if args.opt not in OPT_PRESETS:
        parser.error(f"--opt {args.opt}: not an OPT preset (one of {', '.join(sorted(OPT_PRESETS))})")
    if args.what == "encoders":
        bench_encoders(args.repeats, args.quick, args.only)
    elif args.what == "pir":
        bench_pir(args.repeats, args.batch or 8, args.dtype, args.quick, args.text_len, args.reference, args.threads)
    elif args.what == "chunks":
        bench_chunks(args.repeats, args.batch or 64, args.quick)
    elif args.what == "bita":
        bench_bita(args.repeats, args.batch or 4, args.dtype, args.quick, args.text_len, args.threads,
                   torch_side=not args.no_torch, opt_preset=args.opt)
    else:
        from bench_generate import bench_generate

        rows = bench_generate(batch_sizes=(4,) if args.quick else (4, 16), repeats=args.repeats, device=args.device,
                              opt_preset=args.opt, dtype=args.dtype)
        _table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
