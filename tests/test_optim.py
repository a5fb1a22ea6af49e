"""The optimizer a recipe describes, against hand computations: the schedules' shapes (linear
and step decay), the parameter groups and what decays, momentum, EMA of the weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax.core.models import create_model, init_variables
from kd_jax.core.optim import Recipe, make_optimizer, make_schedule, param_groups
from kd_jax.core.steps import create_state
from kd_jax.errors import KdError


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
    return create_state(model, variables, make_optimizer(recipe, 10)[0], recipe.ema_decay,
                        recipe.lookahead_steps, recipe.lookahead_alpha,
                        10 if recipe.lookahead_ramp else 0)


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
    # Biases start at 0, where decay is invisible: move every parameter off its init first.
    state = state.replace(params=jax.tree.map(lambda p: p + 0.3, state.params))
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


@pytest.mark.parametrize("ramp", [False, True])
def test_lookahead_syncs_slow_and_fast_weights_every_k_steps(ramp):
    """Zhang et al. 2019, Algorithm 1, on parameters and BatchNorm statistics alike: k fast
    steps, then slow += alpha (fast - slow) and fast = slow; with the ramp, over a run of 10
    steps, the alpha of step t is airbench94's 1 - (1 - alpha) (t / 10)^3. Every step here
    moves each trained parameter by -1 (SGD, lr 1, unit gradients, no decay) and each
    statistic by +1; the frozen whitening layer never moves."""
    k, alpha, steps = 3, 0.25, 7
    state = model_state(weight_decay=0.0, lookahead_steps=k, lookahead_alpha=alpha,
                        lookahead_ramp=ramp)
    grads = jax.tree.map(jnp.ones_like, state.params)
    fast = {**{f"params/{n}": np.asarray(p) for n, p in flat(state.params).items()},
            **{f"stats/{n}": np.asarray(s) for n, s in flat(state.batch_stats).items()}}
    slow = dict(fast)
    for t in range(1, steps + 1):
        stats = jax.tree.map(lambda s: s + 1.0, state.batch_stats)
        state = state.apply_gradients(grads=grads, batch_stats=stats)
        for name in fast:
            frozen = name.startswith("params/Whitening")
            fast[name] = fast[name] + (0.0 if frozen else 1.0 if name[0] == "s" else -1.0)
            if t % k == 0:
                alpha_t = 1 - (1 - alpha) * (t / 10) ** 3 if ramp else alpha
                slow[name] = slow[name] + alpha_t * (fast[name] - slow[name])
                fast[name] = slow[name]
    for kind, tree, expected in (("params", state.params, fast), ("stats", state.batch_stats, fast),
                                 ("params", state.slow_params, slow),
                                 ("stats", state.slow_batch_stats, slow)):
        for name, value in flat(tree).items():
            np.testing.assert_allclose(np.asarray(value), expected[f"{kind}/{name}"],
                                       rtol=1e-6, atol=1e-6, err_msg=name)
    # After 7 steps the fast weights have moved one step past the second sync.
    bias, slow_bias = (flat(tree)["Dense_0/bias"] for tree in (state.params, state.slow_params))
    assert not np.allclose(bias, slow_bias)


def values(schedule, steps):
    return np.asarray([float(schedule(t)) for t in steps])


def test_linear_schedule_is_the_warmup_then_linear_decay_it_always_was():
    """The default: exactly the two optax pieces the recipe was built from before a step
    schedule existed (a bit-for-bit guard on every earlier run's learning rates)."""
    recipe, total = Recipe(1.6, warmup_fraction=0.2, final_lr_factor=0.1), 500
    before = optax.join_schedules([optax.linear_schedule(1.6 / 100, 1.6, 100),
                                   optax.linear_schedule(1.6, 0.16, 400)], [100])
    steps = range(0, total + 1, 7)
    np.testing.assert_array_equal(values(make_schedule(recipe, total), steps),
                                  values(before, steps))
    assert float(make_schedule(recipe, total)(100)) == pytest.approx(1.6)


def mdistiller_lr(epoch_from_1, base=0.05, stages=(150, 180, 210), rate=0.1):
    """mdistiller's adjust_learning_rate (RepDistiller's is the same rule)."""
    return base * rate ** np.sum(epoch_from_1 > np.asarray(stages))


def test_step_schedule_is_the_benchmarks_step_decay():
    per_epoch = 7
    recipe = Recipe(0.05, warmup_fraction=0.0, lr_schedule="step",
                    lr_decay_epochs=(150, 180, 210), lr_decay_factor=0.1)
    schedule = make_schedule(recipe, 240 * per_epoch, per_epoch)
    steps = np.arange(240 * per_epoch)
    expected = [mdistiller_lr(t // per_epoch + 1) for t in steps]
    np.testing.assert_allclose(values(schedule, steps), expected, rtol=1e-6)
    assert float(schedule(150 * per_epoch - 1)) == pytest.approx(0.05)
    assert float(schedule(150 * per_epoch)) == pytest.approx(0.005)
    assert float(schedule(210 * per_epoch)) == pytest.approx(0.05e-3)


def test_step_schedule_keeps_its_epochs_after_a_warmup():
    per_epoch = 10
    recipe = Recipe(0.1, warmup_fraction=0.1, lr_schedule="step", lr_decay_epochs=(5, 8),
                    lr_decay_factor=0.5)
    schedule = make_schedule(recipe, 10 * per_epoch, per_epoch)
    assert float(schedule(0)) == pytest.approx(0.01)  # the warmup's first tenth
    assert float(schedule(10)) == pytest.approx(0.1)
    assert float(schedule(49)) == pytest.approx(0.1)
    assert float(schedule(50)) == pytest.approx(0.05)
    assert float(schedule(80)) == pytest.approx(0.025)


def test_step_schedule_needs_the_epoch_length():
    with pytest.raises(ValueError, match="a step schedule needs steps_per_epoch"):
        make_schedule(Recipe(lr_schedule="step", lr_decay_epochs=(3,)), 100)
    with pytest.raises(KdError, match="lr_schedule must be linear or step, got 'cosine'"):
        Recipe(lr_schedule="cosine")


@pytest.mark.parametrize(("nesterov", "factor"), [(True, 1.9), (False, 1.0)])
def test_momentum_is_nesterov_or_heavy_ball(nesterov, factor):
    """First update from a zero trace: heavy ball (PyTorch's default) steps by lr * g,
    Nesterov by lr * (1 + momentum) * g."""
    params = {"Dense_0": {"kernel": jnp.ones((2, 3))}}
    recipe = Recipe(0.1, momentum=0.9, weight_decay=0.0, warmup_fraction=0.0,
                    nesterov=nesterov)
    tx, _ = make_optimizer(recipe, 10)
    grads = jax.tree.map(lambda p: 2.0 * p, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["Dense_0"]["kernel"], -0.1 * factor * 2.0, rtol=1e-6)
