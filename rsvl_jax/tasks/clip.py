"""CLIP-family retrieval (RemoteCLIP, GeoRSCLIP, OpenAI CLIP) under PIR's evaluation.

Zero-shot: `python -m rsvl_jax.evaluate --config configs/clip.py:... --checkpoint model.pt`
converts the released state dict on the fly (`convert/clip.py`) and ranks with the same code
(`eval.retrieval.itm_metrics`) and metric table as PIR, plus `zs_acc`: zero-shot scene
classification of the split's images from prompts (`a satellite photo of {}.`), averaged
over templates as CLIP does. Fine-tuning: the symmetric InfoNCE loss with the learnable
temperature `logit_scale` (clamped at 100), optionally with a frozen tower.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rsvl_jax.config import ConfigError, check_choice, check_paths, repo_path
from rsvl_jax.convert import from_pytorch
from rsvl_jax.eval.retrieval import itm_metrics
from rsvl_jax.models import clip as clip_lib
from rsvl_jax.parallel import all_hosts, eval_batch, fetch_replicated, main_process_first, replicated
from rsvl_jax.tasks import Task, batch_layout, merge_blocks
from rsvl_jax.tasks.datasets import RetrievalData, open_retrieval

METRIC_KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean", "zs_acc")
DATASETS = ("rsicd", "rsitmd", "synthetic", "ucm_captions", "sydney_captions", "nwpu_captions")
TEXT_CLEAN = ("clip", "pir")


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------
def model_config(config) -> clip_lib.CLIPConfig:
    """The preset with the experiment's activation, dtype, image size and vocabulary."""
    m = config.model
    preset = clip_lib.PRESETS[m.preset]
    text = preset.text
    if m.text_vocab_size:
        text = dataclasses.replace(text, vocab_size=m.text_vocab_size)
    vision = dataclasses.replace(preset.vision, image_size=config.data.image_size)
    return dataclasses.replace(preset, vision=vision, text=text, act=m.act or preset.act, dtype=m.dtype)


def trainable_filter(config):
    """Every parameter but those of a frozen tower (`model.freeze_vision` / `freeze_text`)."""
    towers = clip_lib.freeze_filters()
    frozen = [towers[t] for t, on in (("vision", config.model.freeze_vision), ("text", config.model.freeze_text))
              if on]
    return nnx.All(nnx.Param, nnx.Not(nnx.Any(*frozen))) if frozen else nnx.Param


def load_checkpoint(model: clip_lib.CLIP, path: str) -> str:
    """A released CLIP state dict (OpenAI/open_clip `.pt`, HF CLIPModel), converted strictly."""
    src, report = from_pytorch("clip", path, model.config, with_report=True)
    nnx.update(model, nnx.state(src, nnx.Param))
    return report.summary()


def make_optimizer(config, params, steps_per_epoch: int):
    """AdamW with cosine decay after a linear warm-up (open_clip's recipe); no weight decay on
    gains, biases, class token and logit_scale (parameters with fewer than 2 dimensions)."""
    total = max(1, config.epochs * steps_per_epoch)
    if config.max_steps > 0:
        total = min(total, config.max_steps)
    warmup = int(config.optim.warmup_fraction * total)
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.optim.lr, max(1, warmup), max(total, warmup + 1))
    labels = nnx.State.from_flat_path({path: "decay" if np.ndim(v.get_value()) >= 2 else "no_decay"
                                       for path, v in params.flat_state()})
    adam = lambda wd: optax.adamw(schedule, b1=config.optim.b1, b2=config.optim.b2,  # noqa: E731
                                  eps=config.optim.eps, weight_decay=wd)
    tx = optax.multi_transform({"decay": adam(config.optim.weight_decay), "no_decay": adam(0.0)}, labels)
    if config.optim.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.optim.grad_clip), tx)
    return tx, schedule


def contrastive_loss(logits, idx=None):
    """Symmetric InfoNCE on image-to-text logits (B, B): the mean of the cross-entropies of
    both directions. With `idx`, every pair of the same image is a positive (targets spread
    evenly), which equals CLIP's identity targets when no image repeats in the batch."""
    logits = logits.astype(jnp.float32)
    if idx is None:
        targets = jnp.eye(logits.shape[0], dtype=jnp.float32)
    else:
        pos = (idx[:, None] == idx[None, :]).astype(jnp.float32)
        targets = pos / pos.sum(1, keepdims=True)
    i2t = -(targets * jax.nn.log_softmax(logits, axis=1)).sum(1).mean()
    t2i = -(targets.T * jax.nn.log_softmax(logits.T, axis=1)).sum(1).mean()
    return 0.5 * (i2t + t2i)


def embed(model: clip_lib.CLIP, block):
    return model.encode_image(block["image"])[0], model.encode_text(block["input_ids"])[0]


def make_batch_loss(config):
    same_image = bool(config.loss.same_image_positives)

    def batch_loss(model: clip_lib.CLIP, reps, batch):
        img, txt = merge_blocks(reps)
        scale = model.scale()
        loss = contrastive_loss(scale * img @ txt.T, batch["idx"] if same_image else None)
        return loss, {"loss_itc": loss, "logit_scale": scale}

    return batch_loss


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------
def load_tokenizer(config):
    from rsvl_jax.data import clip_text

    if not config.data.bpe:
        raise ConfigError("set --config.data.bpe to a CLIP tokenizer: open_clip's bpe_simple_vocab_16e6.txt.gz "
                          "or an HF CLIPTokenizer folder (vocab.json + merges.txt)")
    return clip_text.load_clip_tokenizer(repo_path(config.data.bpe))


def open_data(config) -> RetrievalData:
    """The configured dataset from our TFDS builders; the tokenizer from local files."""
    d = config.data
    layout = d.split_config or ("pir" if d.name in ("rsicd", "rsitmd") else "karpathy")
    return open_retrieval(config, layout, load_tokenizer(config))


def _str(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _records(source, chunk: int = 512):
    getitems = getattr(source, "__getitems__", None)
    for start in range(0, len(source), chunk):
        keys = list(range(start, min(len(source), start + chunk)))
        yield from (getitems(keys) if getitems else (source[k] for k in keys))


def caption_text(raw, config) -> str:
    """A caption as the model reads it: as written ("clip": the tokenizer cleans it, as
    RemoteCLIP's evaluation does) or with PIR's normalisation ("pir")."""
    from rsvl_jax.data import text as text_lib

    raw = _str(raw)
    return text_lib.pre_caption(raw, config.data.max_words) if config.data.text_clean == "pir" else raw


def train_loader(config, data: RetrievalData, batch_size: int):
    from rsvl_jax.data.transforms import TrainTransform

    if "train" not in data.splits:
        raise ConfigError(f"dataset {config.data.name!r} has no train split (has {sorted(data.splits)})")
    transform = TrainTransform(size=config.data.image_size, randaug=None, hflip=config.data.augment,
                               scale=(0.5, 1.0) if config.data.augment else (1.0, 1.0),
                               ratio=(3 / 4, 4 / 3) if config.data.augment else (1.0, 1.0))
    return _train_loader_class()(
        data.splits["train"], data.tokenizer, config=config, batch_size=batch_size,
        image_size=config.data.image_size, seed=config.seed, transform=transform,
        text_bucket=tuple(config.data.text_buckets), max_words=config.data.max_words, require_label=False)


def _train_loader_class():
    """`pipeline.TrainLoader` (its epochs, host sharding and exact resume state) with CLIP's
    text side: captions as `caption_text` gives them, CLIP ids, zero padding. Built on first
    use so importing this task does not import grain."""
    from rsvl_jax.data import pipeline

    class ClipTrainLoader(pipeline.TrainLoader):
        def __init__(self, source, tokenizer, *, config, **kw):
            self.config = config
            super().__init__(source, tokenizer, pad_id=0, **kw)

        def clean_caption(self, raw):
            return caption_text(raw, self.config)

        def encode(self, captions):
            return self.tokenizer.encode_batch(list(captions), self.config.data.context_length)

    return ClipTrainLoader


# ---------------------------------------------------------------------------------------
# Evaluation: embed every image and caption, rank on the full similarity matrix
# ---------------------------------------------------------------------------------------
@partial(jax.jit, static_argnums=0)
def _image_embeddings(graphdef, state, images):
    return nnx.merge(graphdef, state).encode_image(images)[0]


@partial(jax.jit, static_argnums=0)
def _text_embeddings(graphdef, state, ids):
    return nnx.merge(graphdef, state).encode_text(ids)[0]


def embed_split_images(model, source, config) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, scene labels) of every image in dataset order; hosts share the work.
    The eval transform squashes to size x size with CLIP's mean/std: for the square images of
    these datasets that is CLIP's resize + centre crop."""
    from rsvl_jax.data import pipeline
    from rsvl_jax.data.transforms import EvalTransform

    graphdef, state = nnx.split(model)
    loader = pipeline.EvalImages(source, batch_size=config.eval_batch_size // jax.process_count(),
                                 transform=EvalTransform(size=config.data.image_size))
    embs, index, labels = [], [], []
    for batch in loader:
        embs.append(all_hosts(_image_embeddings(graphdef, state, eval_batch(batch["image"]))))
        index.append(all_hosts(batch["index"]))
        labels.append(all_hosts(batch["label"]))
    embs, index, labels = np.concatenate(embs), np.concatenate(index), np.concatenate(labels)
    keep = index >= 0
    out = np.zeros((loader.num_images, embs.shape[1]), np.float32)
    out[index[keep]] = embs[keep]
    lab = np.full(loader.num_images, -1, np.int64)
    lab[index[keep]] = labels[keep]
    return out, lab


def embed_texts(model, texts, tokenizer, config) -> np.ndarray:
    """Text embeddings in chunks, padded to a bucket length (zeros after the end-of-text token
    change nothing, so the padding is free to choose) to keep few compiled shapes."""
    from rsvl_jax.data import text as text_lib

    graphdef, state = nnx.split(model)
    chunk = config.data.eval_text_chunk
    out = []
    for start in range(0, len(texts), chunk):
        part = list(texts[start:start + chunk])
        ids = tokenizer.encode_batch(part, config.data.context_length)
        ids += [[0]] * (chunk - len(ids)) if len(texts) > chunk else []  # full chunks: one shape
        batch = text_lib.pad_batch(ids, bucket=tuple(config.data.text_buckets), pad_id=0)
        out.append(fetch_replicated(_text_embeddings(graphdef, state, replicated(batch)))[:len(part)])
    return np.concatenate(out) if out else np.zeros((0, model.config.embed_dim), np.float32)


def eval_texts(source, config):
    """(captions, img2txt, txt2img) of a split, in file order."""
    captions, img2txt, txt2img = [], [], []
    for i, rec in enumerate(_records(source)):
        img2txt.append([])
        for j, raw in enumerate(rec["captions"]):
            try:
                captions.append(caption_text(raw, config))
            except ValueError as e:
                raise ValueError(f"eval record {i} ({_str(rec['filename'])}) caption {j}: {e}") from e
            img2txt[-1].append(len(txt2img))
            txt2img.append(i)
    return captions, img2txt, np.asarray(txt2img, np.int32)


def class_prompts(class_names, templates) -> list[list[str]]:
    """Prompts per class: `parking_lot` reads as "parking lot" in each template."""
    return [[t.format(name.replace("_", " ")) for t in templates] for name in class_names]


def zero_shot_classifier(model, class_names, tokenizer, config) -> np.ndarray:
    """(num_classes, D): the normalised mean of each class's normalised prompt embeddings."""
    prompts = class_prompts(class_names, config.zero_shot.templates)
    flat = embed_texts(model, [p for ps in prompts for p in ps], tokenizer, config)
    per_class = flat.reshape(len(class_names), len(config.zero_shot.templates), -1).mean(1)
    return per_class / np.maximum(np.linalg.norm(per_class, axis=1, keepdims=True), 1e-12)


def evaluate(model, data: RetrievalData, split: str, config) -> dict:
    """PIR's retrieval table on one split, plus zero-shot scene accuracy (%) of its images."""
    if split not in data.splits:
        raise ConfigError(f"split {split!r} is not in the {config.data.name} dataset (has {sorted(data.splits)})")
    source = data.splits[split]
    captions, img2txt, txt2img = eval_texts(source, config)
    img, labels = embed_split_images(model, source, config)
    txt = embed_texts(model, captions, data.tokenizer, config)
    metrics = itm_metrics(img @ txt.T, img2txt, txt2img)
    known = labels >= 0
    if data.class_names and known.any():
        classes = zero_shot_classifier(model, data.class_names, data.tokenizer, config)
        pred = np.argmax(img[known] @ classes.T, axis=1)
        metrics["zs_acc"] = round(float(100.0 * np.mean(pred == labels[known])), 2)
    return metrics


# ---------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------
def check_config(config) -> None:
    check_choice(config, "model.preset", tuple(clip_lib.PRESETS))
    check_choice(config, "model.act", ("",) + tuple(clip_lib.ACTIVATIONS))
    check_choice(config, "model.dtype", ("float32", "bfloat16"))
    check_choice(config, "data.name", DATASETS)
    check_choice(config, "data.on_error", ("raise", "skip"))
    check_choice(config, "data.text_clean", TEXT_CLEAN)
    check_paths(config, "data.manual_dir", "data.data_dir", "data.bpe", "model.init_checkpoint")
    if not 2 <= config.data.context_length <= clip_lib.PRESETS[config.model.preset].text.context_length:
        raise ConfigError(f"data.context_length={config.data.context_length} must be in [2, the model's "
                          f"{clip_lib.PRESETS[config.model.preset].text.context_length}]")
    if not config.zero_shot.templates or any("{}" not in t for t in config.zero_shot.templates):
        raise ConfigError("zero_shot.templates must be prompts with a {} for the class name")
    if config.model.freeze_vision and config.model.freeze_text:
        raise ConfigError("model.freeze_vision and model.freeze_text are both set: only logit_scale would train")


def make(config) -> Task:
    check_config(config)
    mcfg = model_config(config)

    def make_model():
        return clip_lib.CLIP(mcfg, rngs=nnx.Rngs(params=config.seed))

    def open_checked():
        data = main_process_first(lambda: open_data(config))
        if data.tokenizer.vocab_size > mcfg.text.vocab_size:
            raise ConfigError(f"the tokenizer {config.data.bpe} has {data.tokenizer.vocab_size} ids but the model "
                              f"embeds {mcfg.text.vocab_size}; set --config.model.text_vocab_size")
        return data

    def load_pretrained(model):
        path = config.model.init_checkpoint
        return [load_checkpoint(model, repo_path(path))] if path else []

    tokenizer = []  # search queries: loaded on first use

    def text_embeddings(model, texts):
        if not tokenizer:
            tokenizer.append(load_tokenizer(config))
        return embed_texts(model, [str(t) for t in texts], tokenizer[0], config)

    def image_embeddings(model, images):
        graphdef, state = nnx.split(model)
        return np.asarray(_image_embeddings(graphdef, state, jnp.asarray(images, jnp.float32)))

    from rsvl_jax.data.transforms import EvalTransform

    splits = tuple(config.eval_splits)
    return Task(
        name="clip",
        make_model=make_model,
        trainable=trainable_filter(config),
        saved=nnx.Param,
        load_pretrained=load_pretrained,
        open_data=open_checked,
        train_loader=partial(train_loader, config),
        optimizer=lambda params, steps_per_epoch, num_items: make_optimizer(config, params, steps_per_epoch),
        embed=embed,
        batch_loss=make_batch_loss(config),
        # CLIP has no dropout or batch statistics: blocks of one example, so GradCache can
        # take any chunk size that divides the batch.
        **batch_layout(config, block=1, coupled=True),
        evaluate=lambda model, data, split, step: evaluate(model, data, split, config),
        eval_splits=splits,
        best_metrics=tuple(f"{s}_r_mean" for s in splits),
        metric_keys=METRIC_KEYS,
        load_pytorch=load_checkpoint,
        eval_transform=EvalTransform(size=config.data.image_size),
        embed_images=image_embeddings,
        embed_texts=text_embeddings,
    )
