"""Tiny random `transformers` models built from our configs, for parity and integration tests."""
import math

import torch
import transformers

from rsvl_jax.models.bert import BertConfig
from rsvl_jax.models.swin import SwinConfig


def randomise(model, norm_marker: str):
    """Non-trivial LayerNorm affine params and biases (so scale/bias mix-ups would show) and
    unit-scale weights (HF's std-0.02 init makes every branch vanish next to the residual)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if norm_marker in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias") or "relative_position_bias_table" in name:
                p.copy_(0.5 * torch.randn_like(p))
            elif p.ndim >= 2:
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
    return model


def hf_swin(cfg: SwinConfig, seed: int = 0):
    """A randomised HF SwinModel with the shapes of `cfg`."""
    torch.manual_seed(seed)
    hf_cfg = transformers.SwinConfig(
        image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=cfg.in_chans, embed_dim=cfg.embed_dim,
        depths=list(cfg.depths), num_heads=list(cfg.num_heads), window_size=cfg.window_size,
        mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0, hidden_act="gelu", use_absolute_embeddings=False, layer_norm_eps=cfg.layer_norm_eps,
    )
    hf_cfg._attn_implementation = "eager"  # the reference's explicit softmax(q k^T + bias)
    return randomise(transformers.SwinModel(hf_cfg).eval(), "norm")


def hf_bert(cfg: BertConfig, seed: int = 0):
    """A randomised HF BertModel (with a pooler, which converters skip) with the shapes of `cfg`."""
    torch.manual_seed(seed)
    hf_cfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return randomise(transformers.BertModel(hf_cfg).eval(), "LayerNorm")
