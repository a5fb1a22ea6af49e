"""The optimizer a recipe describes, against hand computations: the schedule's shape, the
parameter groups and what decays, EMA of the weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.core.models import create_model, init_variables
from kd_jax.core.optim import Recipe, make_optimizer, make_schedule, param_groups
from kd_jax.core.steps import create_state


def hand_schedule(step: int, peak: float, total: int, warmup: int, final: float) -> float:
    """Linear from peak / warmup at step 0 to the peak at ``warmup``, then linear to
    ``final * peak`` at ``total``."""
    if step < warmup:
        return peak / warmup + (peak - peak / warmup) * step / warmup
    return peak + (final * peak - peak) * (step - warmup) / (total - warmup)


@pytest.mark.parametrize(("total", "fraction", "final", "warmup"), [
    (100, 0.2, 0.0, 20), (870, 0.2, 0.0, 174), (50, 0.1, 0.07, 5),
    (3, 0.99, 0.0, 2),  # the clamp: a warmup never reaches the last step
])
def test_schedule_warms_up_then_decays(total, fraction, final, warmup):
    schedule = make_schedule(Recipe(learning_rate=1.6, warmup_fraction=fraction,
                                    final_lr_factor=final), total)
    got = [float(schedule(t)) for t in range(total + 1)]
    expected = [hand_schedule(t, 1.6, total, warmup, final) for t in range(total + 1)]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert max(got) == pytest.approx(1.6) and got[-1] == pytest.approx(final * 1.6, abs=1e-7)


def test_a_two_epoch_run_still_decays():
    """Warmup is a fraction of the run: 2 epochs of 12 steps peak at step 5 and end near 0."""
    schedule = make_schedule(Recipe(learning_rate=0.2), 24)
    assert float(schedule(23)) < 0.02 and int(np.argmax([schedule(t) for t in range(24)])) == 5


def model_state(**settings):
    model = create_model("resnet8", 10, 4, whiten_patch=2)
    variables = init_variables(model, (32, 32, 3), 0)
    recipe = Recipe(learning_rate=1.0, momentum=0.0, warmup_fraction=0, final_lr_factor=1.0,
                    **settings)
    return create_state(model, variables, make_optimizer(recipe, 10)[0], recipe.ema_decay)


def flat(tree) -> dict:
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_parameter_groups_of_a_resnet():
    groups = flat(param_groups(model_state().params))
    assert groups["Dense_0/kernel"] == groups["Dense_0/bias"] == "head"
    assert groups["Whitening/Conv_0/kernel"] == "frozen"
    assert groups["Conv_0/kernel"] == "kernel"
    assert {g for k, g in groups.items() if "BatchNorm" in k} == {"bn"}
    assert set(groups.values()) == {"head", "frozen", "kernel", "bn"}


def one_update(state, grads_value: float = 1.0) -> dict:
    """The update of one SGD step (momentum 0, lr 1) with every gradient ``grads_value``."""
    grads = jax.tree.map(lambda p: jnp.full_like(p, grads_value), state.params)
    updates, _ = state.tx.update(grads, state.opt_state, state.params)
    return flat(updates)


def test_weight_decay_reaches_kernels_only_and_groups_take_their_lr():
    """update = -lr_g * (g + wd_g * p): kernels (the head's too) decay, BN parameters and
    biases do not unless bn_weight_decay says so; each group's lr is scaled by its factor;
    the whitening layer never moves."""
    state = model_state(weight_decay=0.1, bn_lr_factor=4.0, head_lr_factor=0.5,
                        bn_weight_decay=0.01)
    params, updates = flat(state.params), one_update(state)
    for name, update in updates.items():
        p = np.asarray(params[name])
        if name.startswith("Whitening"):
            expected = np.zeros_like(p)
        elif name == "Dense_0/kernel":
            expected = -0.5 * (1 + 0.1 * p)
        elif name == "Dense_0/bias":
            expected = -0.5 * np.ones_like(p)
        elif "BatchNorm" in name:
            expected = -4.0 * (1 + 0.01 * p)
        else:
            expected = -(1 + 0.1 * p)
        np.testing.assert_allclose(np.asarray(update), expected, rtol=1e-6, err_msg=name)


def test_ema_of_weights_and_statistics_follows_the_ramped_decay():
    """ema_t = ema + (1 - d_t) (p_t - ema) with d_t = min(decay, (1 + t) / (10 + t))."""
    state = model_state(ema_decay=0.9)
    grads = jax.tree.map(jnp.ones_like, state.params)
    expected = flat(state.params)
    for t in range(3):
        state = state.apply_gradients(grads=grads)
        decay = min(0.9, (1 + t) / (10 + t))
        now = flat(state.params)
        expected = {k: e + (1 - decay) * (np.asarray(now[k]) - e) for k, e in expected.items()}
    for name, average in flat(state.ema_params).items():
        np.testing.assert_allclose(np.asarray(average), expected[name], rtol=1e-5, atol=1e-6)
    assert state.inference_variables()["params"] is state.ema_params
