"""configs/bita.py: every (stage, dataset, demo) combination loads through rsvl_jax.config and
carries the reference's values (spec BITA.md §5, §8.3)."""
import itertools

import pytest

from rsvl_jax import config
from rsvl_jax.models import bita

# §8.3, per stage: (init_lr, min_lr, warmup_lr, warmup_steps, per-GPU batch, epochs, prompt)
SPEC = {"1": (1e-4, 1e-5, 1e-6, 5000, 96, 5, ""), "2": (1e-4, 1e-5, 1e-6, 2000, 48, 5, ""),
        "caption": (1e-5, 0.0, 1e-8, 1000, 48, 50, "a photo of")}
BUILDERS = {"ucm": ("ucm_captions",), "rsicd": ("rsicd",), "nwpu": ("nwpu_captions",),
            "all": ("rsicd", "nwpu_captions", "ucm_captions")}
CASES = [(s, d, demo) for s, d, demo in itertools.product(SPEC, ["", *BUILDERS], [False, True])
         if not (s == "caption" and d == "all")]


def spec_of(stage, dataset, demo):
    arg = f"stage={stage}" + (f",dataset={dataset}" if dataset else "") + (",demo" if demo else "")
    return f"configs/bita.py:{arg}"


@pytest.mark.parametrize("stage,dataset,demo", CASES)
def test_values(stage, dataset, demo):
    c = config.load_config(spec_of(stage, dataset, demo))
    init_lr, min_lr, warmup_lr, warmup_steps, batch, epochs, prompt = SPEC[stage]
    assert c.task == "bita" and c.stage == stage and c.seed == 42
    assert (c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay) == (0.9, 0.999, 1e-8, 0.05)
    assert c.model.num_query_tokens == 32 and c.model.max_txt_len == 32
    assert c.model.prompt == prompt and c.model.fixed_prompt is False
    assert c.data.eval_train_transform is False
    assert (c.generate.num_beams, c.generate.max_new_tokens, c.generate.min_length) == (5, 21, 5)
    assert c.model.dtype == "float32" and c.model.remat is False
    for key in ("vit_weights", "opt_dir", "bert_dir", "blip2_checkpoint"):
        assert key in c.model and c.model[key] is None
    # Demo stages start from the previous demo stage's run; real runs are told where to start.
    expected = {"1": None, "2": "runs/bita_demo/stage1", "caption": "runs/bita_demo/stage2"}[stage]
    assert c.model.init_checkpoint == (expected if demo else None)
    # the same top-level keys as configs/pir.py where they mean the same thing
    pir = config.load_config("configs/pir.py")
    for key in ("seed", "workdir", "batch_size", "eval_batch_size", "epochs", "mesh", "sharding_rules",
                "log_every", "eval_every_epochs", "eval_splits", "keep_checkpoints", "max_steps"):
        assert key in c and type(c[key]) is type(pir[key]) or c[key] is None, key
    for key in ("name", "data_dir", "manual_dir", "image_size"):
        assert key in c.data
    if stage == "caption":
        # val every epoch picks the best checkpoint; test is scored once, with it (§7)
        assert c.best_metric == "val_agg_metrics" and c.eval_splits == ("val",) and c.final_splits == ("test",)
    else:
        assert c.eval_splits == () and c.final_splits == () and c.best_metric is None
    if demo:
        assert c.data.name == "synthetic" and c.model.freeze_opt is False
        assert c.data.opt_tokenizer == "data/synthetic_opt_tokenizer" and c.data.bert_tokenizer == "data/synthetic_vocab"
        assert c.model.preset in bita.PRESETS and c.epochs <= 5 and c.batch_size <= 32
        return
    assert c.model.freeze_opt is True
    assert (c.optim.init_lr, c.optim.min_lr, c.optim.warmup_lr, c.optim.warmup_steps) == \
        (init_lr, min_lr, warmup_lr, warmup_steps)
    assert c.batch_size == batch * 4 and c.epochs == epochs
    assert c.eval_batch_size == (16 if stage == "caption" else 64) * 4
    assert c.data.datasets == BUILDERS[dataset or ("ucm" if stage == "caption" else "all")]
    preset = bita.PRESETS[c.model.preset]
    assert preset.qformer.num_query_tokens == 32 and preset.max_txt_len == 32
    assert (preset.opt is None) == (stage == "1")
    if stage != "1":
        assert preset.prompt == prompt


def test_overrides_and_bad_arguments():
    c = config.load_config("configs/bita.py:stage=caption,dataset=rsicd",
                           ["--config.model.opt_dir=/w/opt-2.7b", "--config.model.fixed_prompt=true"])
    assert c.model.opt_dir == "/w/opt-2.7b" and c.model.fixed_prompt is True and c.data.name == "rsicd"
    for bad, needle in (("stage=3", "stage must be"), ("dataset=coco", "dataset must be"),
                        ("stage=caption,dataset=all", "one dataset at a time")):
        with pytest.raises(config.ConfigError, match=needle):
            config.load_config(f"configs/bita.py:{bad}")
