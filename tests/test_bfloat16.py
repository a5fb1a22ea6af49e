"""bfloat16 compute keeps float32 parameters and optimizer state, and still learns."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.core.models import create_model, init_variables
from kd_jax.core.optim import Recipe, make_optimizer
from kd_jax.core.steps import create_state, hinton_step, make_teacher_step

SHAPE = (8, 8, 3)


def batch():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(16, *SHAPE)), jnp.float32)
    return images, jnp.asarray(rng.integers(0, 10, 16), jnp.int32)


def fresh_state(dtype):
    model = create_model("resnet8", 10, 4, dtype)
    tx, _ = make_optimizer(Recipe(0.05, weight_decay=5e-4, warmup_fraction=0), 1000)
    return model, create_state(model, init_variables(model, SHAPE, 0), tx)


@pytest.mark.parametrize("kind", ["teacher", "distill"])
def test_bfloat16_steps_are_finite_and_learn(kind):
    images, labels = batch()
    model, state = fresh_state(jnp.bfloat16)
    if kind == "teacher":
        step = make_teacher_step()
        args = (images, labels)
    else:
        teacher = create_model("resnet8", 10, 8, jnp.bfloat16)
        step = hinton_step(teacher.apply, init_variables(teacher, SHAPE, 1), 4.0)
        args = (images,)
    jitted = jax.jit(lambda s, *a: step(s, *a, jax.random.key(0)))
    losses = []
    for _ in range(8):
        state, metrics = jitted(state, *args)
        losses.append(float(next(v for k, v in metrics.items() if k.endswith("loss"))))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses
    # compute ran in bf16, but what is stored (params, momentum, BN statistics) stays f32
    for leaf in jax.tree.leaves((state.params, state.opt_state, state.batch_stats)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32


def test_bfloat16_really_computes_in_bfloat16():
    """Every convolution and matrix product multiplies bf16 operands (on CPU most convolutions
    are matrix products, see kd_jax.core.conv; their sums may be float32)."""
    model, state = fresh_state(jnp.bfloat16)
    hlo = jax.jit(lambda v, x: model.apply(v, x)).lower(
        {"params": state.params, "batch_stats": state.batch_stats}, batch()[0]).as_text()
    products = [line for line in hlo.splitlines()
                if "stablehlo.convolution" in line or "stablehlo.dot_general" in line]
    assert any("convolution" in line for line in products)
    assert any("dot_general" in line for line in products)
    for line in products:
        operands = line.rsplit(" : (", 1)[1].split(") ->")[0]
        assert operands.count("xbf16>") == 2 and "f32" not in operands, line
