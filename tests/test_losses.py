import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.core.losses import cross_entropy, distillation_loss, make_loss, tempered_kl


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def numpy_kd(student, teacher, t):
    """T^2 * sum_c p_c (log p_c - log q_c), averaged over the batch, in float64."""
    p, q = softmax(teacher / t), softmax(student / t)
    return t**2 * np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1))


@pytest.mark.parametrize(("t", "rtol"), [(0.5, 1e-5), (1.0, 1e-5), (4.0, 1e-5), (20.0, 1e-4),
                                          (1000.0, 1e-3)])
def test_tempered_kl_matches_numpy(t, rtol):
    # float32 loses digits as T grows: log p - log q shrinks like 1/T while T^2 scales it back.
    rng = np.random.default_rng(0)
    s, v = rng.normal(0, 3, (16, 10)), rng.normal(0, 3, (16, 10))
    got = float(tempered_kl(jnp.asarray(s, jnp.float32), jnp.asarray(v, jnp.float32), t))
    np.testing.assert_allclose(got, numpy_kd(s, v, t), rtol=rtol)


def test_kl_is_summed_over_classes_not_averaged():
    # A class-averaged KL would be 10x smaller than the paper's sum.
    s, v = np.zeros((1, 10)), np.eye(10)[:1] * 5
    assert float(tempered_kl(jnp.asarray(s), jnp.asarray(v), 1.0)) == pytest.approx(
        numpy_kd(s, v, 1.0), rel=1e-5)


@pytest.mark.parametrize("t", [1.0, 2.0, 8.0])
def test_gradient_is_t_times_q_minus_p_over_batch(t):
    """Paper eq. 2: dC/dz = (q - p) / T; times the T^2 factor, T (q - p); mean over the batch."""
    rng = np.random.default_rng(1)
    s, v = rng.normal(0, 2, (8, 10)), rng.normal(0, 2, (8, 10))
    grad = jax.grad(tempered_kl)(jnp.asarray(s, jnp.float32), jnp.asarray(v, jnp.float32), t)
    expected = t * (softmax(s / t) - softmax(v / t)) / len(s)
    np.testing.assert_allclose(np.asarray(grad), expected, atol=1e-6)


def test_high_temperature_gradient_approaches_logit_matching():
    """With zero-mean logits and large T, T^2 * dC/dz -> (z - v) / N (paper, section 2.1)."""
    rng = np.random.default_rng(2)
    s, v = rng.normal(0, 1, (4, 10)), rng.normal(0, 1, (4, 10))
    s, v = s - s.mean(-1, keepdims=True), v - v.mean(-1, keepdims=True)
    limit = (s - v) / 10
    error = lambda t: np.abs(np.asarray(jax.grad(tempered_kl)(
        jnp.asarray(s), jnp.asarray(v), t)) * len(s) - limit).max()
    assert error(500.0) < 1e-3 and error(5.0) > 1e-2
    assert error(500.0) < error(50.0) < error(5.0)


def test_kl_is_zero_when_student_equals_teacher():
    z = jnp.asarray(np.random.default_rng(3).normal(0, 4, (5, 10)), jnp.float32)
    assert float(tempered_kl(z, z, 4.0)) == pytest.approx(0.0, abs=1e-6)


def test_hinton_mix_weights_the_soft_and_hard_terms():
    rng = np.random.default_rng(4)
    s, v = jnp.asarray(rng.normal(0, 2, (6, 10))), jnp.asarray(rng.normal(0, 2, (6, 10)))
    labels = jnp.asarray(rng.integers(0, 10, 6))
    target = jax.nn.log_softmax(v / 4.0)
    mixed = distillation_loss(s, target, make_loss("kd", 4.0), 0.7, labels)
    expected = 0.7 * tempered_kl(s, v, 4.0) + 0.3 * cross_entropy(s, labels)
    assert float(mixed) == pytest.approx(float(expected), rel=1e-6)


def test_alpha_one_refuses_labels_and_alpha_below_one_needs_them():
    z, kd = jnp.zeros((2, 10)), make_loss("kd", 4.0)
    with pytest.raises(ValueError, match="pass no labels"):
        distillation_loss(z, z, kd, 1.0, jnp.zeros(2, int))
    with pytest.raises(ValueError, match="labels are needed"):
        distillation_loss(z, z, kd, 0.5)


def test_cross_entropy_with_label_smoothing_matches_numpy():
    rng = np.random.default_rng(5)
    z, y = rng.normal(0, 2, (7, 10)), rng.integers(0, 10, 7)
    target = np.full((7, 10), 0.1 / 10) + 0.9 * np.eye(10)[y]
    expected = -np.mean(np.sum(target * np.log(softmax(z)), -1))
    got = float(cross_entropy(jnp.asarray(z, jnp.float32), jnp.asarray(y), 0.1))
    assert got == pytest.approx(expected, rel=1e-5)
