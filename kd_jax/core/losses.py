"""Losses as pure functions of logits (computed in float32 whatever the model's dtype).

A distillation loss compares the student's logits with the teachers' *target*: the
log-probabilities of the (ensemble) teacher at the loss's temperature, formed by
:func:`kd_jax.core.teachers.target_log_probs`. Losses are registered by name in
:data:`LOSSES` with their own hyper-parameters; :func:`make_loss` builds one.
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
    kl = jnp.sum(jnp.exp(target_log_probs) * (target_log_probs - log_q), axis=-1)
    return temperature**2 * kl.mean()


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


@dataclass(frozen=True)
class DistillLoss:
    """A registered distillation loss, its hyper-parameters bound.

    ``fn(student_logits, target_log_probs, labels)`` returns the scalar loss; ``labels`` is
    None unless ``needs_labels`` (a method that needs the true class, such as DKD, cannot run
    label-free). ``temperature`` is what the target is formed at; ``standardize`` applies
    :func:`standardize` to the student's and every teacher's logits first.
    """

    name: str
    fn: Callable[..., jax.Array]
    temperature: float
    needs_labels: bool = False
    standardize: bool = False
    params: dict[str, Any] = field(default_factory=dict)


def _kd(student_logits: jax.Array, target_log_probs: jax.Array, labels: jax.Array | None, *,
        temperature: float) -> jax.Array:
    return kd_loss(student_logits, target_log_probs, temperature)


def _build_kd(temperature: float, standardize: bool = False) -> DistillLoss:
    return DistillLoss("kd", partial(_kd, temperature=temperature), temperature,
                       standardize=standardize)


# name -> builder(temperature, standardize=..., **hyper-parameters) -> DistillLoss
LOSSES: dict[str, Callable[..., DistillLoss]] = {"kd": _build_kd}


def make_loss(name: str, temperature: float, **params: Any) -> DistillLoss:
    """The loss registered as ``name``; a ``KdError`` names the choices for another."""
    if name not in LOSSES:
        raise KdError(f"unknown loss {name!r}; choose one of: {', '.join(sorted(LOSSES))}")
    return LOSSES[name](temperature, **params)


def distillation_loss(student_logits: jax.Array, target_log_probs: jax.Array,
                      loss: DistillLoss, alpha: float = 1.0,
                      labels: jax.Array | None = None) -> jax.Array:
    """``alpha * loss + (1 - alpha) * cross-entropy at T=1`` (Hinton's mix).

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
    if alpha == 1.0:
        return soft
    return alpha * soft + (1.0 - alpha) * cross_entropy(student_logits, labels)
