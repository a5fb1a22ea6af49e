"""Evaluation: batched inference on device, and one evaluator object per eval set.

An evaluator is called with a model's inference variables and returns named metrics
(big_vision's evaluators): :class:`ClassificationEval` for a labelled set, and
:class:`DistillationEval`, which also compares the student with its teacher on the same
images. Metrics are computed on host numpy in float64 (:mod:`kd_jax.core.metrics`),
independently of the training code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax.core import metrics
from kd_jax.core.augment import tta_views
from kd_jax.core.devices import check_divisible

Predict = Callable[[dict, jax.Array], jax.Array]


class Preprocessing(Protocol):
    def normalize(self, images: jax.Array) -> jax.Array: ...


class Evaluator(Protocol):
    """Named metrics of the model given by ``variables`` (inference mode)."""

    def __call__(self, variables: dict) -> dict[str, float]: ...


def make_predict(model: nn.Module, augmentation: Preprocessing, batch_size: int,
                 mesh: Mesh, tta: str = "none") -> Callable[[dict, jax.Array], jax.Array]:
    """``predict(variables, uint8_images) -> float32 logits`` in inference mode, batched on device.

    Images are padded to whole batches and mapped over in one dispatch; each batch is sharded
    over the mesh. With ``tta`` other than ``none`` the logits are the mean over the views of
    :func:`kd_jax.tta_views` (test-time augmentation).
    """
    check_divisible(batch_size, mesh, "eval_batch_size")
    batch_sharding = NamedSharding(mesh, P("data"))

    @jax.jit
    def predict(variables: dict, images: jax.Array) -> jax.Array:
        n = images.shape[0]
        padded = math.ceil(n / batch_size) * batch_size
        images = jnp.pad(images, ((0, padded - n),) + ((0, 0),) * (images.ndim - 1))

        def one(batch):
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
            views = tta_views(batch, tta)
            return sum(model.apply(variables, augmentation.normalize(view), train=False)
                       for view in views) / len(views)

        logits = jax.lax.map(one, images.reshape(-1, batch_size, *images.shape[1:]))
        return logits.reshape(padded, -1)[:n]

    return predict


@dataclass(frozen=True)
class ClassificationEval:
    """``{name}_loss`` (cross-entropy) and ``{name}_accuracy`` on one labelled set."""

    name: str
    images: jax.Array  # stored form, on the device
    labels: np.ndarray
    predict: Predict

    def logits(self, variables: dict) -> np.ndarray:
        return np.asarray(self.predict(variables, self.images))

    def __call__(self, variables: dict) -> dict[str, float]:
        return metrics.classification_metrics(self.logits(variables), self.labels,
                                              prefix=self.name)


@dataclass(frozen=True)
class DistillationEval:
    """The student's figures on one set, and how far it is from its teacher there.

    ``{name}_loss``, ``{name}_accuracy``, the top-1 agreement with the teacher (``agreement``
    on the test set, the headline figure; ``{name}_agreement`` on others), ``{name}_kl``
    (KL(teacher || student) at T = 1) and the teacher's own ``teacher_{name}_accuracy``.
    ``teacher_logits`` are computed once, before training.
    """

    plain: ClassificationEval
    teacher_logits: np.ndarray

    def __call__(self, variables: dict) -> dict[str, float]:
        name, logits = self.plain.name, self.plain.logits(variables)
        agreement = "agreement" if name == "test" else f"{name}_agreement"
        teacher = metrics.classification_metrics(self.teacher_logits, self.plain.labels, name)
        return {**metrics.classification_metrics(logits, self.plain.labels, prefix=name),
                agreement: metrics.agreement(logits, self.teacher_logits),
                f"{name}_kl": metrics.mean_kl(logits, self.teacher_logits),
                f"teacher_{name}_accuracy": teacher[f"{name}_accuracy"]}


def evaluate_all(evaluators: list[Evaluator], variables: dict) -> dict[str, Any]:
    """Every evaluator's metrics, merged in order."""
    row: dict[str, Any] = {}
    for evaluator in evaluators:
        row.update(evaluator(variables))
    return row
