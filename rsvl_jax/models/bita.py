"""BITA: the stage-1 contrastive model and BITA-OPT, the captioning prefix LM (spec BITA §0-5).

Both models are frozen encoders around one trainable `bridge`:

* `BITAStage1` = `visual_encoder` (frozen CLIP ViT, §1) + `Stage1Bridge` (`ln_vision`, the IFT
  Q-Former with its query tokens and text side, `vision_proj`, `text_proj`, `temp`), trained
  with the query-max ITC loss (§3).
* `BITAOPT` = `visual_encoder` + `OPTBridge` (`ln_vision`, the IFT query path, `opt_proj`) +
  `opt_model` (frozen OPT, §4): the 32 projected query outputs are a prefix of OPT input
  embeddings; LM loss on prompt + caption (§4.2) and beam-search captioning (§5).

Why a bridge submodule: BITA checkpoints hold exactly the trainable parameters (frozen ViT and
OPT are not saved, §10.1), so the bridge's variable tree *is* the checkpoint, the converter
fills it strictly (`rsvl_jax.convert.bita`), and the optimiser's trainable set is one subtree.

The stage-1 `itm_head` and the IFT's MLM head exist in the reference but never get a gradient
(§3 step 8); they are not built (the converter drops them by named rules).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rsvl_jax import decoding
from rsvl_jax.losses import bita_itc_loss, bita_itc_similarities, token_cross_entropy
from rsvl_jax.models import layers
from rsvl_jax.models.opt import OPT, OPTConfig
from rsvl_jax.models.opt import PRESETS as OPT_PRESETS
from rsvl_jax.models.pae import torch_dense
from rsvl_jax.models.qformer import PRESETS as QFORMER_PRESETS
from rsvl_jax.models.qformer import QFormer, QFormerConfig
from rsvl_jax.models.vit import PRESETS as VIT_PRESETS
from rsvl_jax.models.vit import ViTConfig, VisionTransformer

IGNORE = -100  # HF's ignore index for LM targets


@dataclasses.dataclass(frozen=True)
class BITAConfig:
    vit: ViTConfig = VIT_PRESETS["clip_vit_l14_bita"]
    qformer: QFormerConfig = QFORMER_PRESETS["bita_ift"]
    opt: OPTConfig | None = None  # BITA-OPT only
    embed_dim: int = 256  # stage-1 ITC feature size (vision_proj / text_proj)
    max_txt_len: int = 32  # stage 1: BERT ids padded to exactly this; stage 2: OPT ids (BOS included) <= this
    temp_init: float = 0.07
    # Fix offered, off by default: BITA never clamps its temperature (§3 step 5); BLIP's clamp is (0.001, 0.5).
    temp_clamp: tuple[float, float] | None = None
    label_smoothing: float = 0.1  # ITC only (Q21)
    # The reference gathers the other side without gradient (§3, Q3); False lets it flow both ways.
    itc_stop_gradient_other: bool = True
    prompt: str = ""  # BITA-OPT: "" (stage 2) or "a photo of" (caption fine-tune, no trailing space: Q7)
    freeze_vit: bool = True
    freeze_opt: bool = True
    dtype: Any = "float32"  # compute dtype of the projections; see `with_dtype` for the whole model

    def __post_init__(self):
        if self.qformer.encoder_width != self.vit.width:
            raise ValueError(f"qformer.encoder_width {self.qformer.encoder_width} != vit.width {self.vit.width}")

    def with_dtype(self, dtype) -> "BITAConfig":
        """The same model computing in `dtype` everywhere (parameters stay float32)."""
        rep = dataclasses.replace
        return rep(self, dtype=dtype, vit=rep(self.vit, dtype=dtype), qformer=rep(self.qformer, dtype=dtype),
                   opt=None if self.opt is None else rep(self.opt, dtype=jnp.dtype(dtype)))


_VIT_TEST = VIT_PRESETS["vit_test"]
_QF_TEST = dataclasses.replace(QFORMER_PRESETS["qformer_test"], encoder_width=_VIT_TEST.width)

PRESETS: dict[str, BITAConfig] = {
    # Stage 1 "bita_former": ViT-L/14 (21 blocks) + full IFT + ITC heads.
    "bita_stage1_vitl": BITAConfig(),
    # Stage 2 "bita_opt" pre-training: IFT without its text side, OPT-2.7B, empty prompt.
    "bita_opt_2_7b": BITAConfig(qformer=QFORMER_PRESETS["bita_ift_opt"], opt=OPT_PRESETS["opt_2_7b"], prompt=""),
    # Stage 3 caption fine-tune / evaluation: the same with the shipped prompt (Q7: no trailing space).
    "bita_caption_opt_2_7b": BITAConfig(qformer=QFORMER_PRESETS["bita_ift_opt"], opt=OPT_PRESETS["opt_2_7b"],
                                        prompt="a photo of"),
    # Tiny versions for tests (ViT of vit_tiny.npz, Q-Former of ift_tiny.npz at that ViT width).
    "bita_stage1_test": BITAConfig(vit=_VIT_TEST, qformer=_QF_TEST, embed_dim=16, max_txt_len=12),
    "bita_opt_test": BITAConfig(vit=_VIT_TEST, qformer=dataclasses.replace(_QF_TEST, text=False),
                                opt=OPT_PRESETS["opt_test"], max_txt_len=12),
}


def l2_normalize(x, eps: float = 1e-12):
    """F.normalize: x / max(||x||, eps), in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _path_str(path) -> str:
    return path if isinstance(path, str) else ".".join(str(p) for p in path)


class _Frozen:
    """`is_trainable` / `trainable_labels` / `trainable_filter` shared by both models.

    Frozen = `visual_encoder.*` (if `freeze_vit`) and `opt_model.*` (if `freeze_opt`), as in
    BITA (§1.4, §4.3). Differentiate the train step w.r.t. `trainable_filter()` only, so no
    gradient is ever computed for the frozen OPT weights, and give the optimiser
    `trainable_labels(params)` (with `optax.set_to_zero` on "frozen") as a second guard.
    """

    def is_trainable(self, path) -> bool:
        top = _path_str(path).split(".", 1)[0]
        cfg = self.config
        if top == "visual_encoder":
            return not cfg.freeze_vit
        if top == "opt_model":
            return not cfg.freeze_opt
        return True

    def trainable_labels(self, params: nnx.State) -> nnx.State:
        """'trainable' / 'frozen' per parameter, a State shaped like `params` (for optax.multi_transform)."""
        flat = {path: ("trainable" if self.is_trainable(path) else "frozen") for path, _ in params.flat_state()}
        return nnx.State.from_flat_path(flat)

    def trainable_filter(self):
        """An nnx filter selecting the trainable parameters (for nnx.split / nnx.grad `wrt`)."""
        return nnx.All(nnx.Param, lambda path, _: self.is_trainable(path))


def _vision_features(vit: VisionTransformer, norm: nnx.LayerNorm, images, frozen: bool):
    """`ln_vision(ViT(images))`; a frozen ViT gets no gradient (and jax skips its backward pass)."""
    x = vit(images)
    if frozen:
        x = jax.lax.stop_gradient(x)
    return norm(x.astype(jnp.float32)).astype(x.dtype)  # BITA's LayerNorm: fp32 math, input dtype out


# ----------------------------------------------------------------------------------------
# Stage 1
# ----------------------------------------------------------------------------------------
class Stage1Bridge(nnx.Module):
    """The stage-1 trainable part (= the stage-1 checkpoint minus unused heads and buffers)."""

    def __init__(self, config: BITAConfig, *, rngs: nnx.Rngs):
        if not config.qformer.text:
            raise ValueError("stage 1 needs the Q-Former's text side (qformer.text=True)")
        self.config = config
        dtype = jnp.dtype(config.dtype)
        d = config.qformer.hidden
        self.ln_vision = layers.layer_norm(config.vit.width, eps=config.vit.eps, rngs=rngs)
        self.qformer = QFormer(config.qformer, rngs=rngs)
        self.vision_proj = torch_dense(d, config.embed_dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.text_proj = torch_dense(d, config.embed_dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.temp = layers.param(rngs, nnx.initializers.constant(config.temp_init), (), ())

    def temperature(self):
        t = self.temp[...]
        return t if self.config.temp_clamp is None else jnp.clip(t, *self.config.temp_clamp)

    def query_features(self, image_embeds, *, deterministic: bool = True):
        """`ln_vision` output (B, Ni, Dv) -> L2-normalised per-query features (B, Nq, embed_dim)."""
        q = self.qformer.encode_queries(image_embeds, deterministic=deterministic)
        return l2_normalize(self.vision_proj(q))

    def text_features(self, input_ids, attention_mask=None, *, deterministic: bool = True):
        """(B, L) BERT ids -> L2-normalised [CLS] feature (B, embed_dim). BITA pads to exactly
        `max_txt_len` and the Fourier mixer sees the pads (Q2), so pad the same way."""
        t = self.qformer.encode_text(input_ids, attention_mask, deterministic=deterministic)
        return l2_normalize(self.text_proj(t[:, 0]))

    def itc(self, image_feats, text_feat):
        """(loss, {sim_i2t, sim_t2i, temp}) over the batch given (the global batch under jit)."""
        temp = self.temperature()
        cfg = self.config
        sim_i2t, sim_t2i = bita_itc_similarities(image_feats, text_feat, temp,
                                                 stop_gradient_other=cfg.itc_stop_gradient_other)
        loss = bita_itc_loss(image_feats, text_feat, temp, label_smoothing=cfg.label_smoothing,
                             stop_gradient_other=cfg.itc_stop_gradient_other)
        return loss, {"sim_i2t": sim_i2t, "sim_t2i": sim_t2i, "temp": temp}

    def itc_loss_from_embeds(self, image_embeds, input_ids, attention_mask=None, *, deterministic: bool = True):
        """Stage-1 loss from `ln_vision` outputs (cached / recorded image features)."""
        img = self.query_features(image_embeds, deterministic=deterministic)
        txt = self.text_features(input_ids, attention_mask, deterministic=deterministic)
        loss, aux = self.itc(img, txt)
        return loss, dict(aux, image_feats=img, text_feat=txt)


class BITAStage1(_Frozen, nnx.Module):
    """Stage 1 "bita_former": frozen ViT -> ln_vision -> IFT queries / IFT text -> ITC (§3).

    `visual_encoder` / `bridge` may be given already built (e.g. converted, see
    `rsvl_jax.convert.bita.load_bita_stage1`); missing parts are freshly initialised.
    """

    def __init__(self, config: BITAConfig, *, rngs: nnx.Rngs, visual_encoder: VisionTransformer | None = None,
                 bridge: Stage1Bridge | None = None):
        self.config = config
        self.visual_encoder = visual_encoder if visual_encoder is not None else VisionTransformer(config.vit, rngs=rngs)
        self.bridge = bridge if bridge is not None else Stage1Bridge(config, rngs=rngs)

    def image_embeds(self, images):
        """(B, H, W, 3) normalised images -> `ln_vision(ViT(images))` (B, 1 + N, Dv)."""
        return _vision_features(self.visual_encoder, self.bridge.ln_vision, images, self.config.freeze_vit)

    def image_features(self, images, *, deterministic: bool = True):
        """-> (B, Nq, embed_dim), L2-normalised per query."""
        return self.bridge.query_features(self.image_embeds(images), deterministic=deterministic)

    def text_features(self, input_ids, attention_mask=None, *, deterministic: bool = True):
        """-> (B, embed_dim), L2-normalised [CLS] feature."""
        return self.bridge.text_features(input_ids, attention_mask, deterministic=deterministic)

    def itc_loss(self, images, input_ids, attention_mask=None, *, deterministic: bool = True):
        """(loss, {sim_i2t, sim_t2i, temp, image_feats, text_feat}); training: deterministic=False."""
        return self.bridge.itc_loss_from_embeds(self.image_embeds(images), input_ids, attention_mask,
                                                deterministic=deterministic)


# ----------------------------------------------------------------------------------------
# Stage 2 / captioning
# ----------------------------------------------------------------------------------------
class OPTBridge(nnx.Module):
    """The BITA-OPT trainable part (= a stage-2 / caption checkpoint minus `position_ids`)."""

    def __init__(self, config: BITAConfig, *, rngs: nnx.Rngs):
        if config.opt is None:
            raise ValueError("BITA-OPT needs config.opt")
        self.config = config
        self.ln_vision = layers.layer_norm(config.vit.width, eps=config.vit.eps, rngs=rngs)
        self.qformer = QFormer(config.qformer, rngs=rngs)
        self.opt_proj = torch_dense(config.qformer.hidden, config.opt.embed_dim, (None, "embed"), rngs=rngs,
                                    dtype=jnp.dtype(config.dtype))

    def prefix(self, image_embeds, *, deterministic: bool = True):
        """`ln_vision` output -> OPT prefix embeddings (B, Nq, opt.embed_dim)."""
        return self.opt_proj(self.qformer.encode_queries(image_embeds, deterministic=deterministic))


def lm_targets(text_ids, text_mask, prompt_length: int = 0, pad_token_id: int = 1):
    """BITA's LM targets for the text columns (§4.2 step 5): pads -> -100, then the first
    `prompt_length` columns (BOS + prompt tokens) -> -100. `prompt_length=0` for an empty prompt:
    BITA then keeps BOS as a target (Q18). Pads are found by id (as the reference) or by mask."""
    text_ids = jnp.asarray(text_ids)
    pad = (text_ids == pad_token_id) | (jnp.asarray(text_mask) == 0)
    targets = jnp.where(pad, IGNORE, text_ids)
    if prompt_length:
        targets = targets.at[:, :prompt_length].set(IGNORE)
    return targets


class BITAOPT(_Frozen, nnx.Module):
    """BITA-OPT (stages 2 and 3): frozen ViT -> ln_vision -> IFT queries -> opt_proj -> frozen OPT."""

    def __init__(self, config: BITAConfig, *, rngs: nnx.Rngs, visual_encoder: VisionTransformer | None = None,
                 bridge: OPTBridge | None = None, opt_model: OPT | None = None):
        self.config = config
        self.visual_encoder = visual_encoder if visual_encoder is not None else VisionTransformer(config.vit, rngs=rngs)
        self.bridge = bridge if bridge is not None else OPTBridge(config, rngs=rngs)
        self.opt_model = opt_model if opt_model is not None else OPT(config.opt, rngs=rngs)

    def image_embeds(self, images):
        return _vision_features(self.visual_encoder, self.bridge.ln_vision, images, self.config.freeze_vit)

    def prefix_embeds(self, images, *, deterministic: bool = True):
        """(B, H, W, 3) -> `inputs_opt` (B, Nq, opt.embed_dim)."""
        return self.bridge.prefix(self.image_embeds(images), deterministic=deterministic)

    def _prompt_length(self, prompt_length):
        if prompt_length is not None:
            return int(prompt_length)
        if self.config.prompt == "":
            return 0
        raise ValueError(f"config.prompt is {self.config.prompt!r}: pass prompt_length, the number of OPT tokens of "
                         "BOS + prompt (rsvl_jax.data.bita_text.opt_prompt_length)")

    def lm_loss(self, images, text_ids, text_mask, *, prompt_length: int | None = None, deterministic: bool = True):
        """Causal LM loss on `[inputs_opt; embed(text_ids)]` (§4.2). Training: deterministic=False,
        which also turns on the frozen OPT's dropout (Q13, mirrored).

        text_ids / text_mask (B, T): OPT ids of BOS + prompt + caption + "\\n", right-padded
        (`rsvl_jax.data.bita_text.encode_opt_captions`). `prompt_length`: leading text columns
        that are not targets (None: 0 for an empty `config.prompt`, else required).
        Returns (loss, {"logits": (B, T, V) predictions of the text columns, "targets": (B, T)}).
        """
        prompt_length = self._prompt_length(prompt_length)
        opt = self.opt_model
        inputs_opt = self.prefix_embeds(images, deterministic=deterministic)
        b, nq = inputs_opt.shape[:2]
        embeds = jnp.concatenate([inputs_opt.astype(opt.config.dtype), opt.embed(text_ids)], axis=1)
        mask = jnp.concatenate([jnp.ones((b, nq), jnp.int32), jnp.asarray(text_mask, jnp.int32)], axis=1)
        h, _ = opt.hidden_states(inputs_embeds=embeds, attention_mask=mask, deterministic=deterministic)
        # HF's shift (logits[:, :-1] vs labels[:, 1:]) with -100 on all query columns: only the
        # last query position and the text positions but the last predict a target, so the LM
        # head runs on those T columns only (same loss, a fraction of the logits memory).
        logits = opt.logits(h[:, nq - 1:-1])
        targets = lm_targets(text_ids, text_mask, prompt_length, opt.config.pad_token_id)
        return token_cross_entropy(logits, targets, IGNORE), {"logits": logits, "targets": targets}

    # -- generation ------------------------------------------------------------------------
    def decode(self, images, prompt_ids, *, config: decoding.GenerationConfig, rng=None) -> decoding.GenerationOutput:
        """Traceable captioning (call inside your own jit). `prompt_ids`: OPT ids of BOS + prompt,
        (P,) shared by the batch (as BITA, §5 step 2) or (B, P) without padding."""
        inputs_opt = self.prefix_embeds(images)
        b = inputs_opt.shape[0]
        prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
        if prompt_ids.ndim == 1:
            prompt_ids = jnp.broadcast_to(prompt_ids[None], (b, prompt_ids.shape[0]))
        opt = self.opt_model
        prefix = jnp.concatenate([inputs_opt.astype(opt.config.dtype), opt.embed(prompt_ids)], axis=1)
        return decoding.decode(opt, prefix, None, config, rng)

    def generate_ids(self, images, prompt_ids, *, config: decoding.GenerationConfig | None = None,
                     rng=None) -> decoding.GenerationOutput:
        """Jitted `decode`: new tokens (B, max_new_tokens), eos included, then pads; see `GenerationOutput`."""
        config = config or decoding.GenerationConfig.bita(pad_token_id=self.config.opt.pad_token_id,
                                                          bos_token_id=self.config.opt.bos_token_id)
        graphdef, state = nnx.split(self)
        return _decode_jit(graphdef, state, jnp.asarray(images), jnp.asarray(prompt_ids, jnp.int32), rng, config=config)


@functools.partial(jax.jit, static_argnames=("graphdef", "config"))
def _decode_jit(graphdef, state, images, prompt_ids, rng, config):
    return nnx.merge(graphdef, state).decode(images, prompt_ids, config=config, rng=rng)


def zero_pad_row_grad(grads: nnx.State, pad_id: int = 0) -> nnx.State:
    """Zero the gradient of the Q-Former's [PAD] word-embedding row, as torch's
    `nn.Embedding(padding_idx=0)` does (Q14; stage 1 only, a no-op without a text side)."""
    flat = []
    for path, g in grads.flat_state():
        if _path_str(path).endswith("qformer.embeddings.word_embeddings.embedding"):
            if isinstance(g, nnx.Variable):
                g = g.replace(g.get_value().at[pad_id].set(0.0))
            else:
                g = g.at[pad_id].set(0.0)
        flat.append((path, g))
    return nnx.State.from_flat_path(flat)


__all__ = ["BITAConfig", "PRESETS", "BITAStage1", "Stage1Bridge", "BITAOPT", "OPTBridge", "lm_targets",
           "l2_normalize", "zero_pad_row_grad"]
