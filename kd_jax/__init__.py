"""kd-jax: knowledge distillation (Hinton, Vinyals & Dean 2015) in JAX/Flax.

The public API (see :mod:`kd_jax.api`): :func:`train` a model on labels, :func:`distill` a
student from frozen :class:`Teacher` s, :func:`evaluate`; :class:`Recipe` (the optimizer and
its schedule), :class:`Augmentation` (on-device augmentation of uint8 images), :class:`Hook`
(an action of the training loop) and the :class:`TrainState` both return.
"""

from kd_jax.api import Teacher, distill, evaluate, train
from kd_jax.core.augment import Augmentation
from kd_jax.core.optim import Recipe
from kd_jax.core.steps import TrainState
from kd_jax.core.trainer import Hook
from kd_jax.errors import KdError

__version__ = "0.1.0"
__all__ = ["Augmentation", "Hook", "KdError", "Recipe", "Teacher", "TrainState", "distill",
           "evaluate", "train"]
