"""How far bfloat16 compute moves tiny PIR and BITA models from float32, in one table.

    python tools/precision.py [--models pir,bita1,bita2] [--batch 8] [--seed 0]

Each model is built once with random weights (float32 parameters); the same weights and the
same random batch then run the trainer's own step (`train.make_train_step`, dropout on, the
same keys) with the config's compute dtype `float32` and `bfloat16`. Printed per model: the
largest absolute and relative deviation and the largest cosine distance of the embeddings
(PIR: image and text embeddings; BITA stage 1: ITC image / text features; BITA stage 2: the OPT
prefix built from the image), and the deviation of the loss and of the gradient's global norm.
Parameters, softmax, norms and losses stay float32 in both runs; only matmuls, convolutions and
the activations between them change dtype.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# name -> (config spec, overrides); the demo configs with their tiny test presets.
MODELS = {
    "pir": ("configs/pir.py:demo", {"model.preset": "pir_test", "data.image_size": 32}),
    "pir_baseline": ("configs/pir.py:demo,baseline", {"model.preset": "pir_test", "data.image_size": 32}),
    "bita1": ("configs/bita.py:stage=1,demo", {}),
    "bita2": ("configs/bita.py:stage=2,demo", {}),
}


def _config(name: str, dtype: str, batch: int, remat: bool = False):
    from rsvl_jax.config import load_config

    spec, overrides = MODELS[name]
    config = load_config(os.path.join(ROOT, spec))
    config.unlock()
    for key, value in {**overrides, "batch_size": batch, "reference_device_batch": batch,
                       "model.dtype": dtype, "model.remat": remat}.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    config.lock()
    return config


def _batch(name: str, config, model_config, seed: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    b, s = config.batch_size, config.data.image_size
    image = rng.normal(size=(b, s, s, 3)).astype(np.float32)
    if name.startswith("pir"):
        vocab = model_config.bert.vocab_size
        ids = rng.integers(1, vocab, size=(b, 12)).astype(np.int32)
        return {"image": image, "input_ids": ids, "idx": np.arange(b, dtype=np.int32) // 2,
                "label": rng.integers(0, 3, size=(b,)).astype(np.int32)}
    length = 10
    vocab = model_config.opt.vocab_size if model_config.opt is not None else model_config.qformer.vocab_size
    ids = rng.integers(3, vocab, size=(b, length)).astype(np.int32)
    out = {"image": image, "text_ids": ids, "text_mask": np.ones_like(ids)}
    if name != "bita1":
        out["targets"] = ids
    return out


def _embeddings(name: str, model, batch) -> dict:
    """The model's representations in evaluation mode, as float32 NumPy arrays."""
    import jax.numpy as jnp
    import numpy as np

    if name.startswith("pir"):
        image, inter = model.encode_image(batch["image"])
        reps = {"image": image, "text": model.encode_text(batch["input_ids"])[0]}
        if "selected_index" in inter:  # VIR's top-k tokens: a discrete choice bfloat16 can flip
            reps["selected"] = jnp.sort(inter["selected_index"], axis=-1)
    elif name == "bita1":
        reps = {"image": model.image_features(batch["image"]), "text": model.text_features(
            batch["text_ids"], batch["text_mask"])}
    else:
        reps = {"prefix": model.prefix_embeds(batch["image"])}
    out = {}
    for key, value in reps.items():
        value = value[0] if isinstance(value, tuple) else value
        out[key] = np.asarray(value, np.float32)
    return out


def run(name: str, dtype: str, batch: int = 8, seed: int = 0, state=None, remat: bool = False) -> dict:
    """One model's step in `dtype`; `state` (the float32 run's) fixes the weights. Returns the
    loss, the gradients, their global norm, the embeddings, the parameter dtypes and the state."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from rsvl_jax import tasks, train

    config = _config(name, dtype, batch, remat)
    task = tasks.get(config)
    model = task.make_model()
    if state is not None:
        nnx.update(model, state)
    state = nnx.state(model)
    graphdef, trainable, frozen, mutable, rest = train.split_model(model, task)
    # updates = gradients, so the stepped parameters minus the old ones are the gradients
    tx = optax.GradientTransformation(lambda p: optax.EmptyState(), lambda g, s, p=None: (g, s))
    step = jax.jit(train.make_train_step(graphdef, task, tx, config.seed))
    data = _batch(name, config, model.config, seed)
    new, _, _, metrics = step(trainable, frozen, mutable, rest, tx.init(trainable), data, jnp.asarray(0, jnp.int32))
    grads = jax.tree.map(lambda a, b: a - b, new, trainable)
    model = nnx.merge(graphdef, trainable, frozen, mutable, rest)
    return {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "grads": grads,
            "embeddings": _embeddings(name, model, data), "state": state,
            "param_dtypes": {str(x.dtype) for x in jax.tree.leaves(nnx.state(model, nnx.Param))}}


def deviation(name: str, batch: int = 8, seed: int = 0) -> dict:
    """float32 vs bfloat16 compute for one model: the table's row."""
    import numpy as np

    ref = run(name, "float32", batch, seed)
    low = run(name, "bfloat16", batch, seed, state=ref["state"])
    row = {"model": name, "emb_abs": 0.0, "emb_rel": 0.0, "emb_cos": 0.0, "vir_changed": None}
    sel = ref["embeddings"].pop("selected", None)
    if sel is not None:  # share of images whose VIR kept another token set
        row["vir_changed"] = float(np.mean(np.any(sel != low["embeddings"].pop("selected"), axis=-1)))
    for key, a in ref["embeddings"].items():
        b = low["embeddings"][key]
        a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        cos = np.sum(a2 * b2, -1) / (np.linalg.norm(a2, axis=-1) * np.linalg.norm(b2, axis=-1))
        row["emb_abs"] = max(row["emb_abs"], float(np.max(np.abs(a - b))))
        row["emb_rel"] = max(row["emb_rel"], float(np.max(np.linalg.norm(a2 - b2, axis=-1) / np.linalg.norm(a2, axis=-1))))
        row["emb_cos"] = max(row["emb_cos"], float(np.max(1.0 - cos)))
    for key in ("loss", "grad_norm"):
        x, y = float(ref[key]), float(low[key])
        row[key] = x
        row[f"{key}_abs"] = abs(x - y)
        row[f"{key}_rel"] = abs(x - y) / abs(x)
    row["loss_dtype"] = str(np.asarray(low["loss"]).dtype)
    row["param_dtypes"] = sorted(low["param_dtypes"])
    return row


def format_table(rows: list[dict]) -> str:
    head = ["model", "emb max abs", "emb max rel", "emb max cos dist", "loss (fp32)", "loss abs", "loss rel",
            "grad norm (fp32)", "grad norm abs", "grad norm rel", "VIR top-k changed"]
    fmt = lambda v: f"{v:.2e}"
    body = [[r["model"], fmt(r["emb_abs"]), fmt(r["emb_rel"]), fmt(r["emb_cos"]), f"{r['loss']:.4f}",
             fmt(r["loss_abs"]), fmt(r["loss_rel"]), f"{r['grad_norm']:.4f}", fmt(r["grad_norm_abs"]),
             fmt(r["grad_norm_rel"]), "-" if r["vir_changed"] is None else f"{r['vir_changed']:.0%} of images"]
            for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in body])


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python tools/precision.py", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="pir,pir_baseline,bita1,bita2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = [deviation(name, args.batch, args.seed) for name in args.models.split(",")]
    print("float32 vs bfloat16 compute (float32 parameters, same weights, batch and dropout keys):")
    print(format_table(rows), flush=True)
    return rows


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
