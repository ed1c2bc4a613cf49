"""PIR image-text retrieval (ACM MM 2023) on RSITMD / RSICD, and a synthetic demo.

    python -m rsvl_jax.train --config configs/pir.py:dataset=rsitmd
    python -m rsvl_jax.train --config configs/pir.py:dataset=rsicd,baseline=True
    python -m rsvl_jax.train --config configs/pir.py:demo        # synthetic data, minutes on a CPU

Values follow the reference configs (Retrieval_rsitmd.yaml / Retrieval_rsicd.yaml and the
constants in its code, spec PIR.md §8.1). Paths to the user's data and backbone weights are
given with overrides, e.g. `--config.data.manual_dir=/data/rsitmd`.
"""
from ml_collections import ConfigDict

from rsvl_jax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, dataset="rsitmd", baseline=False, demo=False, pir_format=True)
    c = ConfigDict()
    c.task = "pir"
    c.seed = 42
    c.workdir = f"runs/pir_{'demo' if arg.demo else arg.dataset}{'_baseline' if arg.baseline else ''}"

    # --- model -----------------------------------------------------------------------------
    c.model = ConfigDict()
    c.model.preset = "pir_swin_t"
    c.model.is_baseline = arg.baseline
    c.model.text_vocab_size = 0  # 0 = the preset's BERT vocabulary (30522 for bert-base-uncased)
    c.model.dtype = "float32"  # compute dtype (bfloat16 on GPU/TPU); parameters, norms, softmax, losses stay float32
    c.model.remat = False  # recompute each Swin block / BERT layer in the backward pass (less memory)
    # Reference quirks are mirrored by default (PIR.md §7); each flag turns on a fix.
    c.model.text_mask = False  # Q5: pass attention masks to BERT and LCA
    c.model.temp_clamp = False  # Q8: clamp temperatures to [0.001, 0.5] (X-VLM)
    c.model.prior_bn_mode = "pir_train"  # Q3: "inference" keeps the prior's BN in eval mode
    c.model.sort_on_logits = False  # Q14: sort tokens on logits, not softmax values
    # Backbone weights (local files; None = random init, as the reference effectively does
    # for the ResNet prior, Q1). Loaded before training, never when resuming.
    c.model.swin_weights = None  # swin_tiny_patch4_window7_224_22k.pth
    c.model.bert_weights = None  # bert-base-uncased directory or pytorch_model.bin
    c.model.resnet_weights = None  # aid_28-rsp-resnet-50-ckpt.pth ("fixed" mode of Q1)
    c.model.init_checkpoint = None  # a released PIR checkpoint_best.pth to fine-tune/evaluate

    # --- data ------------------------------------------------------------------------------
    c.data = ConfigDict()
    c.data.name = "synthetic" if arg.demo else arg.dataset
    c.data.manual_dir = None  # user's folder: annotation JSON(s) + images
    c.data.pir_format = arg.pir_format  # read PIR's own JSON lists (the paper's splits)
    c.data.data_dir = None  # where built datasets are cached (default ~/.cache/rsvl_jax/datasets)
    c.data.on_error = "raise"  # a bad annotation row or image: "raise" names it, "skip" drops and counts
    c.data.image_size = 224
    c.data.max_words = 30
    c.data.max_tokens = 47
    c.data.vocab = None  # bert-base-uncased folder (vocab.txt)
    c.data.text_buckets = (16, 24, 32, 48, 64)  # train-time padding buckets (few jit shapes)
    c.data.eval_text_chunk = 128  # reference encodes captions in chunks of 128 (no mask, Q5)
    c.data.augment = True  # RandomAugment N=2 M=7
    c.data.synthetic_train_images = 2000  # only for name="synthetic"
    c.data.synthetic_eval_images = 200

    # --- optimisation (PIR.md §4) ----------------------------------------------------------
    c.batch_size = 256  # global; the reference: 128 per GPU x 2 GPUs
    # The reference's per-GPU batch. Its affiliation-loss centres (Q9) and the prior's
    # BatchNorm statistics (Q3) are per GPU, so we compute them per shard of this size,
    # whatever our own mesh is. The schedule counts ceil(N / batch_size) steps per epoch (Q16).
    c.reference_device_batch = 128
    # GradCache (the paper's batch on one device, same loss and gradients): embed the batch
    # in chunks of this many examples (a multiple of reference_device_batch), keeping one
    # chunk's activations; 0 = the whole batch at once. 128 trains the batch of 256 on one GPU.
    c.chunk_size = 0
    c.eval_batch_size = 128
    c.epochs = 50
    c.optim = ConfigDict()
    c.optim.lr = 6e-5
    c.optim.weight_decay = 0.01
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-8
    c.optim.warmup_fraction = 0.1
    c.optim.grad_clip = 0.0  # 0 = off (reference)
    c.loss = ConfigDict()
    c.loss.affiliation_weight = 1.0
    c.loss.kind = "contrastive"  # or "triplet" (only when affiliation_weight == 0)

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
    # Every evaluation also writes its HTML report to <workdir>/reports/<split>_step<N>/ and
    # sends the first this many of its pictures to TensorBoard; 0 = metrics only.
    c.tensorboard_images = 8
    c.eval_every_epochs = 1
    c.eval_splits = ("val", "test")
    c.keep_checkpoints = 2
    c.checkpoint_every_steps = 500  # also at every epoch end and on SIGTERM/SIGINT; 0 = epoch ends only
    # XLA's persistent compile cache: the next start of the same step (a resume, evaluate) skips
    # compiling. None = $RSVL_COMPILE_CACHE or ~/.cache/rsvl_jax/xla; "" = off.
    c.compile_cache_dir = None
    c.max_steps = -1  # stop early (tests, smoke runs); -1 = all epochs

    if arg.demo:
        c.model.preset = "pir_demo"
        c.data.image_size = 64
        c.data.vocab = "data/synthetic_vocab"
        c.data.augment = False
        c.data.synthetic_train_images = 480
        c.data.synthetic_eval_images = 100
        c.batch_size = 32
        c.eval_batch_size = 50
        c.epochs = 5
        c.optim.lr = 5e-4
        c.reference_device_batch = 32
        c.log_every = 5
    return c
