"""Losses as pure functions of logits (computed in float32 whatever the model's dtype).

A distillation loss compares the student's logits with the teachers' *target*: the
log-probabilities of the (ensemble) teacher at the loss's temperature, formed by
:func:`kd_jax.core.teachers.target_log_probs`. Losses are registered by name in
:data:`LOSSES` with their own hyper-parameters; :func:`make_loss` builds one:

- ``kd``: Hinton et al. (2015), :func:`kd_loss`.
- ``dkd``: Decoupled KD (Zhao et al., CVPR 2022), :func:`dkd_loss`; needs the true class.
- ``dist``: DIST (Huang et al., NeurIPS 2022), :func:`dist_loss`.

Each takes ``standardize=True``: logit standardisation (Sun et al., CVPR 2024) of the
student's and every teacher's logits before they are softened.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kd_jax.errors import KdError


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy against integer labels, optionally label-smoothed."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def kd_loss(student_logits: jax.Array, target_log_probs: jax.Array,
            temperature: float) -> jax.Array:
    """``T^2 * KL(p || softmax(s/T))``, summed over classes, averaged over the batch, where
    ``p = exp(target_log_probs)`` is the teacher's (or ensemble's) distribution at ``T``.

    The ``T^2`` keeps the gradient's scale independent of ``T`` (Hinton et al. 2015, sec. 2),
    so the soft term and a hard-label term can be mixed without retuning the learning rate.
    """
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
    return temperature**2 * _kl(target_log_probs, log_q).mean()


def _kl(log_p: jax.Array, log_q: jax.Array, where: jax.Array | None = None) -> jax.Array:
    """``KL(p || q)`` over the last axis from log-probabilities, summed over the entries
    where ``where`` is 1 (all when None). Masked entries are zeroed before ``exp``, so
    whatever they held (even a log-ratio that would overflow) adds ``exp(0) * (0 - 0)``."""
    if where is not None:
        log_p, log_q = where * log_p, where * log_q
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def tempered_kl(student_logits: jax.Array, teacher_logits: jax.Array,
                temperature: float) -> jax.Array:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``: :func:`kd_loss` from one teacher's logits."""
    target = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature)
    return kd_loss(student_logits, target, temperature)


def standardize(logits: jax.Array, epsilon: float = 1e-7) -> jax.Array:
    """Logit standardisation (Sun et al. 2024): each row z-scored, so a loss on the softened
    distributions compares the logits' shapes, not their ranges."""
    logits = logits.astype(jnp.float32)
    mean = jnp.mean(logits, axis=-1, keepdims=True)
    return (logits - mean) / (jnp.std(logits, axis=-1, keepdims=True) + epsilon)


def decoupled_kl(student_logits: jax.Array, target_log_probs: jax.Array, labels: jax.Array,
                 temperature: float) -> tuple[jax.Array, jax.Array]:
    """Per-image ``(TCKD, NCKD)`` of Zhao et al. (2022, sec. 3.1), unscaled.

    TCKD is the KL between the binary distributions (target class, all others) of teacher
    and student; NCKD the KL between their distributions among the non-target classes,
    ``p_j / (1 - p_gt)`` for ``j != gt``. The paper's code (mdistiller) forms the latter as a
    softmax of the logits with the true class pushed to -1000; here it comes from the
    target's log-probabilities, ``log p_j - log sum_{k != gt} p_k``, the same distribution
    (``softmax`` of the logits restricted to the other classes), also for an ensemble's
    target, and finite when ``p_gt`` rounds to 1. The paper's reformulation of KD is then
    ``KL(p || q) = TCKD + (1 - p_gt) * NCKD``.
    """
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
    others = 1.0 - jax.nn.one_hot(labels, log_q.shape[-1])

    def binary(log_p: jax.Array) -> jax.Array:  # log [p_gt, 1 - p_gt]
        gt = jnp.take_along_axis(log_p, labels[:, None], axis=-1)
        return jnp.concatenate([gt, jax.nn.logsumexp(log_p, -1, b=others, keepdims=True)], -1)

    def among_others(log_p: jax.Array) -> jax.Array:  # log p_j / (1 - p_gt); j = gt: masked
        return log_p - jax.nn.logsumexp(log_p, -1, b=others, keepdims=True)

    tckd = _kl(binary(target_log_probs), binary(log_q))
    nckd = _kl(among_others(target_log_probs), among_others(log_q), where=others)
    return tckd, nckd


def dkd_loss(student_logits: jax.Array, target_log_probs: jax.Array, labels: jax.Array,
             temperature: float, alpha: float = 1.0, beta: float = 8.0) -> jax.Array:
    """Decoupled KD (Zhao et al. 2022, sec. 3.2): ``T^2 * (alpha * TCKD + beta * NCKD)``,
    averaged over the batch (:func:`decoupled_kl`).

    KD weighs NCKD by ``1 - p_gt``, which is small exactly where the teacher is confident
    and its dark knowledge most reliable; DKD decouples the two terms and gives NCKD its own
    weight ``beta`` (the paper's CIFAR-100 default 8, with ``alpha`` 1 and T = 4).
    """
    tckd, nckd = decoupled_kl(student_logits, target_log_probs, labels, temperature)
    return temperature**2 * jnp.mean(alpha * tckd + beta * nckd)


def _pearson_distance(a: jax.Array, b: jax.Array, axis: int, epsilon: float = 1e-8) -> jax.Array:
    """``1 - `` Pearson's correlation of ``a`` and ``b`` along ``axis`` (DIST's ``d_p``); the
    ``epsilon`` of DIST's code keeps a constant vector at correlation 0."""
    a = a - jnp.mean(a, axis=axis, keepdims=True)
    b = b - jnp.mean(b, axis=axis, keepdims=True)
    norms = jnp.linalg.norm(a, axis=axis) * jnp.linalg.norm(b, axis=axis)
    return 1.0 - jnp.sum(a * b, axis=axis) / (norms + epsilon)


def dist_loss(student_logits: jax.Array, target_log_probs: jax.Array, temperature: float,
              beta: float = 1.0, gamma: float = 1.0) -> jax.Array:
    """DIST (Huang et al. 2022, sec. 3.3): ``T^2 * (beta * inter + gamma * intra)``.

    ``inter`` is ``1 - Pearson(q_i, p_i)`` between each image's student and teacher
    probability vectors at T, averaged over the batch; ``intra`` the same between each
    class's probabilities across the batch, averaged over classes. A correlation asks the
    student to keep the teacher's *ranking and relative* scores, not their exact values,
    which the paper finds easier to match from a much stronger teacher. The ``T^2`` factor
    is the authors' CIFAR code (``dist_t4``, T = 4); at their ImageNet T = 1 it is 1.
    """
    q = jax.nn.softmax(student_logits.astype(jnp.float32) / temperature)
    p = jnp.exp(target_log_probs)
    inter = jnp.mean(_pearson_distance(q, p, axis=1))
    intra = jnp.mean(_pearson_distance(q, p, axis=0))
    return temperature**2 * (beta * inter + gamma * intra)


def warmup_factor(epoch: jax.Array | int, warmup_epochs: int) -> jax.Array:
    """The loss weight in (0-based) ``epoch`` of a loss ramped up over ``warmup_epochs``:
    ``min((epoch + 1) / warmup_epochs, 1)``, DKD's linear warm-up (mdistiller multiplies its
    loss by ``min(epoch / 20, 1)`` with epochs counted from 1), so a randomly initialised
    student is not hit by a large NCKD gradient at once."""
    return jnp.minimum((epoch + 1) / warmup_epochs, 1.0)


@dataclass(frozen=True)
class DistillLoss:
    """A registered distillation loss, its hyper-parameters bound.

    ``fn(student_logits, target_log_probs, labels)`` returns the scalar loss; ``labels`` is
    None unless ``needs_labels`` (a method that needs the true class, such as DKD, cannot run
    label-free). ``temperature`` is what the target is formed at; ``standardize`` applies
    :func:`standardize` to the student's and every teacher's logits first;
    ``warmup_epochs > 0`` scales the loss by :func:`warmup_factor` of the epoch.
    """

    name: str
    fn: Callable[..., jax.Array]
    temperature: float
    needs_labels: bool = False
    standardize: bool = False
    warmup_epochs: int = 0
    params: dict[str, Any] = field(default_factory=dict)


def _non_negative(loss: str, **params: float) -> None:
    for name, value in params.items():
        if not value >= 0:
            raise KdError(f"loss {loss}: {name} must be >= 0, got {value}")


def _kd(student_logits: jax.Array, target_log_probs: jax.Array, labels: jax.Array | None, *,
        temperature: float) -> jax.Array:
    return kd_loss(student_logits, target_log_probs, temperature)


def _build_kd(temperature: float, standardize: bool = False) -> DistillLoss:
    return DistillLoss("kd", partial(_kd, temperature=temperature), temperature,
                       standardize=standardize)


def _build_dkd(temperature: float, standardize: bool = False, alpha: float = 1.0,
               beta: float = 8.0, warmup_epochs: int = 20) -> DistillLoss:
    """DKD with the paper's CIFAR-100 defaults (alpha 1, beta 8, 20 warm-up epochs)."""
    _non_negative("dkd", alpha=alpha, beta=beta, warmup_epochs=warmup_epochs)
    fn = partial(dkd_loss, temperature=temperature, alpha=alpha, beta=beta)
    return DistillLoss("dkd", fn, temperature, needs_labels=True, standardize=standardize,
                       warmup_epochs=warmup_epochs,
                       params={"alpha": alpha, "beta": beta, "warmup_epochs": warmup_epochs})


def _dist(student_logits: jax.Array, target_log_probs: jax.Array, labels: jax.Array | None, *,
          temperature: float, beta: float, gamma: float) -> jax.Array:
    return dist_loss(student_logits, target_log_probs, temperature, beta, gamma)


def _build_dist(temperature: float, standardize: bool = False, beta: float = 1.0,
                gamma: float = 1.0) -> DistillLoss:
    """DIST with the paper's weights (beta = gamma = 1)."""
    _non_negative("dist", beta=beta, gamma=gamma)
    fn = partial(_dist, temperature=temperature, beta=beta, gamma=gamma)
    return DistillLoss("dist", fn, temperature, standardize=standardize,
                       params={"beta": beta, "gamma": gamma})


# name -> builder(temperature, standardize=..., **hyper-parameters) -> DistillLoss
LOSSES: dict[str, Callable[..., DistillLoss]] = {"kd": _build_kd, "dkd": _build_dkd,
                                                 "dist": _build_dist}


def make_loss(name: str, temperature: float, **params: Any) -> DistillLoss:
    """The loss registered as ``name``; a ``KdError`` names the choices for another."""
    if name not in LOSSES:
        raise KdError(f"unknown loss {name!r}; choose one of: {', '.join(sorted(LOSSES))}")
    return LOSSES[name](temperature, **params)


def distillation_loss(student_logits: jax.Array, target_log_probs: jax.Array,
                      loss: DistillLoss, alpha: float = 1.0, labels: jax.Array | None = None,
                      epoch: jax.Array | int = 0) -> jax.Array:
    """``alpha * w * loss + (1 - alpha) * cross-entropy at T=1`` (Hinton's mix), where ``w``
    is the loss's :func:`warmup_factor` in (0-based) ``epoch`` (1 without a warm-up).

    With ``alpha == 1`` and a loss that needs no labels, labels must not be given.
    """
    if labels is not None and alpha == 1.0 and not loss.needs_labels:
        raise ValueError("alpha == 1 trains from the teacher alone: pass no labels")
    if labels is None and loss.needs_labels:
        raise ValueError(f"loss {loss.name} needs the true class: labels are needed")
    if labels is None and alpha != 1.0:
        raise ValueError(f"alpha = {alpha} < 1 mixes in a hard-label term: labels are needed")
    compared = standardize(student_logits) if loss.standardize else student_logits
    soft = loss.fn(compared, target_log_probs, labels if loss.needs_labels else None)
    if loss.warmup_epochs:
        soft = warmup_factor(epoch, loss.warmup_epochs) * soft
    if alpha == 1.0:
        return soft
    return alpha * soft + (1.0 - alpha) * cross_entropy(student_logits, labels)
