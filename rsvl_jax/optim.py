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
