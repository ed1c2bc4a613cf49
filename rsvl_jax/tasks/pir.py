"""PIR image-text retrieval (PIR.md): model, losses, optimiser groups, data and R@K evaluation."""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rsvl_jax import losses, optim
from rsvl_jax.config import ConfigError, check_choice, check_paths, repo_path
from rsvl_jax.convert import from_pytorch
from rsvl_jax.convert import pir as pir_convert
from rsvl_jax.eval.retrieval import itm_metrics
from rsvl_jax.models import pir as pir_lib
from rsvl_jax.parallel import all_hosts, eval_batch, fetch_replicated, main_process_first, replicated
from rsvl_jax.tasks import Task, batch_layout, merge_blocks
from rsvl_jax.tasks.datasets import RetrievalData, open_retrieval

METRIC_KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
LOSS_KINDS = ("contrastive", "triplet")
DATASETS = ("rsicd", "rsitmd", "synthetic")


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------
def model_config(config) -> pir_lib.PIRConfig:
    """The model's frozen dataclass config: a preset plus the experiment's switches."""
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
        use_triplet_loss=config.loss.kind == "triplet").with_precision(m.get("dtype", "float32"),
                                                                       bool(m.get("remat", False)))


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


def trainable_filter(mcfg: pir_lib.PIRConfig):
    """Everything but the scene prior, which the reference freezes (requires_grad=False, PIR.md
    §4.1) unless `finetune_prior`. Its BatchNorm statistics still update (Q3)."""
    if mcfg.finetune_prior:
        return nnx.Param
    return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("conv_encoder")))


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


def embed(model: pir_lib.PIR, block):
    """One block's image and text embeddings, in training mode (dropout, the prior's BN in
    batch-statistics mode over the block: per GPU in the reference, Q3)."""
    img, _ = model.encode_image(block["image"], deterministic=False, train_prior_bn=True)
    txt, _ = model.encode_text(block["input_ids"], deterministic=False)
    return img, txt


def make_batch_loss(config):
    """Contrastive (or triplet) plus the affiliation loss over the whole batch (PIR.md §3)."""
    w_affil = float(config.loss.affiliation_weight)
    triplet = config.loss.kind == "triplet"
    # The reference's affiliation centres are per GPU (Q9): one group per reference device batch.
    num_shards = max(1, config.batch_size // config.reference_device_batch)

    def batch_loss(model: pir_lib.PIR, reps, batch):
        img, txt = merge_blocks(reps)
        temp, temp2 = model.temperatures()
        metrics = {}
        if triplet:
            loss = metrics["loss_triplet"] = losses.triplet_loss(img, txt)
        else:
            loss = metrics["loss_contr"] = losses.pir_contrastive_loss(img, txt, temp, batch["idx"])
            metrics["temp"] = temp
        if w_affil > 0 and temp2 is not None:
            metrics["loss_affil"] = losses.pir_affiliation_loss(
                img, txt, batch["label"], temp2, num_shards=num_shards)
            metrics["temp2"] = temp2
            loss = loss + w_affil * metrics["loss_affil"]
        return loss, metrics

    return batch_loss


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------
def open_data(config) -> RetrievalData:
    """The configured dataset (PIR's own JSON lists or Karpathy's); the BERT vocabulary from local files."""
    from rsvl_jax.data import text as text_lib

    if not config.data.vocab:
        raise ConfigError("set --config.data.vocab to a BERT vocabulary folder (e.g. bert-base-uncased)")
    tokenizer = text_lib.load_bert_tokenizer(repo_path(config.data.vocab))
    return open_retrieval(config, "pir" if config.data.pir_format else "karpathy", tokenizer)


def train_transform(config):
    from rsvl_jax.data.transforms import RandomAugment, TrainTransform

    return TrainTransform(size=config.data.image_size, randaug=RandomAugment() if config.data.augment else None)


def train_loader(config, data: RetrievalData, batch_size: int):
    from rsvl_jax.data import pipeline

    if "train" not in data.splits:
        raise ConfigError(f"dataset {config.data.name!r} has no train split (has {sorted(data.splits)})")
    return pipeline.TrainLoader(
        data.splits["train"], data.tokenizer, batch_size=batch_size,
        image_size=config.data.image_size, seed=config.seed, transform=train_transform(config),
        text_bucket=tuple(config.data.text_buckets), max_words=config.data.max_words)


# ---------------------------------------------------------------------------------------
# Evaluation: embed every image and caption, rank on the full similarity matrix
# ---------------------------------------------------------------------------------------
@partial(jax.jit, static_argnums=0)
def _image_embeddings(graphdef, state, images):
    return nnx.merge(graphdef, state).encode_image(images)[0]


@partial(jax.jit, static_argnums=0)
def _text_embeddings(graphdef, state, ids):
    return nnx.merge(graphdef, state).encode_text(ids)[0]


def embed_images(model, source, config) -> np.ndarray:
    """Image embeddings in dataset order; every host embeds its share, all hosts get all."""
    from rsvl_jax.data import pipeline

    graphdef, state = nnx.split(model)
    loader = pipeline.EvalImages(source, batch_size=config.eval_batch_size // jax.process_count(),
                                 image_size=config.data.image_size)
    embs, index = [], []
    for batch in loader:
        embs.append(all_hosts(_image_embeddings(graphdef, state, eval_batch(batch["image"]))))
        index.append(all_hosts(batch["index"]))
    embs, index = np.concatenate(embs), np.concatenate(index)
    keep = index >= 0
    out = np.zeros((loader.num_images, embs.shape[1]), np.float32)
    out[index[keep]] = embs[keep]
    return out


def embed_texts(model, captions, tokenizer, config) -> np.ndarray:
    """Chunks of 128 captions in file order, each padded to its own longest (PIR §5, Q5)."""
    from rsvl_jax.data import text as text_lib

    graphdef, state = nnx.split(model)
    chunks = text_lib.eval_text_batches(captions, tokenizer, chunk=config.data.eval_text_chunk,
                                        max_len=config.data.max_tokens)
    return np.concatenate([fetch_replicated(_text_embeddings(graphdef, state, replicated(ids))) for ids in chunks])


def _similarities(model, data: RetrievalData, split: str, config):
    """(source, eval texts, image-text similarities (N_img, N_txt)) of one split."""
    from rsvl_jax.data import pipeline

    if split not in data.splits:
        raise ConfigError(f"split {split!r} is not in the {config.data.name} dataset (has {sorted(data.splits)})")
    source = data.splits[split]
    texts = pipeline.eval_texts(source, max_words=config.data.max_words)
    img = embed_images(model, source, config)
    txt = embed_texts(model, texts.captions, data.tokenizer, config)
    return source, texts, img @ txt.T


def retrieval(model, data: RetrievalData, split: str, config) -> dict:
    """R@1/5/10 both ways and mR on one split, with the reference's ranking rules (PIR.md §5)."""
    _, texts, sims = _similarities(model, data, split, config)
    return itm_metrics(sims, texts.img2txt, texts.txt2img)


# ---------------------------------------------------------------------------------------
# Your own images (search) and the evaluation report
# ---------------------------------------------------------------------------------------
def embed_image_batch(model, images) -> np.ndarray:
    """Embeddings (B, D) of preprocessed images (B, S, S, 3) (the eval transform's output)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_image_embeddings(graphdef, state, jnp.asarray(images, jnp.float32)))


def embed_text_list(model, texts, config, tokenizer) -> np.ndarray:
    """Embeddings (N, D) of free texts, normalised and chunked exactly as eval captions."""
    from rsvl_jax.data import text as text_lib
    from rsvl_jax.errors import UserError

    normalised = []
    for t in texts:
        try:
            normalised.append(text_lib.pre_caption(str(t), config.data.max_words))
        except ValueError as e:
            raise UserError(f"text query {t!r}: {e}") from None
    return embed_texts(model, normalised, tokenizer, config)


@partial(jax.jit, static_argnums=0)
def _image_belief(graphdef, state, images):
    _, inter = nnx.merge(graphdef, state).encode_image(images)
    return inter["belief_scores"], inter["vision_tokens"][..., 0]


def vir_heatmaps(model, images) -> list[np.ndarray] | None:
    """VIR's belief scores of each image (B, S, S, 3) drawn on the Swin grid, (g, g) per image,
    from `encode_image`'s own intermediates (`eval.report.vir_heatmap`); None for a baseline."""
    from rsvl_jax.eval import report as report_lib

    if model.config.is_baseline:
        return None
    graphdef, state = nnx.split(model)
    # Every host passes the same images; the output may span hosts (the model's batch sharding).
    scores, tokens = _image_belief(graphdef, state, replicated(np.asarray(images, np.float32)))
    n = tokens.shape[1]
    return [report_lib.vir_heatmap(row, n) for row in all_hosts(scores)]


def report(model, data: RetrievalData, split: str, step: int, out_dir: str, config) -> dict:
    """`retrieval`'s metrics of one pass, and its HTML report in `out_dir` (eval.report)."""
    from rsvl_jax.data.builders.common import decode_image
    from rsvl_jax.data.transforms import EvalTransform
    from rsvl_jax.eval import report as report_lib

    source, texts, sims = _similarities(model, data, split, config)
    metrics = itm_metrics(sims, texts.img2txt, texts.txt2img)
    load = lambda i: decode_image(source[int(i)]["image"])  # noqa: E731
    # The sampled image queries' heatmaps, computed on every host (the model may span hosts).
    sample = report_lib.sample_queries(sims.shape[0], report_lib.REPORT_SAMPLE, report_lib.IMAGE_SEED)
    transform = EvalTransform(size=config.data.image_size)
    maps = {}
    for start in range(0, len(sample), 8):
        idx = [int(i) for i in sample[start:start + 8]]
        got = vir_heatmaps(model, np.stack([transform(load(i)) for i in idx]))
        maps.update(zip(idx, got or ()))
    if jax.process_index() == 0:
        names = [str(r["filename"].decode() if isinstance(r["filename"], bytes) else r["filename"]) for r in source]
        page = report_lib.retrieval_report(
            out_dir, metrics, sims, texts.img2txt, texts.txt2img, texts.captions, load, image_names=names,
            heatmaps=maps, metric_keys=METRIC_KEYS, title=f"PIR retrieval: {config.data.name} {split} (step {step})")
        print(f"report: {page}", flush=True)
    return metrics


# ---------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------
def check_config(config) -> None:
    """The settings that take one of a few values, paths, and batch sizes, in the user's terms."""
    check_choice(config, "model.preset", tuple(pir_lib.PRESETS))
    check_choice(config, "loss.kind", LOSS_KINDS)
    check_choice(config, "model.prior_bn_mode", ("pir_train", "inference"))
    check_choice(config, "data.name", DATASETS)
    check_choice(config, "data.on_error", ("raise", "skip"))
    check_paths(config, "data.manual_dir", "data.data_dir", "data.vocab", "model.swin_weights",
                "model.bert_weights", "model.resnet_weights", "model.init_checkpoint")
    if config.loss.kind == "triplet" and config.loss.affiliation_weight > 0:
        raise ConfigError("config key 'loss.kind' is 'triplet', which needs loss.affiliation_weight=0")
    if config.batch_size % config.reference_device_batch:
        raise ConfigError(
            f"batch_size={config.batch_size} is not divisible by reference_device_batch="
            f"{config.reference_device_batch} (the per-GPU batch whose affiliation centres and "
            "BatchNorm statistics PIR computes)")


def load_pytorch(model: pir_lib.PIR, path: str) -> str:
    """A released PIR `checkpoint_best.pth`, converted on the fly (strict)."""
    src = from_pytorch("pir", path, model.config)
    nnx.update(model, nnx.state(src, nnx.Any(nnx.Param, nnx.BatchStat)))
    return f"converted {path}"


def make(config) -> Task:
    check_config(config)
    mcfg = model_config(config)

    def make_model():
        return pir_lib.PIR(mcfg, rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))

    def open_checked():
        data = main_process_first(lambda: open_data(config))
        if mcfg.bert is not None and data.tokenizer.get_vocab_size() > mcfg.bert.vocab_size:
            raise ConfigError(
                f"the vocabulary {config.data.vocab} has {data.tokenizer.get_vocab_size()} tokens but "
                f"the text encoder embeds {mcfg.bert.vocab_size}; set --config.model.text_vocab_size")
        return data

    splits = tuple(config.eval_splits)
    tokenizer = []  # loaded on first use (search queries), not when training

    def text_embeddings(model, texts):
        if not tokenizer:
            from rsvl_jax.data import text as text_lib

            if not config.data.vocab:
                raise ConfigError("set --config.data.vocab to the BERT vocabulary the model was trained with")
            tokenizer.append(text_lib.load_bert_tokenizer(repo_path(config.data.vocab)))
        return embed_text_list(model, texts, config, tokenizer[0])

    from rsvl_jax.data.transforms import EvalTransform

    return Task(
        name="pir",
        make_model=make_model,
        trainable=trainable_filter(mcfg),
        saved=nnx.Any(nnx.Param, nnx.BatchStat),
        load_pretrained=lambda model: load_backbones(model, config),
        open_data=open_checked,
        train_loader=partial(train_loader, config),
        optimizer=lambda params, steps_per_epoch, num_items: make_optimizer(config, mcfg, params, num_items),
        embed=embed,
        batch_loss=make_batch_loss(config),
        **batch_layout(config, block=config.reference_device_batch, coupled=True),
        evaluate=lambda model, data, split, step: retrieval(model, data, split, config),
        eval_splits=splits,
        best_metrics=tuple(f"{s}_r_mean" for s in splits),
        metric_keys=METRIC_KEYS,
        load_pytorch=load_pytorch,
        eval_transform=EvalTransform(size=config.data.image_size),
        embed_images=embed_image_batch,
        embed_texts=text_embeddings,
        report=lambda model, data, split, step, out_dir: report(model, data, split, step, out_dir, config),
    )
