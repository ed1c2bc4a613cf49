"""PIR (ACM MM 2023): Swin + frozen ResNet prior + BERT, fused by VIR and LCA (spec PIR.md §2).

Image: v = L2norm(g_img + head_img(VIR(vision_proj(Swin(x)), conv_proj(ResNet(x))))).
Text:  t = L2norm(g_txt + head_txt(LCA(text_proj(BERT(ids))))).
Baseline mode (`is_baseline`, the paper's VSE rows): v = L2norm(vision_proj(Swin(x))[:, 0]),
t = L2norm(text_proj(BERT(ids))[:, 0]), and no prior, VIR or LCA modules exist.

Parameter paths follow the reference state dict (`img_sa.0.mhatt.linear_v`, `mapping_txt.2`,
`vision_encoder.layers...`), so the `pir` converter is a rename. Reference quirks are mirrored
by default; each fix is a config flag (see `PIRConfig`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rsvl_jax.models import bert as bert_lib
from rsvl_jax.models import layers
from rsvl_jax.models import resnet as resnet_lib
from rsvl_jax.models import swin as swin_lib
from rsvl_jax.models.pae import CroSA, MHSA, clones, lca, torch_dense, vir

# X-VLM's clamp, which PIR removed (§7 Q8); used when `temp_clamp=True`.
XVLM_TEMP_CLAMP = (0.001, 0.5)
# The reference scores `swin_feat[:, 0:50]`: all tokens of Swin-T at 224 px (§7 Q15).
REFERENCE_TOKENS = 50


@dataclasses.dataclass(frozen=True)
class PIRConfig:
    """PIR model config. Encoder configs may be None for a heads-only model (then give the
    encoder output widths); `encode_*` need the encoders, `fuse_*` do not."""

    swin: swin_lib.SwinConfig | None = None
    bert: bert_lib.BertConfig | None = None
    resnet: resnet_lib.ResNetConfig | None = None
    vision_width: int | None = None  # derived from `swin` when None
    text_width: int | None = None  # derived from `bert`
    conv_width: int | None = None  # derived from `resnet`
    embed_dim: int = 512
    filter_size: int = 40
    instru_num: int = 2
    cycle_num: int = 3
    dropout: float = 0.2
    heads: int = 8
    is_baseline: bool = False
    temp_init: float = 0.07
    temp2_init: float = 0.07
    # Which temperatures exist, as in the reference: `temp` unless a baseline trains with the
    # triplet loss, `temp2` when the affiliation loss is used.
    use_affil_loss: bool = True
    use_triplet_loss: bool = False
    # Q18: cloned blocks / mappings start with identical weights (reference `clones`).
    identical_clones: bool = True
    # The prior is frozen: no gradient reaches the ResNet (reference `finetune_conv: False`).
    finetune_prior: bool = False
    # --- fixes; defaults mirror the reference -------------------------------------------
    text_mask: bool = False  # Q5: pass the attention mask to BERT and LCA
    temp_clamp: Any = None  # Q8: None/False = unclamped; True = X-VLM's (0.001, 0.5); or (lo, hi)
    prior_bn_mode: str = "pir_train"  # Q3: overrides resnet.bn_mode; "inference" = running stats
    sort_on_logits: bool = False  # Q14: rank tokens by logits instead of softmax values
    use_token_count: bool = False  # Q15: score all Swin tokens instead of the first 50
    dtype: Any = jnp.float32  # compute dtype of the heads (encoders have their own)

    def __post_init__(self):
        if self.embed_dim % self.heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by heads {self.heads}")
        if not self.is_baseline:
            if self.instru_num < 1:
                raise ValueError(
                    f"instru_num must be >= 1, got {self.instru_num}: the reference crashes with 0 "
                    "(its VIR output is never assigned, spec §7 Q19); use is_baseline=True for no VIR"
                )
            if self.cycle_num < 1:
                raise ValueError(
                    f"cycle_num must be >= 1, got {self.cycle_num}: with 0 the reference silently "
                    "returns g_txt + head_txt(g_txt) (spec §7 Q19); use is_baseline=True for no LCA"
                )
            if self.filter_size < 1:
                raise ValueError(f"filter_size must be >= 1, got {self.filter_size}")
        if self.prior_bn_mode not in ("pir_train", "inference"):
            raise ValueError(f"prior_bn_mode must be 'pir_train' or 'inference', got {self.prior_bn_mode!r}")
        for name, sub, attr in (("vision", self.swin, "num_features"), ("text", self.bert, "hidden_size"),
                                ("conv", self.resnet, "features")):
            given = getattr(self, f"{name}_width")
            if sub is not None and given is not None and given != getattr(sub, attr):
                raise ValueError(f"{name}_width={given} contradicts the encoder config ({getattr(sub, attr)})")
            if sub is None and given is None and not (name == "conv" and self.is_baseline):
                raise ValueError(f"give {name}_width for a model without its encoder config")
        if self.temp_clamp not in (None, False, True) and len(tuple(self.temp_clamp)) != 2:
            raise ValueError(f"temp_clamp must be None, a bool or (lo, hi), got {self.temp_clamp!r}")

    def with_precision(self, dtype=jnp.float32, remat: bool = False) -> "PIRConfig":
        """The same model computing in `dtype` (Swin, BERT, the ResNet prior and the heads;
        parameters, softmax, norms and losses stay float32), with `remat` recomputing each Swin
        block and BERT layer in the backward pass."""
        rep, dt = dataclasses.replace, jnp.dtype(dtype)
        return rep(self, dtype=dt,
                   swin=self.swin and rep(self.swin, dtype=dt, remat=remat),
                   bert=self.bert and rep(self.bert, dtype=dt, remat=remat),
                   resnet=self.resnet and rep(self.resnet, dtype=dt))

    @property
    def vision_dim(self) -> int:
        return self.swin.num_features if self.swin is not None else self.vision_width

    @property
    def text_dim(self) -> int:
        return self.bert.hidden_size if self.bert is not None else self.text_width

    @property
    def conv_dim(self) -> int:
        return self.resnet.features if self.resnet is not None else self.conv_width

    @property
    def has_temp(self) -> bool:
        return not (self.is_baseline and self.use_triplet_loss)

    @property
    def has_temp2(self) -> bool:
        return self.use_affil_loss

    @property
    def clamp_range(self) -> tuple[float, float] | None:
        if self.temp_clamp is None or self.temp_clamp is False:
            return None
        return XVLM_TEMP_CLAMP if self.temp_clamp is True else tuple(self.temp_clamp)


_SWIN_DEMO = swin_lib.SwinConfig(image_size=64, embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8), window_size=4)
_BERT_DEMO = bert_lib.BertConfig(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256,
                                 max_position_embeddings=64)

PRESETS: dict[str, PIRConfig] = {
    # The paper's model: Swin-T/224, BERT-base, ResNet-50, 512-d heads.
    "pir_swin_t": PIRConfig(
        swin=swin_lib.PRESETS["swin_tiny_224"], bert=bert_lib.PRESETS["bert_base_uncased"],
        resnet=resnet_lib.PRESETS["resnet50"],
    ),
    # Tiny, for unit tests: 32 px images (16 Swin tokens + the mean token), filter keeps 8.
    "pir_test": PIRConfig(
        swin=swin_lib.PRESETS["swin_test"], bert=bert_lib.PRESETS["bert_test"],
        resnet=resnet_lib.PRESETS["resnet_test"], embed_dim=32, heads=4, filter_size=8,
    ),
    # Small enough to train on the synthetic 64 px dataset in minutes on 2 CPU cores:
    # 16 Swin tokens (+ mean), filter keeps 12. Full BERT-uncased vocabulary size so any
    # BERT-style vocab.txt fits.
    "pir_demo": PIRConfig(
        swin=_SWIN_DEMO, bert=_BERT_DEMO, resnet=resnet_lib.PRESETS["resnet_test"],
        embed_dim=128, heads=4, filter_size=12,
    ),
}


def l2_normalize(x, eps: float = 1e-12):
    """F.normalize: x / max(||x||, eps), in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class PIR(nnx.Module):
    """The PIR retrieval model: `encode_image`, `encode_text`, and their head-only halves
    `fuse_image` / `fuse_text` (which take encoder outputs, for tests and cached features)."""

    def __init__(self, config: PIRConfig, *, rngs: nnx.Rngs):
        self.config = cfg = config
        d, dt = cfg.embed_dim, cfg.dtype
        if cfg.has_temp:
            self.temp = layers.param(rngs, nnx.initializers.constant(cfg.temp_init), (), ())
        if cfg.has_temp2:
            self.temp2 = layers.param(rngs, nnx.initializers.constant(cfg.temp2_init), (), ())
        self.vision_encoder = swin_lib.Swin(cfg.swin, rngs=rngs) if cfg.swin is not None else None
        self.text_encoder = bert_lib.Bert(cfg.bert, rngs=rngs) if cfg.bert is not None else None
        if cfg.resnet is not None and not cfg.is_baseline:
            prior = dataclasses.replace(cfg.resnet, bn_mode=cfg.prior_bn_mode)
            self.conv_encoder = resnet_lib.ResNet(prior, rngs=rngs)
        else:
            self.conv_encoder = None
        self.vision_proj = torch_dense(cfg.vision_dim, d, ("embed", "mlp"), rngs=rngs, dtype=dt)
        self.text_proj = torch_dense(cfg.text_dim, d, ("embed", "mlp"), rngs=rngs, dtype=dt)
        if cfg.is_baseline:
            return
        same = cfg.identical_clones
        self.conv_proj = torch_dense(cfg.conv_dim, d, ("embed", "mlp"), rngs=rngs, dtype=dt)
        self.mapping_img = clones(lambda: torch_dense(d, d, ("embed", "mlp"), rngs=rngs, dtype=dt),
                                  cfg.instru_num, identical=same)
        self.mapping_txt = clones(lambda: torch_dense(d, d, ("embed", "mlp"), rngs=rngs, dtype=dt),
                                  cfg.cycle_num, identical=same)
        self.head_img = torch_dense(d, d, ("embed", "mlp"), rngs=rngs, dtype=dt)
        self.head_txt = torch_dense(d, d, ("embed", "mlp"), rngs=rngs, dtype=dt)
        block = dict(dim=d, heads=cfg.heads, dropout=cfg.dropout, rngs=rngs, dtype=dt)
        self.img_sa = clones(lambda: MHSA(**block), cfg.instru_num, identical=same)
        self.img_ca = clones(lambda: CroSA(**block), cfg.instru_num, identical=same)
        self.txt_sa = clones(lambda: MHSA(**block), cfg.cycle_num, identical=same)
        self.txt_ca = clones(lambda: CroSA(**block), cfg.cycle_num, identical=same)

    # ------------------------------------------------------------------------------------
    def temperatures(self):
        """(temp, temp2) as used by the losses (None where the model has none), clamped only
        under the `temp_clamp` fix (the reference leaves them unclamped, §7 Q8)."""
        rng = self.config.clamp_range
        out = []
        for name in ("temp", "temp2"):
            t = getattr(self, name, None)
            t = None if t is None else t[...]
            out.append(t if t is None or rng is None else jnp.clip(t, *rng))
        return tuple(out)

    # ------------------------------------------------------------------------------------
    def fuse_image(self, vision_tokens, conv_feat=None, *, deterministic: bool = True):
        """VIR over encoder outputs: Swin tokens (B, 1+N, Cv) [mean token first] and the prior
        feature (B, Cc) (any trailing singleton axes are flattened, fixing §7 Q4's squeeze).
        Returns (L2-normalised embedding (B, D) float32, intermediates)."""
        cfg = self.config
        s = self.vision_proj(vision_tokens.astype(cfg.dtype))
        g = s[:, 0]
        inter = {"vision_tokens": vision_tokens, "projected_tokens": s, "global": g}
        if cfg.is_baseline:
            return l2_normalize(g), inter
        c = self.conv_proj(conv_feat.reshape(conv_feat.shape[0], -1).astype(cfg.dtype))
        # The reference scores swin_feat[:, 0:50] (a no-op at 224 px, §7 Q15).
        tokens = s if cfg.use_token_count else s[:, :REFERENCE_TOKENS]
        local, vir_inter = vir(
            tokens, c, self.img_sa, self.img_ca, self.mapping_img, filter_size=cfg.filter_size,
            sort_on_logits=cfg.sort_on_logits, deterministic=deterministic,
        )
        inter.update(vir_inter, prior_features=conv_feat, instruction=c, local=local)
        return l2_normalize(g + self.head_img(local)), inter

    def fuse_text(self, text_tokens, *, attention_mask=None, deterministic: bool = True):
        """LCA over BERT hidden states (B, L, Ct). `attention_mask` is used only with the
        `text_mask` fix (the reference attends to padding, §7 Q5).
        Returns (L2-normalised embedding (B, D) float32, intermediates)."""
        cfg = self.config
        t = self.text_proj(text_tokens.astype(cfg.dtype))
        g = t[:, 0]
        inter = {"text_tokens": text_tokens, "projected_tokens": t, "global": g}
        if cfg.is_baseline:
            return l2_normalize(g), inter
        mask = attention_mask if cfg.text_mask else None
        local, lca_inter = lca(t, self.txt_sa, self.txt_ca, self.mapping_txt, mask=mask,
                               deterministic=deterministic)
        inter.update(lca_inter, local=local)
        return l2_normalize(g + self.head_txt(local)), inter

    # ------------------------------------------------------------------------------------
    def encode_image(self, images, *, deterministic: bool = True, train_prior_bn: bool = False):
        """Images (B, H, W, 3) NHWC, CLIP-normalised -> (embedding (B, D), intermediates).

        `train_prior_bn`: the training step passes True to mirror the reference, whose frozen
        ResNet still runs BatchNorm in train mode (§7 Q3; ignored when prior_bn_mode is
        "inference"). This updates the prior's `BatchStat` variables.
        """
        if self.vision_encoder is None or (self.conv_encoder is None and not self.config.is_baseline):
            raise ValueError("encode_image needs the Swin and ResNet configs; use fuse_image for a heads-only model")
        vision_tokens, _ = self.vision_encoder(images, deterministic=deterministic)
        conv_feat = None
        if not self.config.is_baseline:
            conv_feat = self.conv_encoder(images, train=train_prior_bn)
            if not self.config.finetune_prior:
                conv_feat = jax.lax.stop_gradient(conv_feat)
        return self.fuse_image(vision_tokens, conv_feat, deterministic=deterministic)

    def encode_text(self, input_ids, *, deterministic: bool = True, attention_mask=None):
        """Token ids (B, L) ([CLS] first, no [SEP], right-padded with 0) -> (embedding, intermediates).

        Mirroring the reference (§7 Q5), `attention_mask` is ignored unless `text_mask` is on,
        so embeddings depend on the padded length.
        """
        if self.text_encoder is None:
            raise ValueError("encode_text needs the BERT config; use fuse_text for a heads-only model")
        mask = attention_mask if self.config.text_mask else None
        hidden = self.text_encoder(input_ids, mask, deterministic=deterministic)
        return self.fuse_text(hidden, attention_mask=mask, deterministic=deterministic)
