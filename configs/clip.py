"""CLIP-family retrieval (RemoteCLIP, GeoRSCLIP, OpenAI CLIP) with PIR's evaluation.

    # zero-shot: a released checkpoint, converted on the fly
    python -m rsvl_jax.evaluate --config configs/clip.py:dataset=rsicd,arch=ViT-L-14,act=gelu \
        --config.data.manual_dir=/data/rsicd --config.data.bpe=/weights/bpe_simple_vocab_16e6.txt.gz \
        --checkpoint /weights/RemoteCLIP-ViT-L-14.pt
    # fine-tune from it
    python -m rsvl_jax.train --config configs/clip.py:dataset=rsitmd,arch=ViT-B-32 \
        --config.model.init_checkpoint=/weights/RS5M_ViT-B-32.pt --config.data.manual_dir=... --config.data.bpe=...
    python -m rsvl_jax.train --config configs/clip.py:demo      # synthetic data, a tiny CLIP, CPU minutes

`act` is the checkpoint's MLP activation: `quick_gelu` for OpenAI's weights and models that
open_clip builds with `pretrained="openai"`, `gelu` for open_clip's plain `ViT-B-32` /
`ViT-L-14` (RemoteCLIP's loading code). A wrong one still loads (a state dict does not
record it) but gives worse embeddings.
"""
from ml_collections import ConfigDict

from rsvl_jax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, dataset="rsitmd", arch="ViT-B-32", act="", demo=False, pir_format=True)
    c = ConfigDict()
    c.task = "clip"
    c.seed = 42
    c.workdir = f"runs/clip_{'demo' if arg.demo else arg.dataset + '_' + arg.arch}"

    # --- model -----------------------------------------------------------------------------
    c.model = ConfigDict()
    c.model.preset = "clip_demo" if arg.demo else arg.arch  # ViT-B-32, ViT-B-16, ViT-L-14
    c.model.act = arg.act  # "" = the preset's (quick_gelu), or "gelu" / "quick_gelu"
    c.model.dtype = "float32"  # compute dtype; "bfloat16" on GPU/TPU
    c.model.text_vocab_size = 0  # 0 = the preset's (49408)
    c.model.init_checkpoint = None  # OpenAI/open_clip .pt or HF CLIPModel folder, loaded before fine-tuning
    c.model.freeze_vision = False
    c.model.freeze_text = False

    # --- data ------------------------------------------------------------------------------
    c.data = ConfigDict()
    c.data.name = "synthetic" if arg.demo else arg.dataset
    c.data.manual_dir = None  # user's folder: annotation JSON(s) + images
    # Builder config: "" = PIR's lists for rsicd/rsitmd (the splits PIR's numbers use; with
    # pir_format=False the official annotation file), the official file for the others.
    c.data.split_config = "" if arg.pir_format else "karpathy"
    c.data.data_dir = None  # where built datasets are cached (default ~/.cache/rsvl_jax/datasets)
    c.data.on_error = "raise"
    c.data.bpe = None  # bpe_simple_vocab_16e6.txt.gz (open_clip) or an HF CLIPTokenizer folder
    c.data.image_size = 224
    c.data.context_length = 77
    c.data.text_clean = "clip"  # captions as written, cleaned by the tokenizer; "pir" = PIR's normalisation
    c.data.max_words = 30  # only for text_clean="pir"
    c.data.text_buckets = (16, 32, 48, 77)  # padding lengths (zeros after end-of-text change nothing)
    c.data.eval_text_chunk = 256
    c.data.augment = True  # random resized crop (scale 0.5-1) + horizontal flip while fine-tuning
    c.data.synthetic_train_images = 2000  # only for name="synthetic"
    c.data.synthetic_eval_images = 200

    c.zero_shot = ConfigDict()
    c.zero_shot.templates = ("a satellite photo of {}.",)

    # --- optimisation ----------------------------------------------------------------------
    c.batch_size = 128
    c.eval_batch_size = 128
    c.chunk_size = 0  # GradCache chunks (any divisor of batch_size): the same loss in less memory; 0 = off
    c.epochs = 10
    c.optim = ConfigDict()
    c.optim.lr = 1e-5
    c.optim.weight_decay = 0.2
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.warmup_fraction = 0.1
    c.optim.grad_clip = 0.0
    c.loss = ConfigDict()
    c.loss.same_image_positives = True  # captions of one image in a batch are all positives

    # --- parallelism -----------------------------------------------------------------------
    c.mesh = ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.sharding_rules = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("vocab", "tensor"),
        ("conv_out", "tensor"),
    )

    # --- logging / checkpoints -------------------------------------------------------------
    c.log_every = 10
    c.eval_every_epochs = 1
    c.eval_splits = ("val", "test")
    c.keep_checkpoints = 2
    c.checkpoint_every_steps = 500
    c.compile_cache_dir = None  # None = $RSVL_COMPILE_CACHE or ~/.cache/rsvl_jax/xla; "" = off
    c.max_steps = -1

    if arg.demo:
        c.data.image_size = 64
        c.data.bpe = "data/synthetic_clip_bpe/synthetic_bpe.txt"
        c.data.augment = False
        c.data.synthetic_train_images = 480
        c.data.synthetic_eval_images = 100
        c.batch_size = 32
        c.eval_batch_size = 50
        c.epochs = 5
        c.optim.lr = 5e-4
        c.optim.weight_decay = 0.05
        c.log_every = 5
    return c
