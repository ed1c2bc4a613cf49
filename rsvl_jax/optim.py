"""Optimisers as the references build them: parameter groups, frozen subtrees, schedules.

Parameter groups are decided on the *PyTorch* names of our parameters (taken from the
family's conversion table), because the references' rules are substring matches on those
names (PIR.md §4.2, quirk Q12) and mirroring them on our own names would drift silently.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rsvl_jax.convert.core import path_str

# PIR's optim.py: no weight decay for any name containing one of these substrings. It also
# catches Swin's `relative_position_bias_table` ("bias") while FFN LayerNorm scales
# (`ffn.1.weight`) and the temperatures are decayed (Q12) - mirrored on purpose.
PIR_NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight",
                "norm1.bias", "norm1.weight", "norm2.bias", "norm2.weight")


def label_tree(params: nnx.State, label: Callable[[str], str]):
    """A pytree of labels (for `optax.multi_transform`) from a function of the dotted path."""
    flat = {path: label(path_str(path)) for path, _ in params.flat_state()}
    return nnx.State.from_flat_path(flat)


def pir_labels(params: nnx.State, names: Mapping[str, str], frozen_prefixes=("conv_encoder",)):
    """'frozen' for the prior encoder, else 'decay' / 'no_decay' by the reference's rule."""

    def label(path: str) -> str:
        if any(path == p or path.startswith(p + ".") for p in frozen_prefixes):
            return "frozen"
        torch_name = names.get(path, path)
        return "no_decay" if any(s in torch_name for s in PIR_NO_DECAY) else "decay"

    return label_tree(params, label)


def linear_warmup_decay(peak: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """PIR's scheduler.py: lr_k = peak * (k / W if k < W else (T - k) / (T - W)), clipped at 0.

    Step 0 has lr 0 (as the reference).
    """
    w, t = max(1, warmup_steps), total_steps

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        up = step / w
        down = jnp.maximum(0.0, (t - step) / max(1, t - warmup_steps))
        return peak * jnp.where(step < warmup_steps, up, down)

    return schedule


def pir_optimizer(labels, schedule: optax.Schedule, *, b1: float, b2: float, eps: float,
                  weight_decay: float, grad_clip: float = 0.0) -> optax.GradientTransformation:
    """AdamW (betas 0.9/0.98, eps 1e-8, decoupled decay 0.01 on the 'decay' group), frozen
    prior. optax adds eps to sqrt(v_hat) where HF's AdamW adds it to sqrt(v) (Q17); with
    Adam's scale invariance the difference only shows in the first steps."""
    adam = lambda wd: optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd)  # noqa: E731
    tx = optax.multi_transform(
        {"decay": adam(weight_decay), "no_decay": adam(0.0), "frozen": optax.set_to_zero()}, labels)
    if grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
    return tx


def global_norm(tree) -> jax.Array:
    return optax.global_norm(tree)


# ----------------------------------------------------------------------------------------
# BITA (spec BITA §8): LAVIS's runner, AdamW in two groups, per-(epoch, iteration) schedule.
# ----------------------------------------------------------------------------------------
# LAVIS/BITA runner: no weight decay if ndim < 2 or one of these substrings is in the name.
BITA_NO_DECAY = ("bias", "ln", "bn")


def linear_warmup_cosine_lr(init_lr: float, min_lr: float, warmup_lr: float, warmup_steps: int,
                            max_epoch: int, iters_per_epoch: int) -> optax.Schedule:
    """LAVIS's `LinearWarmupCosineLRScheduler` as a function of the global step (§8.2).

    The reference sets the lr per iteration from (epoch e, iteration i) with
    e = step // iters_per_epoch and i = step % iters_per_epoch:

    * e == 0: min(init_lr, warmup_lr + (init_lr - warmup_lr) * i / max(warmup_steps, 1));
    * e >= 1: min_lr + (init_lr - min_lr) * (1 + cos(pi * e / max_epoch)) / 2, constant
      within the epoch.

    Quirk Q12, mirrored: the warm-up lives only in epoch 0, so with warmup_steps >
    iters_per_epoch it is cut short and the lr jumps to the epoch-1 cosine value.
    """
    if iters_per_epoch < 1:
        raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch}")
    ipe, w = int(iters_per_epoch), max(int(warmup_steps), 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.int32)
        epoch = (step // ipe).astype(jnp.float32)
        i = (step % ipe).astype(jnp.float32)
        warm = jnp.minimum(init_lr, warmup_lr + (init_lr - warmup_lr) * i / w)
        cosine = min_lr + (init_lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / max_epoch))
        return jnp.where(epoch == 0, warm, cosine)

    return schedule


def bita_labels(params: nnx.State, names: Mapping[str, str], unused: tuple[str, ...] = ()) -> nnx.State:
    """'decay' / 'no_decay' / 'frozen' per parameter of BITA's trainable tree (§8.1, Q14).

    `names`: our path -> the reference (PyTorch) name, `rsvl_jax.convert.bita.reference_names`.
    The reference's rule runs on those names: no decay if ndim < 2 or the name contains "bias",
    "ln" or "bn" (so every LayerNorm, bias, `ln_vision.*` and `temp`), decay otherwise (weight
    matrices, embeddings, `query_tokens`).

    `params` may be the whole model's trainable state (paths `bridge.…`) or the bridge's own
    state (paths `qformer.…`): a path not in `names` is looked up as `bridge.<path>`. A path
    that has no reference name at all is an error (a rule on our own names would drift).

    `unused`: path prefixes (our names) of parameters that never get a gradient; torch AdamW
    skips them, so they get 'frozen' (give it `optax.set_to_zero`, as `bita_optimizer` does).
    Our BITA models do not build the two such modules of the reference (stage-1 `itm_head`,
    the IFT's MLM head), so the default is none.
    """
    def is_unused(path: str) -> bool:
        return any(path == p or path.startswith(p + ".") for p in unused)

    flat, missing = {}, []
    for path, var in params.flat_state():
        p = path_str(path)
        if is_unused(p):
            flat[path] = "frozen"
            continue
        torch_name = names.get(p, names.get(f"bridge.{p}"))
        if torch_name is None:
            missing.append(p)
            continue
        ndim = len(var.shape)
        no_decay = ndim < 2 or any(s in torch_name for s in BITA_NO_DECAY)
        flat[path] = "no_decay" if no_decay else "decay"
    if missing:
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise ValueError(f"bita_labels: {len(missing)} parameters have no reference name (give only the "
                         "trainable tree, or name them in `unused`):\n  " + "\n  ".join(missing[:20]) + more)
    return nnx.State.from_flat_path(flat)


def bita_optimizer(labels, schedule: optax.Schedule, *, weight_decay: float = 0.05, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """torch.optim.AdamW as BITA's runner builds it (§8.1): betas (0.9, 0.999), eps 1e-8,
    decoupled decay p <- p - lr * wd * p with the scheduled lr on the 'decay' group, none on
    'no_decay', no update at all on 'frozen'. torch's AdamW adds eps to sqrt(v_hat) like
    optax does, so the two agree step for step. No clipping, no accumulation (§8.1)."""
    adam = lambda wd: optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd)  # noqa: E731
    return optax.multi_transform(
        {"decay": adam(weight_decay), "no_decay": adam(0.0), "frozen": optax.set_to_zero()}, labels)
