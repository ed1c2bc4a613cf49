#!/bin/bash
# The GPU figures in one run, on one NVIDIA GPU, all in bfloat16 and each MFU against that
# run's own measured bf16 matmul peak:
#   - the PIR train step at the paper's per-GPU batch (128);
#   - the BITA stage-2 step with an OPT-2.7B-shaped frozen decoder, at BITA's per-GPU batch (48);
#   - 5-beam decoding with an OPT-2.7B-shaped model, ours against HF generate, same weights.
# Needs jax with CUDA and torch with CUDA in the active environment; random weights, nothing
# downloaded. Usage: tools/gpu_figures.sh [OUT_DIR] (default gpu_figures/), from the repo root.
set -uo pipefail
out=${1:-gpu_figures}
mkdir -p "$out"
python -c 'import jax, sys; d = jax.devices()[0]; sys.exit(0 if d.platform == "gpu" else f"gpu_figures: JAX sees no GPU (found {d.platform}); install jax[cuda12]")' || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
status=0
python tools/bench.py pir --batch 128 --dtype bfloat16 --repeats 5 2>&1 | tee "$out/pir.txt" || status=1
python tools/bench.py bita --batch 48 --dtype bfloat16 --opt opt_2_7b --repeats 5 --no-torch 2>&1 | tee "$out/bita.txt" || status=1
python tools/bench.py generate --device cuda --dtype bfloat16 --opt opt_2_7b --repeats 5 2>&1 | tee "$out/generate.txt" || status=1
exit $status
