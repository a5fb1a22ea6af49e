"""Evaluation metrics on host numpy logits (float64, independent of the training code)."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def classification_metrics(logits: np.ndarray, labels: np.ndarray,
                           prefix: str = "test") -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy against integer labels."""
    log_probs = log_softmax(logits)
    return {f"{prefix}_loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
            f"{prefix}_accuracy": float(np.mean(logits.argmax(-1) == labels))}


def per_class_accuracy(logits: np.ndarray, labels: np.ndarray,
                       class_names: tuple[str, ...]) -> dict[str, float]:
    predictions = logits.argmax(-1)
    return {name: float(np.mean(predictions[labels == c] == c))
            for c, name in enumerate(class_names) if np.any(labels == c)}


def agreement(student_logits: np.ndarray, teacher_logits: np.ndarray) -> float:
    """Fraction of images on which student and teacher give the same top-1 class."""
    return float(np.mean(student_logits.argmax(-1) == teacher_logits.argmax(-1)))


def mean_kl(student_logits: np.ndarray, teacher_logits: np.ndarray) -> float:
    """Mean over images of KL(teacher || student) at temperature 1, in nats."""
    log_p, log_q = log_softmax(teacher_logits), log_softmax(student_logits)
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))


OFFSETS = np.round(np.arange(-10.0, 10.01, 0.1), 2)


def best_logit_offset(logits: np.ndarray, labels: np.ndarray, classes: list[int],
                      offsets: np.ndarray = OFFSETS) -> float:
    """The offset added to the logits of ``classes`` that maximises accuracy on (logits, labels).

    Hinton et al. (2015, sec. 3) raise the bias of a class the student never saw; choosing the
    offset on held-out training images keeps the test set out of the choice. Ties go to the
    offset closest to zero.
    """
    offsets = sorted(np.asarray(offsets, dtype=np.float64), key=abs)
    scores = [np.mean(shift_logits(logits, classes, b).argmax(-1) == labels) for b in offsets]
    return float(offsets[int(np.argmax(scores))])


def shift_logits(logits: np.ndarray, classes: list[int], offset: float) -> np.ndarray:
    shifted = logits.astype(np.float64).copy()
    shifted[:, classes] += offset
    return shifted
