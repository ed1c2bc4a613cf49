"""Beam-search throughput: our jitted decoder vs HF `generate`, same random OPT weights.

BITA's captioning search (5 beams, up to 21 new tokens, eos "\\n" banned for 4 tokens) from a
32-query prefix of random embeddings; by default the OPT-125m shape, float32, on CPU. Both run
in one process with the same weights and are timed in turns, ours then HF's, `repeats` times
(the median of each). torch gets `threads` intra-op threads (XLA's CPU backend uses its own
pool over all cores, which cannot be changed after JAX starts). Our compile is excluded (one
warm-up call each).

    python tools/bench_generate.py [--batch-sizes 4,16] [--threads N] [--repeats 3]
        [--device cuda] [--opt opt_2_7b] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402  (tools/timing.py)


def hf_opt_config(opt):
    """The transformers OPTConfig of one of our OPT configs (random weights of that shape)."""
    import transformers

    return transformers.OPTConfig(
        vocab_size=opt.vocab_size, hidden_size=opt.hidden, num_hidden_layers=opt.layers, ffn_dim=opt.ffn_dim,
        num_attention_heads=opt.heads, max_position_embeddings=opt.max_positions,
        word_embed_proj_dim=opt.embed_dim, do_layer_norm_before=opt.do_layer_norm_before,
        dropout=opt.dropout, attention_dropout=opt.attention_dropout)


def bench_generate(batch_sizes=(4, 16), threads=None, repeats=3, prefix_len=32, seed=0, device="cpu",
                   opt_preset="opt_125m", dtype="float32") -> list[dict]:
    """One row of timings per batch size; `device="cuda"` runs both sides on the GPU instead.

    `dtype="bfloat16"` casts both models' weights (and our compute) to bfloat16; tokens then
    need not match HF's, and `tokens_equal_hf` says how many did.
    """
    import dataclasses

    import jax
    import jax.numpy as jnp
    import torch
    import transformers
    from flax import nnx

    from rsvl_jax import decoding as dec
    from rsvl_jax.convert import from_pytorch
    from rsvl_jax.models import opt as opt_lib

    threads = threads or os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    preset = dataclasses.replace(opt_lib.PRESETS[opt_preset], dtype=jnp.dtype(dtype))
    hf = transformers.OPTForCausalLM(hf_opt_config(preset)).eval()
    jax_device = jax.devices("cpu" if device == "cpu" else "gpu")[0]
    with jax.default_device(jax_device):
        ours = from_pytorch("opt", hf.state_dict(), preset)
        if dtype != "float32":
            nnx.update(ours, jax.tree.map(lambda x: x.astype(preset.dtype), nnx.state(ours, nnx.Param)))
    hf = hf.to(device=device, dtype=getattr(torch, dtype))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    # BITA's search with 5.x length conventions, so that HF 5.x must produce the same tokens
    # (bos_placeholder=True costs exactly the same).
    cfg = dec.GenerationConfig(method="beam", num_beams=5, max_new_tokens=21, min_new_tokens=4,
                               eos_token_ids=(50118,), pad_token_id=1)
    run = dec.make_generate(ours, cfg)
    rng = np.random.default_rng(seed)
    rows = []
    for b in batch_sizes:
        prefix = (0.1 * rng.standard_normal((b, prefix_len, preset.embed_dim))).astype(np.float32)
        mask = np.ones((b, prefix_len), np.int32)
        jp, jm = jax.device_put(prefix.astype(preset.dtype), jax_device), jax.device_put(mask, jax_device)
        t0 = time.perf_counter()
        out = jax.block_until_ready(run(jp, jm))
        compile_s = time.perf_counter() - t0

        tp = torch.as_tensor(prefix, device=device).to(getattr(torch, dtype))
        tm = torch.as_tensor(mask, dtype=torch.long, device=device)

        def hf_run():
            with torch.no_grad():
                out = hf.generate(inputs_embeds=tp, attention_mask=tm, num_beams=5, max_new_tokens=21,
                                  min_new_tokens=4, eos_token_id=50118, pad_token_id=1, do_sample=False,
                                  length_penalty=1.0, early_stopping=False)
            sync()
            return out

        ref = hf_run().cpu().numpy()  # the tokens to compare
        median = timing.interleaved({"ours": lambda: jax.block_until_ready(run(jp, jm)), "hf": hf_run}, repeats)
        ours_s, hf_s = median["ours"], median["hf"]
        ref = np.pad(ref, ((0, 0), (0, 21 - ref.shape[1])), constant_values=1)
        rows.append(dict(
            batch=b, device=device, opt=opt_preset, dtype=dtype, beams=5, new_tokens=21, prefix=prefix_len,
            torch_threads=threads, cpus=os.cpu_count(),
            ours_s_per_batch=round(ours_s, 3), hf_s_per_batch=round(hf_s, 3),
            ours_captions_per_s=round(b / ours_s, 2), hf_captions_per_s=round(b / hf_s, 2),
            speedup=round(hf_s / ours_s, 2), compile_s=round(compile_s, 1),
            tokens_equal_hf=float(np.mean(np.all(np.asarray(out.tokens) == ref, axis=1))),
        ))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="4,16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--opt", default="opt_125m", help="OPT preset whose shape to decode with (e.g. opt_2_7b)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    for row in bench_generate(sizes, args.threads, args.repeats, device=args.device, opt_preset=args.opt,
                              dtype=args.dtype):
        print(row)


if __name__ == "__main__":
    main()
