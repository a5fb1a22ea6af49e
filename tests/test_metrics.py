"""Host-side metrics against numpy on crafted logits whose answers are known by hand."""

from __future__ import annotations

import numpy as np
import pytest

from kd_jax.core import metrics

LOGITS = np.array([[2.0, 1.0, 0.0],   # predicts 0
                   [0.0, 3.0, 0.0],   # predicts 1
                   [0.0, 0.0, 1.0],   # predicts 2
                   [5.0, 0.0, 4.0]])  # predicts 0
LABELS = np.array([0, 2, 2, 2])


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_classification_metrics():
    found = metrics.classification_metrics(LOGITS, LABELS, prefix="val")
    assert found["val_accuracy"] == 0.5  # images 0 and 2
    expected = -np.mean([log_softmax(LOGITS)[i, y] for i, y in enumerate(LABELS)])
    assert found["val_loss"] == pytest.approx(expected, rel=1e-12)
    assert set(found) == {"val_loss", "val_accuracy"}


def test_per_class_accuracy_skips_absent_classes():
    assert metrics.per_class_accuracy(LOGITS, LABELS, ("a", "b", "c")) == {
        "a": 1.0, "c": pytest.approx(1 / 3)}


def test_agreement_counts_equal_top1():
    other = np.array([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert metrics.agreement(LOGITS, other) == 0.75


def test_mean_kl_is_teacher_to_student_and_zero_on_itself():
    teacher = np.array([[1.0, 0.0, 0.0]])
    student = np.array([[0.0, 0.0, 0.0]])
    p, q = np.exp(log_softmax(teacher)), np.exp(log_softmax(student))
    assert metrics.mean_kl(student, teacher) == pytest.approx(np.sum(p * np.log(p / q)))
    assert metrics.mean_kl(student, teacher) != pytest.approx(np.sum(q * np.log(q / p)))
    assert metrics.mean_kl(LOGITS, LOGITS) == pytest.approx(0.0, abs=1e-12)


def test_best_logit_offset_is_the_smallest_that_wins_most():
    """Image 1 needs class 2 raised by more than 1.5; above 2 image 0 breaks, above 3 image 2:
    offsets in (1.5, 2] score 3/3, and among equal scores the one closest to zero wins."""
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.5], [0.0, 3.0, 0.0]])
    labels = np.array([0, 2, 1])
    offset = metrics.best_logit_offset(logits, labels, [2])
    assert offset == pytest.approx(1.6)  # the first offset > 1.5 on the 0.1 grid
    assert metrics.best_logit_offset(logits, np.array([0, 1, 1]), [2]) == 0.0  # tie -> zero
    shifted = metrics.shift_logits(logits, [2], offset)
    assert (shifted.argmax(-1) == labels).all() and shifted[0, 2] == pytest.approx(1.6)
