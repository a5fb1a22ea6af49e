"""The learning-rate schedules and the momentum of :class:`kd_jax.core.optim.Recipe`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax.core.optim import Recipe, make_optimizer, make_schedule


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
    with pytest.raises(ValueError, match="lr_schedule must be linear or step, got 'cosine'"):
        make_schedule(Recipe(lr_schedule="cosine"), 100)


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
