import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import finite_differences, softmax

from kd_jax.core.losses import (
    cross_entropy,
    decoupled_kl,
    dist_loss,
    distillation_loss,
    dkd_loss,
    kd_loss,
    make_loss,
    standardize,
    tempered_kl,
    warmup_factor,
)
from kd_jax.core.teachers import target_log_probs
from kd_jax.errors import KdError


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


# --------------------------------------------------------------------------- numpy references
def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def numpy_dkd(student, teacher, labels, t, alpha=1.0, beta=8.0):
    """Zhao et al. (2022) from their equations, in float64: b = [p_gt, 1 - p_gt] for TCKD;
    for NCKD the softmax of the logits over the non-target classes alone (the true class's
    logit masked out, as their code does with -1000)."""
    rows = np.arange(len(labels))
    p, q = softmax(teacher / t), softmax(student / t)
    pt, qt = p[rows, labels], q[rows, labels]
    tckd = pt * np.log(pt / qt) + (1 - pt) * np.log((1 - pt) / (1 - qt))
    mask = np.eye(teacher.shape[1], dtype=bool)[labels]
    p_hat = softmax(np.where(mask, -np.inf, teacher / t))
    q_hat = softmax(np.where(mask, -np.inf, student / t))
    ratio = np.where(mask, 0.0, p_hat * (np.log(np.where(mask, 1, p_hat))
                                         - np.log(np.where(mask, 1, q_hat))))
    nckd = ratio.sum(-1)
    return t**2 * np.mean(alpha * tckd + beta * nckd), tckd, nckd


def pearson(u, v):
    """Pearson's correlation of the rows of u and v."""
    u, v = u - u.mean(-1, keepdims=True), v - v.mean(-1, keepdims=True)
    return (u * v).sum(-1) / np.sqrt((u * u).sum(-1) * (v * v).sum(-1))


def numpy_dist(student, teacher, t, beta=1.0, gamma=1.0):
    """Huang et al. (2022): d(u, v) = 1 - Pearson(u, v) on the probabilities at T; inter over
    each image's class vector, intra over each class's batch vector; times T^2."""
    p, q = softmax(teacher / t), softmax(student / t)
    inter = np.mean(1 - pearson(q, p))
    intra = np.mean(1 - pearson(q.T, p.T))
    return t**2 * (beta * inter + gamma * intra)


def numpy_standardize(z):
    """Sun et al. (2024): (z - mean(z)) / std(z) per row, std over the K classes (1/K)."""
    return (z - z.mean(-1, keepdims=True)) / z.std(-1, keepdims=True)


def batch(seed, n=16, classes=10, scale=3.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(0, scale, (n, classes)), rng.normal(0, scale, (n, classes)),
            rng.integers(0, classes, n))


def soft_term(loss, student, teacher, labels=None):
    """The loss's soft term through distillation_loss (alpha 1 and labels only when needed),
    the target formed as the distill step forms it."""
    transform = standardize if loss.standardize else None
    target = target_log_probs([jnp.asarray(teacher, jnp.float32)[None]], loss.temperature,
                              transform=transform)
    if loss.needs_labels:
        # alpha < 1 would mix in cross-entropy; the soft term alone is alpha * w * loss.
        return lambda s: loss.fn(standardize(s) if loss.standardize else s, target,
                                 jnp.asarray(labels))
    return lambda s: distillation_loss(s, target, loss, 1.0)


# --------------------------------------------------------------------------- DKD
@pytest.mark.parametrize("t", [1.0, 2.0, 4.0, 8.0])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 8.0), (0.5, 2.0)])
def test_dkd_matches_numpy_values_and_gradients(t, alpha, beta):
    s, v, y = batch(10)
    loss = make_loss("dkd", t, alpha=alpha, beta=beta)
    f = soft_term(loss, s, v, y)
    got = float(f(jnp.asarray(s, jnp.float32)))
    np.testing.assert_allclose(got, numpy_dkd(s, v, y, t, alpha, beta)[0], rtol=2e-5)
    grad = np.asarray(jax.grad(f)(jnp.asarray(s, jnp.float32)))
    expected = finite_differences(lambda x: numpy_dkd(x, v, y, t, alpha, beta)[0], s)
    np.testing.assert_allclose(grad, expected, atol=2e-5 * max(1.0, t))


def test_dkd_non_target_distribution_is_the_renormalised_target():
    """NCKD's p_j / (1 - p_gt) from the target's log-probabilities is the paper's softmax of
    the masked logits: decoupled_kl's NCKD equals the one numpy forms from masked logits."""
    s, v, y = batch(11, classes=100)
    for t in (1.0, 4.0):
        target = jax.nn.log_softmax(jnp.asarray(v, jnp.float32) / t)
        tckd, nckd = decoupled_kl(jnp.asarray(s, jnp.float32), target, jnp.asarray(y), t)
        _, tckd_np, nckd_np = numpy_dkd(s, v, y, t)
        np.testing.assert_allclose(np.asarray(tckd), tckd_np, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(nckd), nckd_np, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("t", [1.0, 4.0, 10.0])
def test_kd_is_tckd_plus_one_minus_p_gt_times_nckd(t):
    """The paper's reformulation: KD = TCKD + (1 - p_gt^T) NCKD, per image, so DKD with
    alpha = 1 and beta = 1 - p_gt is KD; with beta = 1 it weighs NCKD more."""
    s, v, y = batch(12)
    student, target = jnp.asarray(s, jnp.float32), jax.nn.log_softmax(jnp.asarray(v) / t)
    tckd, nckd = decoupled_kl(student, target, jnp.asarray(y), t)
    p_gt = np.exp(np.asarray(target))[np.arange(len(y)), y]
    recombined = t**2 * np.mean(np.asarray(tckd) + (1 - p_gt) * np.asarray(nckd))
    assert recombined == pytest.approx(float(kd_loss(student, target, t)), rel=1e-5)
    dkd_11 = float(dkd_loss(student, target, jnp.asarray(y), t, alpha=1.0, beta=1.0))
    assert dkd_11 > float(kd_loss(student, target, t))


def test_dkd_is_finite_for_a_certain_teacher():
    """A teacher so sure that 1 - p_gt underflows (logit gap 200 at T = 1): the paper's
    -1000 mask would still work, a division by 1 - p_gt would not."""
    s, v, y = batch(13)
    v[np.arange(len(y)), y] += 200.0
    loss = make_loss("dkd", 1.0)
    f = soft_term(loss, s, v, y)
    value, grad = jax.value_and_grad(f)(jnp.asarray(s, jnp.float32))
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))


def test_dkd_needs_labels_and_defaults_to_the_paper():
    loss = make_loss("dkd", 4.0)
    assert loss.needs_labels and loss.warmup_epochs == 20
    assert loss.params == {"alpha": 1.0, "beta": 8.0, "warmup_epochs": 20}
    z = jnp.zeros((2, 10))
    with pytest.raises(ValueError, match="loss dkd needs the true class: labels are needed"):
        distillation_loss(z, jax.nn.log_softmax(z), loss, 0.5)
    with pytest.raises(KdError, match=r"^loss dkd: beta must be >= 0, got -1.0$"):
        make_loss("dkd", 4.0, beta=-1.0)


def test_warmup_scales_the_soft_term_only():
    """mdistiller: loss = CE + min(epoch / 20, 1) * DKD with epochs from 1, i.e. 0-based epoch
    e weighs DKD by min((e + 1) / 20, 1); the hard-label term is not warmed up."""
    assert [float(warmup_factor(e, 20)) for e in (0, 9, 19, 20, 200)] == pytest.approx(
        [0.05, 0.5, 1, 1, 1])
    s, v, y = (jnp.asarray(a) for a in batch(14))
    s, v = s.astype(jnp.float32), v.astype(jnp.float32)
    loss, target = make_loss("dkd", 4.0), jax.nn.log_softmax(v / 4.0)
    soft, hard = float(dkd_loss(s, target, y, 4.0)), float(cross_entropy(s, y))
    for epoch, weight in ((0, 0.05), (4, 0.25), (25, 1.0)):
        got = float(distillation_loss(s, target, loss, 0.3, y, jnp.asarray(epoch)))
        assert got == pytest.approx(0.3 * weight * soft + 0.7 * hard, rel=1e-6)
    no_warmup = make_loss("dkd", 4.0, warmup_epochs=0)
    assert float(distillation_loss(s, target, no_warmup, 0.3, y, 0)) == pytest.approx(
        0.3 * soft + 0.7 * hard, rel=1e-6)


# --------------------------------------------------------------------------- DIST
@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
@pytest.mark.parametrize(("beta", "gamma"), [(1.0, 1.0), (2.0, 0.5)])
def test_dist_matches_numpy_values_and_gradients(t, beta, gamma):
    s, v, _ = batch(20)
    loss = make_loss("dist", t, beta=beta, gamma=gamma)
    assert not loss.needs_labels and loss.params == {"beta": beta, "gamma": gamma}
    f = soft_term(loss, s, v)
    got = float(f(jnp.asarray(s, jnp.float32)))
    np.testing.assert_allclose(got, numpy_dist(s, v, t, beta, gamma), rtol=2e-5)
    grad = np.asarray(jax.grad(f)(jnp.asarray(s, jnp.float32)))
    expected = finite_differences(lambda x: numpy_dist(x, v, t, beta, gamma), s)
    np.testing.assert_allclose(grad, expected, atol=2e-5 * t**2)


def test_dist_inter_relation_asks_for_correlation_not_equality():
    """The paper's relaxed match: a student whose every probability vector is an affine
    function of the teacher's (here a_i p_i + (1 - a_i) / C, still a distribution) has zero
    inter-class loss, while the KL between the two is not zero; as a_i varies by image, the
    classes' vectors across the batch are not affine in the teacher's: intra is not zero."""
    _, v, _ = batch(21)
    p = softmax(v)
    a = np.random.default_rng(21).uniform(0.1, 0.9, (len(p), 1))
    q = a * p + (1 - a) / p.shape[1]
    student, target = jnp.asarray(np.log(q), jnp.float32), jax.nn.log_softmax(jnp.asarray(v))
    assert float(dist_loss(student, target, 1.0, beta=1.0, gamma=0.0)) == pytest.approx(
        0.0, abs=1e-6)
    assert float(kd_loss(student, target, 1.0)) > 0.1
    assert float(dist_loss(student, target, 1.0, beta=0.0, gamma=1.0)) > 1e-3


def test_dist_is_zero_when_student_equals_teacher():
    _, v, _ = batch(22)
    z = jnp.asarray(v, jnp.float32)
    assert float(dist_loss(z, jax.nn.log_softmax(z / 4.0), 4.0)) == pytest.approx(0.0, abs=1e-4)


# --------------------------------------------------------------------------- standardisation
@pytest.mark.parametrize("name", ["kd", "dkd", "dist"])
def test_standardized_losses_are_invariant_to_shifting_and_scaling_the_logits(name):
    """Sun et al. (2024): z-scoring each row first makes the loss depend on the logits'
    shapes alone: every row may be shifted and scaled (by a positive factor) on either side."""
    s, v, y = batch(30)
    rng = np.random.default_rng(31)
    shift = lambda z: rng.uniform(0.2, 5.0, (len(z), 1)) * z + rng.normal(0, 10, (len(z), 1))
    loss = make_loss(name, 4.0, standardize=True)
    value = lambda student, teacher: float(
        soft_term(loss, student, teacher, y)(jnp.asarray(student, jnp.float32)))
    assert value(shift(s), shift(v)) == pytest.approx(value(s, v), rel=1e-4)
    plain = make_loss(name, 4.0)
    plain_value = lambda student, teacher: float(
        soft_term(plain, student, teacher, y)(jnp.asarray(student, jnp.float32)))
    assert plain_value(shift(s), shift(v)) != pytest.approx(plain_value(s, v), rel=1e-3)


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_standardized_kd_matches_numpy_values_and_gradients(t):
    s, v, _ = batch(32)
    f = soft_term(make_loss("kd", t, standardize=True), s, v)
    reference = lambda x: numpy_kd(numpy_standardize(x), numpy_standardize(v), t)
    np.testing.assert_allclose(float(f(jnp.asarray(s, jnp.float32))), reference(s), rtol=1e-4)
    grad = np.asarray(jax.grad(f)(jnp.asarray(s, jnp.float32)))
    np.testing.assert_allclose(grad, finite_differences(reference, s), atol=2e-5 * t)


def test_standardized_dkd_matches_numpy():
    s, v, y = batch(33)
    f = soft_term(make_loss("dkd", 2.0, standardize=True), s, v, y)
    expected = numpy_dkd(numpy_standardize(s), numpy_standardize(v), y, 2.0)[0]
    np.testing.assert_allclose(float(f(jnp.asarray(s, jnp.float32))), expected, rtol=1e-4)


def test_unknown_loss_names_the_choices():
    with pytest.raises(KdError, match=r"^unknown loss 'fitnet'; choose one of: dist, dkd, kd$"):
        make_loss("fitnet", 4.0)
