"""Benchmarks: `python tools/bench.py encoders|pir|generate [--dtype bfloat16] [--quick]`.

encoders  forward throughput of Swin-T, BERT-base (47 tokens), ResNet-50 and BITA's 21-block
          CLIP ViT-L/14 at real size, ours (jitted) vs the `transformers` PyTorch models on the
          same (random) weights and the same thread count.
pir       PIR train-step and eval images/s for the paper configuration, with MFU: XLA's FLOP
          count of the compiled step / (step time x a measured matmul peak).
generate  5-beam captioning throughput vs HF generate (tools/bench_generate.py).

Timings exclude compilation (one warm-up call); each number is the median of the repeats.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def timed(fn, repeats: int) -> float:
    """Median wall seconds of `fn()` after one warm-up call (compilation)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(dtype=jnp.float32, n: int | None = None, repeats: int = 5) -> float:
    """Measured FLOP/s of a large jitted matmul: the denominator of our MFU."""
    n = n or (2048 if jax.devices()[0].platform == "cpu" else 8192)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    return 2 * n**3 / timed(lambda: f(a), repeats)


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


def bench_encoders(repeats: int, quick: bool):
    import torch

    from rsvl_jax.convert import from_pytorch

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    rows = []
    for name, batch, make, family, inputs in _encoder_cases(quick):
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
        t_ours = timed(lambda: fwd(state, xj), repeats)
        if x.dtype == np.int32:
            xt = torch.from_numpy(x.astype(np.int64))
            call = lambda: ref(input_ids=xt)  # noqa: E731
        else:
            xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
            call = lambda: ref(pixel_values=xt)  # noqa: E731
        with torch.inference_mode():
            call()
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                call()
                times.append(time.perf_counter() - t)
        t_ref = statistics.median(times)
        rows.append({"model": name, "batch": batch, "ours items/s": f"{batch / t_ours:.2f}",
                     "torch items/s": f"{batch / t_ref:.2f}", "ratio": f"{t_ref / t_ours:.2f}x"})
    print(f"encoder forward, float32, {threads} threads (torch.set_num_threads), jax {jax.__version__}, "
          f"torch {torch.__version__}, device {jax.devices()[0].platform}")
    _table(rows, ["model", "batch", "ours items/s", "torch items/s", "ratio"])
    return rows


# ---------------------------------------------------------------------------------------
# PIR
# ---------------------------------------------------------------------------------------
def bench_pir(repeats: int, batch: int, dtype: str, quick: bool):
    from rsvl_jax import parallel
    from rsvl_jax.config import load_config
    from rsvl_jax.train import build_model, make_optimizer, make_train_step, model_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config(f"{root}/configs/pir.py:dataset=rsitmd", [f"--config.batch_size={batch}",
                                                                    f"--config.reference_device_batch={batch}"])
    if quick:
        config.unlock()
        config.model.preset = "pir_demo"
        config.data.image_size = 64
    mcfg = model_config(config)
    if dtype != "float32":
        dt = jnp.dtype(dtype)
        mcfg = dataclasses.replace(mcfg, dtype=dt, swin=dataclasses.replace(mcfg.swin, dtype=dt),
                                   bert=dataclasses.replace(mcfg.bert, dtype=dt),
                                   resnet=dataclasses.replace(mcfg.resnet, dtype=dt))
    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    size = config.data.image_size
    rng = np.random.default_rng(0)
    batch_data = {
        "image": jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32),
        "input_ids": jnp.asarray(rng.integers(1000, 30000, size=(batch, 24)), jnp.int32),
        "idx": jnp.arange(batch, dtype=jnp.int32) // 2,
        "label": jnp.asarray(rng.integers(0, 4, size=batch), jnp.int32),
    }
    with jax.set_mesh(mesh):
        model, _ = build_model(mcfg, mesh, parallel.DEFAULT_RULES, 0)
        graphdef, params, stats, rngs = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
        tx, _ = make_optimizer(config, mcfg, params, 17175)
        opt_state = tx.init(params)
        step = jax.jit(make_train_step(graphdef, tx, config, num_shards=1), donate_argnums=(0, 1, 3))
        compiled = step.lower(params, stats, rngs, opt_state, batch_data, jnp.int32(0)).compile()
        state = [params, stats, opt_state]

        def train_once():
            p, s, o, m = compiled(state[0], state[1], rngs, state[2], batch_data, jnp.int32(0))
            state[:] = [p, s, o]
            return m["loss"]

        t_train = timed(train_once, repeats)
        encode = jax.jit(lambda p, s, x: nnx.merge(graphdef, p, s, rngs).encode_image(x)[0])
        t_eval = timed(lambda: encode(state[0], state[1], batch_data["image"]), repeats)
        flops = _flops(compiled)
    peak = matmul_peak(jnp.dtype(dtype))
    mfu = flops / t_train / peak
    row = {"config": f"PIR {config.model.preset} {size}px", "dtype": dtype, "batch": batch,
           "train s/step": f"{t_train:.3f}", "train img/s": f"{batch / t_train:.2f}",
           "eval img/s": f"{batch / t_eval:.2f}", "step GFLOP": f"{flops / 1e9:.1f}",
           "matmul peak GFLOP/s": f"{peak / 1e9:.1f}", "MFU": f"{100 * mfu:.1f}%"}
    print(f"PIR training step (fwd+bwd+AdamW, jitted), device {jax.devices()[0].device_kind}")
    _table([row], list(row))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["encoders", "pir", "generate"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the tool itself runs")
    args = parser.parse_args(argv)
    if args.what == "encoders":
        bench_encoders(args.repeats, args.quick)
    elif args.what == "pir":
        bench_pir(args.repeats, args.batch, args.dtype, args.quick)
    else:
        from bench_generate import bench_generate

        rows = bench_generate(batch_sizes=(4,) if args.quick else (4, 16), repeats=args.repeats)
        _table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
