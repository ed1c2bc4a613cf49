"""Optimiser groups and schedule against the reference (PIR.md §4, fixtures/pir/param_groups.txt)."""
import re

import jax
import numpy as np
import optax
from flax import nnx

from rsvl_jax import optim
from rsvl_jax.convert import pir as pir_convert
from rsvl_jax.models import pir as pir_lib


def _fixture_groups(path):
    groups = {}
    for line in path.read_text().splitlines():
        m = re.match(r"== (\w+): (\d+) tensors, (\d+) params", line)
        if m:
            groups[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return groups


def test_pir_param_groups_match_reference(fixtures_dir):
    """Decay / no-decay / frozen partition of the paper model equals the reference's optim.py."""
    cfg = pir_lib.PRESETS["pir_swin_t"]
    _, abstract = jax.eval_shape(lambda: nnx.split(pir_lib.PIR(cfg, rngs=nnx.Rngs(0))))
    params = abstract.filter(nnx.Param)
    labels = optim.pir_labels(params, pir_convert.reference_names(cfg))
    counts = {}
    for (path, label), (_, var) in zip(labels.flat_state(), params.flat_state()):
        n, size = counts.get(label, (0, 0))
        counts[label] = (n + 1, size + int(np.prod(var.shape)))
    assert counts == _fixture_groups(fixtures_dir / "pir" / "param_groups.txt")


def test_schedule_matches_reference_formula():
    """Linear warm-up then linear decay; step 0 has lr 0 (PIR.md §4.4)."""
    total = 50 * -(-17175 // 256)  # RSITMD, 2 GPUs x 128: 68 scheduled steps per epoch
    assert total == 3400
    sched = optim.linear_warmup_decay(6e-5, total, int(0.1 * total))
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(170)), 6e-5 * 170 / 340, rtol=1e-6)
    np.testing.assert_allclose(float(sched(340)), 6e-5, rtol=1e-6)
    np.testing.assert_allclose(float(sched(3349)), 6e-5 * (3400 - 3349) / (3400 - 340), rtol=1e-5)
    assert float(sched(3400)) == 0.0


def test_frozen_group_gets_no_update_and_no_decay_group_is_not_decayed():
    params = nnx.State({"conv_encoder": {"w": nnx.Param(np.ones(3, np.float32))},
                        "head": {"kernel": nnx.Param(np.ones(3, np.float32)),
                                 "bias": nnx.Param(np.ones(3, np.float32))}})
    names = {"conv_encoder.w": "conv_encoder.0.weight", "head.kernel": "head.weight", "head.bias": "head.bias"}
    labels = optim.pir_labels(params, names)
    tx = optim.pir_optimizer(labels, optax.constant_schedule(0.1), b1=0.9, b2=0.98, eps=1e-8,
                             weight_decay=0.5)
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["conv_encoder"]["w"][...], 1.0)  # frozen
    np.testing.assert_array_equal(new["head"]["bias"][...], 1.0)  # zero grad, no decay
    np.testing.assert_allclose(new["head"]["kernel"][...], 1.0 - 0.1 * 0.5, rtol=1e-6)  # decayed
