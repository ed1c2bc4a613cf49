"""BITA captioning (BITA.md): stage 1 ITC, stage 2 prefix LM, caption fine-tuning, beam-search evaluation.

The frozen CLIP ViT (and OPT) are neither differentiated nor saved: checkpoints hold the trainable
bridge and its optimiser state, and the frozen weights are re-read from the user's files on every
start (`load_frozen`). Each stage starts from the previous one (`load_pretrained`, §9).
"""
from __future__ import annotations

import collections
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rsvl_jax import checkpoint, decoding, optim
from rsvl_jax.config import ConfigError, check_choice, check_paths, repo_path
from rsvl_jax.convert import bita as bita_convert
from rsvl_jax.convert import from_pytorch
from rsvl_jax.convert import opt as opt_convert
from rsvl_jax.eval import captioning
from rsvl_jax.models import bita as bita_lib
from rsvl_jax.parallel import all_hosts, eval_batch, main_process_first, replicated
from rsvl_jax.tasks import Task, batch_layout, merge_blocks
from rsvl_jax.tasks.datasets import data_dir

STAGES = {"1": 1, "2": 2, "caption": 3}
METRIC_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE", "agg_metrics",
               "baseline_CIDEr")
FIXED_PROMPT = "a photo of "  # Q7 fixed: a trailing space, prompt and caption tokenised separately


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------
def model_config(config) -> bita_lib.BITAConfig:
    """A preset plus the experiment's overrides and quirk switches (configs/bita.py)."""
    m, rep = config.model, dataclasses.replace
    cfg = bita_lib.PRESETS[m.preset]
    vit = rep(cfg.vit, **dict(m.vit_overrides))
    qformer = rep(cfg.qformer, num_query_tokens=m.num_query_tokens, remat=m.remat,
                  fourier_mask_padding=m.fourier_mask_padding, **dict(m.qformer_overrides))
    opt = cfg.opt
    if opt is not None:
        if m.opt_dir and os.path.isfile(os.path.join(m.opt_dir, "config.json")):
            opt = opt_convert.read_hf_config(m.opt_dir)  # any OPT size the user has
        opt = rep(opt, **dict(m.opt_overrides))
        if not m.opt_dropout_in_training:  # Q13 fix: the frozen OPT without dropout
            opt = rep(opt, dropout=0.0)
    cfg = rep(cfg, vit=vit, qformer=rep(qformer, encoder_width=vit.width), opt=opt,
              max_txt_len=m.max_txt_len, prompt=FIXED_PROMPT if m.fixed_prompt and m.prompt else m.prompt,
              temp_clamp=(0.001, 0.5) if m.temp_clamp else None, label_smoothing=m.label_smoothing,
              itc_stop_gradient_other=m.itc_stop_gradient_other, freeze_opt=m.freeze_opt)
    return cfg.with_dtype(jnp.dtype(m.dtype)) if m.dtype != "float32" else cfg


def trainable_filter(bcfg: bita_lib.BITAConfig):
    """The bridge (and the OPT where it is not frozen, as in the demo); never the frozen ViT."""
    frozen = {"visual_encoder"} | ({"opt_model"} if bcfg.freeze_opt else set())
    return nnx.All(nnx.Param, lambda path, _: str(path[0]) not in frozen)


def load_frozen(model, config, bcfg) -> list[str]:
    """The frozen ViT (and OPT) from the user's files, on every start (they are not saved)."""
    m, lines = config.model, []
    if m.vit_weights:
        src, report = from_pytorch("clip_vit", repo_path(m.vit_weights), bcfg.vit, with_report=True)
        nnx.update(model.visual_encoder, nnx.state(src, nnx.Param))
        lines.append(f"frozen ViT <- {report.summary()}")
    else:
        lines.append("note: no --config.model.vit_weights; the frozen ViT keeps its random initialisation")
    if bcfg.opt is not None and bcfg.freeze_opt:
        if not m.opt_dir:
            lines.append("note: no --config.model.opt_dir; the frozen OPT keeps its random initialisation")
        else:
            src, report = from_pytorch("opt", repo_path(m.opt_dir), bcfg.opt, with_report=True)
            nnx.update(model.opt_model, nnx.state(src, nnx.Param))
            lines.append(f"frozen OPT <- {report.summary()}")
    if m.frozen_dtype != "float32":  # §4.4: frozen weights stored in bfloat16 on accelerators
        dtype = jnp.dtype(m.frozen_dtype)
        frozen = nnx.state(model, nnx.All(nnx.Param, nnx.Not(trainable_filter(bcfg))))
        nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), frozen))
    return lines


def run_config(run_dir: str):
    """The experiment config a run saved at its start (`config.json`, written by train.py)."""
    import json

    from ml_collections import ConfigDict

    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"model.init_checkpoint={run_dir}: no config.json in the run directory")
    with open(path) as f:
        return ConfigDict(json.load(f))


def _restore_run(run_dir: str, target):
    """The last step of a previous stage's run (Q11: a stage's output is its last epoch)."""
    mgr = checkpoint.CheckpointManager(os.path.join(run_dir, "checkpoints"), best_metrics=())
    try:
        step = mgr.latest_step()
        if step is None:
            raise ConfigError(f"model.init_checkpoint={run_dir}: the run has no checkpoint yet")
        saved, _, _, step = mgr.restore(step, target, None)
    finally:
        mgr.close()
    return saved, step


def load_pretrained(model, config, bcfg, stage: int) -> list[str]:
    """What a fresh run starts from (§9): BERT-base for stage 1 (Q4), the previous stage for
    stages 2 and 3 (required, Q5/Q20)."""
    m = config.model
    if stage == 1:
        if m.blip2_checkpoint:  # a labelled deviation (Q4): BITA itself starts from BERT-base
            return [bita_convert.warm_start_from_blip2(model.bridge, repo_path(m.blip2_checkpoint))]
        if not m.bert_dir:
            return ["note: no --config.model.bert_dir; the IFT starts from random weights "
                    "(the reference starts from bert-base-uncased, §2.8)"]
        return [bita_convert.init_stage1_from_bert(model.bridge, repo_path(m.bert_dir))]
    previous = "1" if stage == 2 else "2"
    path = m.init_checkpoint
    if not path:
        raise ConfigError(f"stage {'2' if stage == 2 else 'caption'} starts from stage {previous}: set "
                          f"--config.model.init_checkpoint to a stage-{previous} run directory or a released .pth")
    path = repo_path(path)
    is_run = os.path.isdir(os.path.join(path, "checkpoints"))
    if not is_run and not os.path.isfile(path):
        raise ConfigError(f"model.init_checkpoint={path}: no such run directory (with checkpoints/) or .pth file")
    if stage == 2 and is_run:  # our stage-1 run: its bridge, then the query path and ln_vision
        s1 = model_config(run_config(path))  # the stage-1 model as that run built it
        # jax.eval_shape: nnx.eval_shape would turn logical axis names into mesh shardings
        _, abstract, _ = jax.eval_shape(lambda: nnx.split(bita_lib.Stage1Bridge(s1, rngs=nnx.Rngs(0)), nnx.Param, ...))
        saved, step = _restore_run(path, nnx.State({"bridge": abstract}))
        flat = {p: v for p, v in saved["bridge"].flat_state()}
        target = nnx.state(model.bridge, nnx.Param)
        wanted = [p for p, _ in target.flat_state() if p[0] != "opt_proj"]
        missing = [".".join(map(str, p)) for p in wanted if p not in flat]
        if missing:
            raise ConfigError(f"{path} is not a stage-1 run of this model: it lacks {missing[:5]}")
        nnx.update(model.bridge, nnx.State.from_flat_path({p: flat[p] for p in wanted}))
        return [f"bridge <- stage-1 run {path} step {step} (ln_vision + IFT query path; opt_proj fresh)"]
    if stage == 2:
        report = bita_convert.init_opt_bridge_from_stage1(model.bridge, path)
        return [f"bridge <- {report.summary()}"]
    if is_run:  # caption from our stage-2 run: the same trainable tree
        saved, step = _restore_run(path, nnx.state(model, trainable_filter(bcfg)))
        nnx.update(model, saved)
        return [f"bridge <- stage-2 run {path} step {step}"]
    return [load_pytorch(model, path)]


def load_pytorch(model, path: str) -> str:
    """A released stage-2 / caption `.pth` (the bridge; ViT and OPT come from the configured
    files). The reference also saves OPT's tied `lm_head`: it must equal our OPT's embedding."""
    from rsvl_jax.convert.core import read_state_dict

    tensors = read_state_dict(path)
    head = tensors.pop(bita_convert.TIED_LM_HEAD, None)
    if head is not None and model.config.freeze_opt:
        emb = np.asarray(model.opt_model.embed_tokens.embedding[...], np.float32)
        bita_convert.check_tied_lm_head(head, {"model.decoder.embed_tokens.weight": emb}, path, "the configured OPT")
    bridge = from_pytorch("bita_opt", tensors, model.config)
    nnx.update(model.bridge, nnx.state(bridge, nnx.Param))
    return f"bridge <- {path}"


def export_pytorch(model, path: str) -> str:
    """The bridge in the reference's `.pth` layout (§10), with OPT's tied head as it saves it."""
    if model.config.opt is not None and not model.config.freeze_opt:
        raise ConfigError("this run trained its OPT (model.freeze_opt=False, the demo); the reference layout "
                          "holds the bridge only, so the export would lose it")
    state = bita_convert.save_bita_pth(model, path, config={"exported_by": "rsvl_jax"})
    return f"wrote {path}: {len(state)} tensors in the reference layout"


# ---------------------------------------------------------------------------------------
# Optimiser (§8) and loss (§3, §4.2)
# ---------------------------------------------------------------------------------------
def _zero_pad_row() -> optax.GradientTransformation:
    """torch's `nn.Embedding(padding_idx=0)`: the [PAD] row of the IFT gets no gradient (Q14)."""
    return optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda grads, state, params=None: (bita_lib.zero_pad_row_grad(grads), state))


def make_optimizer(config, bcfg, stage: int, params, steps_per_epoch: int):
    names = bita_convert.reference_names(bcfg)
    if bcfg.opt is not None and not bcfg.freeze_opt:  # the demo's trained OPT: the same rule on OPT's own names
        entries, _ = opt_convert.table(bcfg.opt)
        names.update({f"opt_model.{e.target}": f"opt_model.{e.sources[0]}" for e in entries})
    o = config.optim
    schedule = optim.linear_warmup_cosine_lr(o.init_lr, o.min_lr, o.warmup_lr, o.warmup_steps,
                                             config.epochs, steps_per_epoch)
    tx = optim.bita_optimizer(optim.bita_labels(params, names), schedule, weight_decay=o.weight_decay,
                              b1=o.b1, b2=o.b2, eps=o.eps)
    if stage == 1 and config.model.zero_pad_row_grad:
        tx = optax.chain(_zero_pad_row(), tx)
    if o.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
    return tx, schedule


def make_embed(stage: int, prompt_length: int):
    """One block in training mode: stage 1, its query and text features; the LM stages, its
    token-mean loss. The batch loss of the LM stages is the mean over blocks, as DDP averages
    the reference GPUs' own token means (mirrored; the one-block batch of a parity test is
    unchanged), which also makes accumulation over micro-batches of whole blocks exact."""
    def embed(model, block):
        if stage == 1:
            return (model.image_features(block["image"], deterministic=False),
                    model.text_features(block["text_ids"], block["text_mask"], deterministic=False))
        # deterministic=False also runs the frozen OPT's dropout (Q13, mirrored)
        loss, _ = model.lm_loss(block["image"], block["text_ids"], block["text_mask"],
                                prompt_length=prompt_length, deterministic=False)
        return loss

    return embed


def make_batch_loss(stage: int):
    def batch_loss(model, reps, batch):
        if stage == 1:
            loss, aux = model.bridge.itc(*merge_blocks(reps))
            return loss, {"temp": aux["temp"]}
        return jnp.mean(reps), {}

    return batch_loss


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class CaptionData:
    train: dict  # builder name -> train source (several for stages 1 and 2)
    splits: dict  # eval split -> source (of the one fine-tuning dataset)
    most_common_caption: str | None  # the trivial baseline (synthetic data)


def open_data(config, stage: int) -> CaptionData:
    from rsvl_jax.data import builders

    d = config.data
    names = tuple(d.datasets)
    if d.name != "synthetic" and not d.manual_dir:
        raise ConfigError(f"set --config.data.manual_dir to your {d.name} folder (annotations and images"
                          f"{'; one sub-folder per dataset: ' + ', '.join(names) if len(names) > 1 else ''})")
    train, splits = {}, {}
    for name in names:
        manual = None if name == "synthetic" else (
            os.path.join(d.manual_dir, name) if len(names) > 1 else d.manual_dir)
        builder = builders.build(name, data_dir(config),
                                 config=d.synthetic_config if name == "synthetic" else d.annotations,
                                 manual_dir=manual, on_error=d.on_error)
        train[name] = builders.open_split(builder, "train")
        if name == names[0] and stage == 3:
            splits = {s: builders.open_split(builder, s) for s in builder.info.splits if s != "train"}
    common = None
    if d.name == "synthetic":
        counts = collections.Counter(str(c.decode() if isinstance(c, bytes) else c)
                                     for rec in train[names[0]] for c in rec["captions"])
        common = counts.most_common(1)[0][0]
    return CaptionData(train, splits, common)


def load_tokenizer(config, stage: int):
    from rsvl_jax.data import bita_text

    d, m = config.data, config.model
    if stage == 1:
        path = d.bert_tokenizer or m.bert_dir
        if not path:
            raise ConfigError("stage 1 needs the BERT vocabulary: set --config.model.bert_dir "
                              "(or --config.data.bert_tokenizer)")
        return bita_text.load_bita_bert_tokenizer(repo_path(path))
    path = d.opt_tokenizer or m.opt_dir
    if not path:
        raise ConfigError("stages 2 and caption need the OPT tokenizer: set --config.model.opt_dir "
                          "(or --config.data.opt_tokenizer)")
    return bita_text.load_opt_tokenizer(repo_path(path))


def train_loader(config, bcfg, stage: int, tokenizer, data: CaptionData, batch_size: int):
    from rsvl_jax.data import caption_pipeline, transforms

    fixed = config.model.fixed_prompt and bool(bcfg.prompt)
    eval_transform = transforms.bita_image_eval(config.data.image_size)
    return caption_pipeline.CaptionTrainLoader(
        data.train, tokenizer, batch_size=batch_size, stage=stage, image_size=config.data.image_size,
        seed=config.seed, prompt=bcfg.prompt, prompt_fix=fixed, max_words=config.data.max_words,
        max_len=bcfg.max_txt_len,
        transform=None if config.data.augment else (lambda image, rng: eval_transform(image)))


# ---------------------------------------------------------------------------------------
# Evaluation: beam search with BITA's rules (§5), the official metrics (§7)
# ---------------------------------------------------------------------------------------
def generation_config(config, bcfg, tokenizer) -> decoding.GenerationConfig:
    from rsvl_jax.data import bita_text

    g = config.generate
    gen = decoding.GenerationConfig.bita(
        eos_token_id=bita_text.opt_eos_id(tokenizer), pad_token_id=bcfg.opt.pad_token_id,
        bos_token_id=bcfg.opt.bos_token_id, num_beams=g.num_beams, max_length=g.max_new_tokens + 1,
        min_length=g.min_length)
    return dataclasses.replace(gen, length_penalty=g.length_penalty)


def caption_split(model, source, tokenizer, config, gen) -> list[dict]:
    """One caption per image of `source`: rows {image_id, file_name, caption} in file order.
    Every host captions its share; all hosts get every row."""
    from rsvl_jax.data import bita_text, caption_pipeline

    loader = caption_pipeline.CaptionEvalImages(
        source, batch_size=config.eval_batch_size // jax.process_count(), image_size=config.data.image_size,
        train_transform=config.data.eval_train_transform, seed=config.seed)
    prompt_ids, _ = bita_text.encode_opt(tokenizer, [model.config.prompt], max_len=model.config.max_txt_len)
    rows, seen = [], set()
    for batch in loader:
        out = model.generate_ids(eval_batch(batch["image"]), replicated(prompt_ids[0]), config=gen)
        tokens, lengths = all_hosts(out.tokens), all_hosts(out.lengths)
        index = all_hosts(batch["index"])
        for i, caption in zip(index, bita_text.decode_captions(tokenizer, tokens, lengths)):
            if i < 0 or i in seen:  # padding
                continue
            seen.add(int(i))
            rec = source[int(i)]
            name = rec["filename"]
            rows.append({"image_id": int(rec["image_id"]), "caption": caption,
                         "file_name": name.decode() if isinstance(name, bytes) else str(name)})
    return rows


def evaluate(model, data: CaptionData, split: str, step: int, *, config, tokenizer, gen) -> dict:
    return _evaluate(model, data, split, step, config=config, tokenizer=tokenizer, gen=gen)[0]


def _evaluate(model, data: CaptionData, split: str, step: int, *, config, tokenizer, gen):
    """(metrics, caption rows, CaptionScores, references) of one split; writes the captions."""
    from rsvl_jax.data import caption_pipeline

    if split not in data.splits:
        raise ConfigError(f"split {split!r} is not in the {config.data.datasets[0]} dataset "
                          f"(has {sorted(data.splits)})")
    source = data.splits[split]
    rows = caption_split(model, source, tokenizer, config, gen)
    gts = caption_pipeline.ground_truth(source)
    scores = captioning.caption_scores(gts, {r["image_id"]: r["caption"] for r in rows})
    metrics = dict(scores.corpus, agg_metrics=captioning.agg_metrics(scores.corpus))
    if data.most_common_caption is not None:
        base = captioning.caption_scores(gts, {k: data.most_common_caption for k in gts}, meteor=False, spice=False)
        metrics["baseline_CIDEr"] = base.corpus["CIDEr"]
    if jax.process_index() == 0:
        out = os.path.join(os.path.abspath(config.workdir), "captions", f"{split}_step{step}.json")
        captioning.write_captions(out, rows, scores)
        print(f"{split}: {len(rows)} captions in {out}", flush=True)
        for r in rows[:3]:
            print(f"  {r['file_name']}: {r['caption']!r}  (reference: {gts[r['image_id']][0]!r})", flush=True)
        if data.most_common_caption is not None:
            print(f"  baseline: always {data.most_common_caption!r}: CIDEr {metrics['baseline_CIDEr']:.3f} "
                  f"vs ours {metrics['CIDEr']:.3f}", flush=True)
    return metrics, rows, scores, gts


def report(model, data: CaptionData, split: str, step: int, out_dir: str, *, config, tokenizer, gen) -> dict:
    """`evaluate`'s metrics of one pass, and its HTML report in `out_dir` (eval.report): every
    image with its caption, references and CIDEr, worst first."""
    from rsvl_jax.data.builders.common import decode_image
    from rsvl_jax.eval import report as report_lib

    metrics, rows, scores, gts = _evaluate(model, data, split, step, config=config, tokenizer=tokenizer, gen=gen)
    if jax.process_index() == 0:
        source = data.splits[split]
        where = {int(rec["image_id"]): i for i, rec in enumerate(source)}
        page = report_lib.caption_report(
            out_dir, metrics, rows, gts, scores.per_image,
            lambda row: decode_image(source[where[int(row["image_id"])]]["image"]),
            metric_keys=[k for k in METRIC_KEYS if k in metrics], notes=scores.notes,
            title=f"BITA captions: {config.data.name} {split} (step {step})")
        print(f"report: {page}", flush=True)
    return metrics


def caption_images(model, images, alternatives: int, *, tokenizer, gen) -> list[list[tuple[str, float]]]:
    """Captions of preprocessed images (B, S, S, 3) by evaluation's beam search: per image
    [(caption, sequence score)], the one evaluation gives first, then up to `alternatives`
    other finished beams (best first; HF's `num_return_sequences`)."""
    from rsvl_jax.data import bita_text

    prompt_ids, _ = bita_text.encode_opt(tokenizer, [model.config.prompt], max_len=model.config.max_txt_len)
    out = model.generate_ids(jnp.asarray(images, jnp.float32), prompt_ids[0], config=gen)
    best = bita_text.decode_captions(tokenizer, np.asarray(out.tokens), np.asarray(out.lengths))
    result = [[(c, float(sc))] for c, sc in zip(best, np.asarray(out.scores))]
    if alternatives > 0 and out.beam_tokens is not None:
        tokens, beam_scores, lengths = (np.asarray(x) for x in (out.beam_tokens, out.beam_scores, out.beam_lengths))
        for i, row in enumerate(result):
            for j in range(1, min(tokens.shape[1], alternatives + 1)):
                if np.isfinite(beam_scores[i, j]) and beam_scores[i, j] > decoding.NEG / 2:  # a kept hypothesis
                    text = bita_text.decode_captions(tokenizer, tokens[i, j:j + 1], lengths[i, j:j + 1])[0]
                    row.append((text, float(beam_scores[i, j])))
    return result


# ---------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------
def check_config(config) -> None:
    check_choice(config, "stage", tuple(STAGES))
    check_choice(config, "model.preset", tuple(bita_lib.PRESETS))
    check_choice(config, "data.on_error", ("raise", "skip"))
    check_choice(config, "data.annotations", ("karpathy", "bita"))
    for key in ("model.dtype", "model.frozen_dtype"):
        check_choice(config, key, ("float32", "bfloat16", "float16"))
    check_paths(config, "data.manual_dir", "data.data_dir", "data.bert_tokenizer", "data.opt_tokenizer",
                "model.vit_weights", "model.opt_dir", "model.bert_dir", "model.init_checkpoint",
                "model.blip2_checkpoint")
    preset = bita_lib.PRESETS[config.model.preset]
    if (config.stage == "1") != (preset.opt is None):
        raise ConfigError(f"config key 'model.preset' is {config.model.preset!r}, which is not a "
                          f"{'stage-1' if config.stage == '1' else 'BITA-OPT'} preset")


def make(config) -> Task:
    check_config(config)
    stage = STAGES[config.stage]
    bcfg = model_config(config)
    tokenizer = load_tokenizer(config, stage)
    vocab = tokenizer.get_vocab_size() if stage == 1 else len(tokenizer)
    limit = bcfg.qformer.vocab_size if stage == 1 else bcfg.opt.vocab_size
    if vocab > limit:
        raise ConfigError(f"the tokenizer has {vocab} tokens but the model embeds {limit}; "
                          f"set --config.model.{'qformer' if stage == 1 else 'opt'}_overrides")
    prompt_length = 0
    if stage > 1:
        from rsvl_jax.data import bita_text

        prompt_length = bita_text.opt_prompt_length(tokenizer, bcfg.prompt)
    model_cls = bita_lib.BITAStage1 if stage == 1 else bita_lib.BITAOPT
    trainable = trainable_filter(bcfg)
    evaluating = stage == 3
    gen = generation_config(config, bcfg, tokenizer) if stage > 1 else None
    from rsvl_jax.data import transforms
    return Task(
        name="bita",
        make_model=lambda: model_cls(bcfg, rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1)),
        trainable=trainable,
        saved=trainable,
        load_pretrained=lambda model: load_pretrained(model, config, bcfg, stage),
        load_frozen=lambda model: load_frozen(model, config, bcfg),
        open_data=lambda: main_process_first(lambda: open_data(config, stage)),
        train_loader=lambda data, batch: train_loader(config, bcfg, stage, tokenizer, data, batch),
        optimizer=lambda params, steps, _: make_optimizer(config, bcfg, stage, params, steps),
        embed=make_embed(stage, prompt_length),
        batch_loss=make_batch_loss(stage),
        **batch_layout(config, block=config.reference_device_batch, coupled=stage == 1),
        evaluate=(lambda model, data, split, step: evaluate(model, data, split, step, config=config,
                                                           tokenizer=tokenizer, gen=gen)) if stage == 3 else None,
        eval_splits=tuple(config.eval_splits) if evaluating else (),
        final_splits=tuple(config.final_splits) if evaluating else (),
        best_metrics=(config.best_metric,) if evaluating and config.best_metric else (),
        metric_keys=METRIC_KEYS,
        metric_format="8.4f",
        load_pytorch=load_pytorch if stage > 1 else None,
        export_pytorch=export_pytorch,
        eval_transform=transforms.bita_image_eval(config.data.image_size),
        caption_images=(lambda model, images, alternatives: caption_images(
            model, images, alternatives, tokenizer=tokenizer, gen=gen)) if stage > 1 else None,
        report=(lambda model, data, split, step, out_dir: report(
            model, data, split, step, out_dir, config=config, tokenizer=tokenizer, gen=gen)) if stage == 3 else None,
    )
