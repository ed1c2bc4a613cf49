"""BITA remote-sensing captioning (IEEE TGRS 2024): the three stages, and a synthetic demo.

    python -m rsvl_jax.train --config configs/bita.py:stage=1            # ITC, RSICD+NWPU+UCM train
    python -m rsvl_jax.train --config configs/bita.py:stage=2            # prefix LM, same data
    python -m rsvl_jax.train --config configs/bita.py:stage=caption,dataset=ucm
    python -m rsvl_jax.train --config configs/bita.py:stage=caption,demo # synthetic data, a CPU

Values follow the reference's project configs (pretrain_stage1.yaml, pretrain_stage2.yaml,
caption_rsicd_ft.yaml; spec BITA.md §5, §8.3), run there on 4 GPUs: the global batch here
is the per-GPU batch x 4. The paths a user must give are overrides, e.g.
`--config.model.vit_weights=clip_vit_L.pth --config.model.opt_dir=opt-2.7b/
--config.data.manual_dir=/data/ucm` (see the comments at `model.*_weights/_dir/_checkpoint`).
"""
from ml_collections import ConfigDict

from rsvl_jax.config import ConfigError, parse_arg

STAGES = ("1", "2", "caption")
# dataset argument -> builder name(s) (rsvl_jax.data.builders.BUILDERS)
DATASETS = {"ucm": ("ucm_captions",), "rsicd": ("rsicd",), "nwpu": ("nwpu_captions",),
            "all": ("rsicd", "nwpu_captions", "ucm_captions")}
REFERENCE_GPUS = 4

# Per stage (spec §8.3): lr schedule (linear_warmup_cosine_lr), per-GPU batches, epochs, prompt.
STAGE_VALUES = {
    "1": dict(preset="bita_stage1_vitl", init_lr=1e-4, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=5000,
              batch=96, eval_batch=64, epochs=5, prompt=""),
    "2": dict(preset="bita_opt_2_7b", init_lr=1e-4, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=2000,
              batch=48, eval_batch=64, epochs=5, prompt=""),
    "caption": dict(preset="bita_caption_opt_2_7b", init_lr=1e-5, min_lr=0.0, warmup_lr=1e-8, warmup_steps=1000,
                    batch=48, eval_batch=16, epochs=50, prompt="a photo of"),
}


def get_config(arg=None):
    arg = parse_arg(arg, stage="", dataset="", demo=False)
    # `demo` alone runs the whole chain: stages 1 and 2 first (run_first), then the caption stage.
    chain = arg.demo and not arg.stage
    arg.stage = arg.stage or ("caption" if arg.demo else "1")
    if arg.stage not in STAGES:
        raise ConfigError(f"configs/bita.py: stage must be one of {', '.join(STAGES)}, got {arg.stage!r}")
    dataset = arg.dataset or ("ucm" if arg.stage == "caption" else "all")
    if dataset not in DATASETS:
        raise ConfigError(f"configs/bita.py: dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if arg.stage == "caption" and dataset == "all":
        raise ConfigError("configs/bita.py: the caption fine-tune uses one dataset at a time (spec §6.2): "
                          "dataset=ucm, rsicd or nwpu")
    s = STAGE_VALUES[arg.stage]
    c = ConfigDict()
    c.task = "bita"
    c.stage = arg.stage  # "1" ITC (bita_former) | "2" prefix-LM pre-training | "caption" fine-tune
    c.seed = 42
    stage_dir = "stage" + arg.stage if arg.stage != "caption" else "caption"
    c.workdir = f"runs/bita_demo/{stage_dir}" if arg.demo else f"runs/bita_{stage_dir}_{dataset}"
    # Config arguments of this file run to completion first, in sibling directories of
    # workdir, each stage starting from the one before (train.py; the demo's whole chain).
    c.run_first = ("stage=1,demo", "stage=2,demo") if chain else ()

    # --- model -----------------------------------------------------------------------------
    c.model = ConfigDict()
    c.model.preset = s["preset"]  # rsvl_jax.models.bita.PRESETS
    # Field overrides of the preset's parts (ViTConfig / QFormerConfig / OPTConfig); empty = as is.
    c.model.vit_overrides = ConfigDict({})
    c.model.qformer_overrides = ConfigDict({})
    c.model.opt_overrides = ConfigDict({})
    c.model.num_query_tokens = 32
    c.model.max_txt_len = 32  # stage 1: BERT ids padded to exactly 32 (Q2); stages 2/3: OPT ids incl. BOS
    c.model.prompt = s["prompt"]  # "" for stages 1/2, "a photo of" (no trailing space, Q7) for caption
    # Q7 fix (off = mirror): prompt "a photo of " and prompt / caption tokenised separately.
    c.model.fixed_prompt = False
    # Reference quirks mirrored by default (BITA.md §11); each flag turns on a fix.
    c.model.temp_clamp = False  # BLIP's clamp of temp to (0.001, 0.5); BITA has none
    c.model.fourier_mask_padding = False  # Q2: zero pads before the Fourier mixing
    c.model.itc_stop_gradient_other = True  # §3/Q3: the gathered side carries no gradient
    c.model.label_smoothing = 0.1  # ITC only (Q21)
    c.model.opt_dropout_in_training = True  # Q13: the frozen OPT's dropout is active in training
    c.model.zero_pad_row_grad = True  # Q14: the [PAD] word-embedding row gets no gradient (stage 1)
    c.model.dtype = "float32"  # compute dtype (bfloat16 on GPU/TPU); parameters stay float32
    c.model.frozen_dtype = "float32"  # storage of the frozen ViT / OPT weights (bfloat16 on GPU/TPU, §4.4)
    c.model.freeze_opt = True  # the OPT is frozen in BITA (§4.3); only the demo trains its tiny one
    c.model.remat = False  # recompute the IFT's layers in the backward pass (BITA's use_grad_checkpoint;
    # no numeric effect; the frozen ViT keeps no activations for a backward pass anyway)
    # Weights (local paths; nothing is downloaded). Loaded before training, never when resuming.
    c.model.vit_weights = None  # CLIP ViT-L/14: LAVIS clip_vit_L.pth, or an OpenAI / HF CLIP file or dir
    c.model.opt_dir = None  # facebook/opt-2.7b HF directory (weights + tokenizer); stages 2 and caption
    c.model.bert_dir = None  # bert-base-uncased directory: stage 1's IFT initialisation (§2.8) + tokenizer
    # The previous stage's output: a run directory of ours or a reference .pth (stage 1 -> 2:
    # query path + ln_vision, §10.3; stage 2 -> caption: the whole bridge). Q5/Q20: required
    # for stage 2; caption may also start from released Caption weights.
    c.model.init_checkpoint = None
    c.model.blip2_checkpoint = None  # optional stage-1 warm start from LAVIS blip2_pretrained_vitL.pth
    # (a labelled deviation, Q4: the reference never loads it)

    # --- data ------------------------------------------------------------------------------
    c.data = ConfigDict()
    c.data.name = "synthetic" if arg.demo else ("all" if dataset == "all" else DATASETS[dataset][0])
    # The builders behind data.name; "all" concatenates the three train splits (stages 1/2, §6.2).
    c.data.datasets = ("synthetic",) if arg.demo else DATASETS[dataset]
    c.data.annotations = "karpathy"  # builder config: "karpathy" (official files) or "bita" (BITA's lists)
    c.data.synthetic_config = "caption_demo"  # only for name="synthetic"
    # User's folder: annotation file(s) + images; for dataset=all one sub-folder per builder
    # name in data.datasets (rsicd/, nwpu_captions/, ucm_captions/).
    c.data.manual_dir = None
    c.data.data_dir = None  # where built datasets are cached
    c.data.on_error = "raise"
    c.data.image_size = 224
    c.data.max_words = 50  # bita_caption processor (§6.3)
    c.data.augment = True  # train: RandomResizedCrop(scale 0.5-1, bicubic) + horizontal flip (§6.4)
    # Q8 (off = the fix): True evaluates val/test with the *train* augmentation, as caption_rsicd_ft.yaml.
    c.data.eval_train_transform = False
    c.data.bert_tokenizer = None  # None = model.bert_dir (vocab.txt; [DEC] is added, §2.7)
    c.data.opt_tokenizer = None  # None = model.opt_dir

    # --- generation (§5, Q16: transformers-4.29 lengths) ----------------------------------
    c.generate = ConfigDict()
    c.generate.num_beams = 5
    c.generate.max_new_tokens = 21  # max_length 22 incl. the BOS placeholder
    c.generate.min_length = 5  # incl. the placeholder: "\n" banned for the first 4 new tokens
    c.generate.length_penalty = 1.0

    # --- optimisation (§8) -----------------------------------------------------------------
    c.batch_size = s["batch"] * REFERENCE_GPUS  # global: 384 / 192 / 192
    c.eval_batch_size = s["eval_batch"] * REFERENCE_GPUS
    # The reference's per-GPU batch: a block with its own dropout key and, in the LM stages,
    # its own token-mean loss (DDP averages the GPUs' means), whatever our mesh is.
    c.reference_device_batch = s["batch"]
    # The global batch in smaller pieces, same result (see configs/pir.py): GradCache chunks
    # for stage 1's contrastive loss, optax.MultiSteps micro-batches for the LM stages (steps
    # then count micro-batches).
    c.chunk_size = 0
    c.accumulate_steps = 1
    c.epochs = s["epochs"]
    c.optim = ConfigDict()
    c.optim.init_lr = s["init_lr"]
    c.optim.min_lr = s["min_lr"]
    c.optim.warmup_lr = s["warmup_lr"]
    c.optim.warmup_steps = s["warmup_steps"]  # only in epoch 0, cut short if longer (Q12)
    c.optim.weight_decay = 0.05
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 0.0  # none in the reference

    # --- parallelism -----------------------------------------------------------------------
    c.mesh = ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.sharding_rules = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("vocab", "tensor"),
    )

    # --- logging / evaluation / checkpoints ------------------------------------------------
    c.log_every = 50
    # Every evaluation also writes its HTML report to <workdir>/reports/<split>_step<N>/ and
    # sends the first this many of its pictures to TensorBoard; 0 = metrics only.
    c.tensorboard_images = 8
    # Pre-training evaluates nothing and its output is the last epoch (Q11); the caption
    # fine-tune evaluates val every epoch, keeps the best CIDEr + BLEU-4, then tests it.
    c.eval_every_epochs = 1 if arg.stage == "caption" else 0
    c.eval_splits = ("val",) if arg.stage == "caption" else ()
    c.final_splits = ("test",) if arg.stage == "caption" else ()  # with the best checkpoint (§7)
    c.best_metric = "val_agg_metrics" if arg.stage == "caption" else None
    c.keep_checkpoints = 2
    c.checkpoint_every_steps = 500
    # XLA's persistent compile cache: the next start of the same step (a resume, evaluate) skips
    # compiling. None = $RSVL_COMPILE_CACHE or ~/.cache/rsvl_jax/xla; "" = off.
    c.compile_cache_dir = None
    c.max_steps = -1

    if arg.demo:
        # Tiny models on the synthetic captions, minutes on 2 CPU cores. No pretrained LM can
        # ship with the project, so the demo *trains* its tiny OPT (model.freeze_opt=False)
        # instead of keeping it frozen; the tiny ViT stays frozen and random.
        c.model.preset = "bita_stage1_test" if arg.stage == "1" else "bita_opt_test"
        c.model.freeze_opt = False
        c.model.vit_overrides = ConfigDict({"image_size": 64, "patch_size": 8})
        c.model.qformer_overrides = ConfigDict({"vocab_size": 230})  # data/synthetic_vocab (229) + [DEC]
        c.model.opt_overrides = ConfigDict({"vocab_size": 600})  # data/synthetic_opt_tokenizer
        c.data.image_size = 64
        c.data.bert_tokenizer = "data/synthetic_vocab"
        c.data.opt_tokenizer = "data/synthetic_opt_tokenizer"
        c.batch_size = 32
        c.eval_batch_size = 30
        c.reference_device_batch = 8
        c.epochs = 3 if arg.stage != "caption" else 5
        c.optim.init_lr, c.optim.min_lr, c.optim.warmup_lr, c.optim.warmup_steps = 1e-3, 1e-4, 1e-5, 20
        c.log_every = 10
        c.checkpoint_every_steps = 0
        # Each demo stage starts from the previous demo stage's run directory.
        c.model.init_checkpoint = {"1": None, "2": "runs/bita_demo/stage1",
                                   "caption": "runs/bita_demo/stage2"}[arg.stage]
    return c
