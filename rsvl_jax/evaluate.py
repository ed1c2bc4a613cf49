"""Evaluate PIR retrieval: `python -m rsvl_jax.evaluate --config configs/pir.py:... --checkpoint PATH`.

PATH is a training run's `workdir` (its best-by-val checkpoint, or `--step N`), a parameter
checkpoint written by `python -m rsvl_jax.convert`, or a released PyTorch `checkpoint_best.pth`
converted on the fly. Prints `txt_r1 txt_r5 txt_r10 img_r1 img_r5 img_r10 r_mean` computed with
the reference's ranking rules (PIR.md §5).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rsvl_jax.eval.retrieval import itm_metrics

METRIC_KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------
# Data shared by train and evaluate
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class RetrievalData:
    tokenizer: object
    splits: dict  # split name -> random-access source
    class_names: list


def _local_path(path: str) -> str:
    """Paths in configs may be relative to the working directory or to the repository."""
    if path and not os.path.exists(path) and (REPO_ROOT / path).exists():
        return str(REPO_ROOT / path)
    return path


def open_data(config) -> RetrievalData:
    """Builds (once) and opens the configured dataset; loads the tokenizer from local files."""
    from rsvl_jax.data import builders  # TFDS only where data is read (models import without it)

    d = config.data
    data_dir = d.data_dir or os.path.join(os.path.expanduser("~"), ".cache", "rsvl_jax", "datasets")
    if d.name == "synthetic":
        n_eval = d.synthetic_eval_images
        builder = builders.build("synthetic", data_dir, config=builders.synthetic_config(
            d.synthetic_train_images, n_eval, n_eval, image_size=d.image_size, seed=config.seed))
    else:
        if not d.manual_dir:
            raise ValueError(f"set --config.data.manual_dir to your {d.name} folder "
                             "(annotation JSON and images; see rsvl_jax/data/builders)")
        builder = builders.build(d.name, data_dir, config="pir" if d.pir_format else "karpathy",
                                 manual_dir=d.manual_dir)
    if not d.vocab:
        raise ValueError("set --config.data.vocab to a BERT vocabulary folder (e.g. bert-base-uncased)")
    from rsvl_jax.data import text as text_lib

    tokenizer = text_lib.load_bert_tokenizer(_local_path(d.vocab))
    splits = {s: builders.open_split(builder, s) for s in builder.info.splits}
    return RetrievalData(tokenizer, splits, builders.class_names(builder))


def train_transform(config):
    from rsvl_jax.data.transforms import RandomAugment, TrainTransform

    return TrainTransform(size=config.data.image_size, randaug=RandomAugment() if config.data.augment else None)


def format_metrics(metrics: dict) -> str:
    """`split: R@1/5/10 both ways, mR` on one line (the per-direction means are in the logs)."""
    return "  ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k.split("_", 1)[-1] in METRIC_KEYS)


# ---------------------------------------------------------------------------------------
# Embedding and ranking
# ---------------------------------------------------------------------------------------
class Encoders:
    """Jitted image/text encoders over split model state (no second code path: the same
    `encode_image` / `encode_text` the training step differentiates)."""

    def __init__(self, graphdef, rng_state):
        self.graphdef, self.rng_state = graphdef, rng_state

        def image(params, stats, images):
            return nnx.merge(graphdef, params, stats, rng_state).encode_image(images)[0]

        def text(params, stats, ids):
            return nnx.merge(graphdef, params, stats, rng_state).encode_text(ids)[0]

        self.image, self.text = jax.jit(image), jax.jit(text)

    def embed_images(self, params, stats, source, config) -> np.ndarray:
        from rsvl_jax.data import pipeline

        loader = pipeline.EvalImages(source, batch_size=config.eval_batch_size // jax.process_count(),
                                     image_size=config.data.image_size)
        embs, index = [], []
        for batch in loader:
            embs.append(np.asarray(_all_hosts(self.image(params, stats, jnp.asarray(batch["image"])))))
            index.append(_all_hosts(batch["index"]))
        embs, index = np.concatenate(embs), np.concatenate(index)
        keep = index >= 0
        out = np.zeros((loader.num_images, embs.shape[1]), np.float32)
        out[index[keep]] = embs[keep]
        return out

    def embed_texts(self, params, stats, captions, tokenizer, config) -> np.ndarray:
        """Chunks of 128 captions in file order, each padded to its own longest (PIR §5, Q5)."""
        from rsvl_jax.data import text as text_lib

        chunks = text_lib.eval_text_batches(captions, tokenizer, chunk=config.data.eval_text_chunk,
                                            max_len=config.data.max_tokens)
        return np.concatenate([np.asarray(self.text(params, stats, jnp.asarray(ids))) for ids in chunks])

    def retrieval(self, params, stats, data: RetrievalData, split: str, config) -> dict:
        from rsvl_jax.data import pipeline

        source = data.splits[split]
        texts = pipeline.eval_texts(source, max_words=config.data.max_words)
        img = self.embed_images(params, stats, source, config)
        txt = self.embed_texts(params, stats, texts.captions, data.tokenizer, config)
        sims = img @ txt.T
        return itm_metrics(sims, texts.img2txt, texts.txt2img)


def _all_hosts(x):
    """Concatenates every host's rows (in host order) so each host ranks the full set."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
def load_for_eval(config, checkpoint_path: str, step: int | None = None):
    """(graphdef, params, stats, rng_state) from a run dir, a converted checkpoint or a .pth."""
    from rsvl_jax import checkpoint, parallel
    from rsvl_jax.convert import from_pytorch
    from rsvl_jax.train import build_model, model_config

    mcfg = model_config(config)
    mesh = jax.sharding.get_abstract_mesh()
    rules = tuple(tuple(r) for r in config.sharding_rules)
    path = pathlib.Path(checkpoint_path)
    if path.suffix in (".pth", ".pt", ".bin", ".safetensors"):
        model = from_pytorch("pir", str(path), mcfg)
    else:
        model, _ = build_model(mcfg, parallel.make_mesh(config.mesh) if mesh.empty else mesh, rules, config.seed)
        target = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
        run_ckpts = path / "checkpoints"
        if run_ckpts.is_dir():
            mgr = checkpoint.CheckpointManager(run_ckpts, best_metrics=tuple(f"{s}_r_mean" for s in config.eval_splits))
            if step is None:
                step = mgr.best_step(f"{config.eval_splits[0]}_r_mean") or mgr.latest_step()
            restored, _, _, step = mgr.restore(step, target, None)
            mgr.close()
            print(f"restored step {step} from {run_ckpts}", flush=True)
        else:
            restored = checkpoint.restore_params(path, target)
        nnx.update(model, restored)
    graphdef, params, stats, rng_state = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    return graphdef, params, stats, rng_state


def main(argv=None) -> int:
    from rsvl_jax import parallel
    from rsvl_jax.config import parse_cli

    parser = argparse.ArgumentParser(prog="python -m rsvl_jax.evaluate")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--split", default="test")
    config, rest = parse_cli(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)
    mesh = parallel.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        data = open_data(config)
        if args.split not in data.splits:
            raise SystemExit(f"split {args.split!r} not in the dataset (has {sorted(data.splits)})")
        graphdef, params, stats, rng_state = load_for_eval(config, args.checkpoint, args.step)
        metrics = Encoders(graphdef, rng_state).retrieval(params, stats, data, args.split, config)
    print(" ".join(f"{k:>8}" for k in METRIC_KEYS))
    print(" ".join(f"{metrics[k]:8.2f}" for k in METRIC_KEYS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
