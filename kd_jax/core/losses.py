"""Losses as pure functions of logits (computed in float32 whatever the model's dtype)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy against integer labels, optionally label-smoothed."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def tempered_kl(student_logits: jax.Array, teacher_logits: jax.Array,
                temperature: float) -> jax.Array:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, summed over classes, averaged over the batch.

    The ``T^2`` keeps the gradient's scale independent of ``T`` (Hinton et al. 2015, sec. 2),
    so the soft term and a hard-label term can be mixed without retuning the learning rate.
    """
    t = teacher_logits.astype(jnp.float32) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    log_p = jax.nn.log_softmax(t)
    log_q = jax.nn.log_softmax(s)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return temperature**2 * kl.mean()


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float,
                      alpha: float = 1.0, labels: jax.Array | None = None) -> jax.Array:
    """Hinton's mix: ``alpha * soft term + (1 - alpha) * cross-entropy at T=1``.

    With ``alpha == 1`` labels are not needed and must not be given.
    """
    soft = tempered_kl(student_logits, teacher_logits, temperature)
    if alpha == 1.0:
        if labels is not None:
            raise ValueError("alpha == 1 trains from the teacher alone: pass no labels")
        return soft
    if labels is None:
        raise ValueError(f"alpha = {alpha} < 1 mixes in a hard-label term: labels are needed")
    return alpha * soft + (1.0 - alpha) * cross_entropy(student_logits, labels)
