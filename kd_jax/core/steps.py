"""The train state and the jitted steps shared by teacher and student.

A step is a pure function ``step(state, *batch, rng) -> (state, metrics)`` where ``batch`` is
whatever the job trains on: ``(images, labels)`` for the teacher, ``(images,)`` alone for a
label-free student. :func:`run_steps` runs any such step over device-resident arrays, several
steps per dispatch (a ``lax.scan``), with augmentation inside the same jitted program; the
loop around it is :class:`kd_jax.core.trainer.Trainer`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax.core.augment import Augmentation
from kd_jax.core.features import (
    FEATURES,
    STAGES,
    FeatureLoss,
    feature_term,
    split_adapters,
    without_adapters,
)
from kd_jax.core.losses import (
    DistillLoss,
    cross_entropy,
    distillation_loss,
    make_loss,
    standardize,
)
from kd_jax.core.teachers import (
    Ensemble,
    Teacher,
    make_ensemble,
    target_log_probs,
    teacher_logits,
    teacher_stages,
)
from kd_jax.errors import KdError

Metrics = dict[str, jax.Array]
StepFn = Callable[..., tuple["TrainState", Metrics]]


class TrainState(train_state.TrainState):
    """Flax's TrainState plus BatchNorm running statistics and, optionally, their average.

    With ``ema_decay > 0`` every step also updates an exponential moving average of the
    parameters and BatchNorm statistics (``ema_params``, ``ema_batch_stats``); evaluation,
    checkpoints' frozen restore and export then use the average (Polyak averaging; airbench
    and Page's ResNet-9 gain 0.2-0.3 points from it in short runs). The decay ramps up as
    ``min(decay, (1 + step) / (10 + step))``, so the first steps' weights do not dominate.

    With ``lookahead_steps > 0`` it keeps slow weights too (Zhang et al. 2019's lookahead;
    airbench gains about 1.5 of 13.5 epochs from it): after every ``lookahead_steps`` steps the
    slow parameters and BatchNorm statistics move ``lookahead_alpha`` of the way to the fast
    ones, and the fast ones restart from there; the optimizer's momentum carries on. The
    fast weights are the trained model (the EMA, if kept, averages them). With
    ``lookahead_ramp_steps = T > 0`` the fraction moved at step ``t`` is airbench94's ramp,
    ``1 - (1 - lookahead_alpha) (t / T)^3``: almost no averaging while the learning rate is high,
    and the most at the end.
    """

    batch_stats: Any = None
    ema_params: Any = None
    ema_batch_stats: Any = None
    slow_params: Any = None
    slow_batch_stats: Any = None
    ema_decay: float = struct.field(pytree_node=False, default=0.0)
    lookahead_steps: int = struct.field(pytree_node=False, default=0)
    lookahead_alpha: float = struct.field(pytree_node=False, default=0.5)
    lookahead_ramp_steps: int = struct.field(pytree_node=False, default=0)

    def apply_gradients(self, *, grads: Any, **kwargs: Any) -> TrainState:
        new = super().apply_gradients(grads=grads, **kwargs)
        if self.lookahead_steps:
            new = new._look_ahead()
        if not self.ema_decay:
            return new
        decay = jnp.minimum(self.ema_decay, (1.0 + self.step) / (10.0 + self.step))
        average = lambda old, now: old + (1.0 - decay) * (now - old)
        return new.replace(ema_params=jax.tree.map(average, self.ema_params, new.params),
                           ema_batch_stats=jax.tree.map(average, self.ema_batch_stats,
                                                        new.batch_stats))

    def _look_ahead(self) -> TrainState:
        """The slow and fast weights after a step: unchanged, or synchronised where the step
        count is a multiple of ``lookahead_steps``. A ``lax.cond``, so that only the sync steps
        compute the averages: a ``jnp.where`` would compute them on every step."""
        alpha = self.lookahead_alpha
        if self.lookahead_ramp_steps:
            progress = jnp.minimum(self.step / self.lookahead_ramp_steps, 1.0)
            alpha = 1.0 - (1.0 - alpha) * progress ** 3

        def sync(trees: tuple) -> tuple:
            params, stats, slow_params, slow_stats = trees
            toward = lambda slow, fast: slow + (alpha * (fast - slow)).astype(slow.dtype)
            slow_params = jax.tree.map(toward, slow_params, params)
            slow_stats = jax.tree.map(toward, slow_stats, stats)
            return slow_params, slow_stats, slow_params, slow_stats

        trees = (self.params, self.batch_stats, self.slow_params, self.slow_batch_stats)
        params, stats, slow_params, slow_stats = jax.lax.cond(
            self.step % self.lookahead_steps == 0, sync, lambda unchanged: unchanged, trees)
        return self.replace(params=params, batch_stats=stats, slow_params=slow_params,
                            slow_batch_stats=slow_stats)

    def inference_variables(self) -> dict:
        """The variables to evaluate and ship: the average when one is kept, and never a
        feature method's adapters (:func:`kd_jax.core.features.without_adapters`)."""
        if self.ema_decay:
            return {"params": without_adapters(self.ema_params),
                    "batch_stats": self.ema_batch_stats}
        return {"params": without_adapters(self.params), "batch_stats": self.batch_stats}


def create_state(model: nn.Module, variables: dict, tx: optax.GradientTransformation,
                 ema_decay: float = 0.0, lookahead_steps: int = 0,
                 lookahead_alpha: float = 0.5, lookahead_ramp_steps: int = 0) -> TrainState:
    """The state at step 0; the EMA and the slow weights (where kept) start at ``variables``."""
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    copy = lambda kept, tree: jax.tree.map(jnp.copy, tree) if kept else {}
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, batch_stats=batch_stats,
                             ema_params=copy(ema_decay, params),
                             ema_batch_stats=copy(ema_decay, batch_stats),
                             slow_params=copy(lookahead_steps, params),
                             slow_batch_stats=copy(lookahead_steps, batch_stats),
                             ema_decay=ema_decay, lookahead_steps=lookahead_steps,
                             lookahead_alpha=lookahead_alpha,
                             lookahead_ramp_steps=lookahead_ramp_steps)


def _apply_train(state: TrainState, params: Any, images: jax.Array, rng: jax.Array,
                 capture: bool = False):
    """Forward in training mode: logits, the updated BatchNorm statistics and, with
    ``capture``, the stage outputs the model sows (else None)."""
    mutable = ["batch_stats", FEATURES] if capture else ["batch_stats"]
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                     images, train=True, mutable=mutable,
                                     rngs={"dropout": rng})
    stages = updates[FEATURES][STAGES] if capture else None
    return logits, updates["batch_stats"], stages


def _descend(state: TrainState, images: jax.Array, rng: jax.Array,
             loss_of: Callable[..., jax.Array],
             capture: bool = False) -> tuple[TrainState, jax.Array, jax.Array]:
    """One gradient step on ``loss_of(logits, stages, adapters)``: the new state (BatchNorm
    statistics included), the loss and the logits, which every step reuses for its metrics.
    ``stages`` are the student's stage outputs (with ``capture``) and ``adapters`` the
    feature method's parameters, trained with the model's own."""
    def objective(params):
        own, adapters = split_adapters(params)
        logits, batch_stats, stages = _apply_train(state, own, images, rng, capture)
        return loss_of(logits, stages, adapters), (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss, logits


def teacher_step(state: TrainState, images: jax.Array, labels: jax.Array, rng: jax.Array,
                 label_smoothing: float = 0.0) -> tuple[TrainState, Metrics]:
    """One cross-entropy step on labelled images."""
    state, loss, logits = _descend(
        state, images, rng, lambda logits, *_: cross_entropy(logits, labels, label_smoothing))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return state, {"train_loss": loss, "train_accuracy": accuracy}


def _soft_step(ensemble: tuple, loss: DistillLoss, alpha: float, combine: str,
               steps_per_epoch: int | None, features: FeatureLoss | None,
               teacher_variables: tuple, state: TrainState, images: jax.Array,
               labels: jax.Array | None, rng: jax.Array) -> tuple[TrainState, Metrics]:
    apply_fns, sizes = ensemble
    if features is None:
        logits, hints = teacher_logits(apply_fns, sizes, teacher_variables, images), None
    else:
        logits, hints = teacher_stages(apply_fns[0], teacher_variables[0], images)
        logits = [logits[None]]
    target = target_log_probs(logits, loss.temperature, combine,
                              standardize if loss.standardize else None)
    epoch = state.step // steps_per_epoch if loss.warmup_epochs else 0

    def loss_of(student, stages, adapters):
        value = distillation_loss(student, target, loss, alpha, labels, epoch)
        if features is None:
            return value
        return value + feature_term(features, adapters, stages, hints)

    state, value, student = _descend(state, images, rng, loss_of, capture=features is not None)
    agreement = jnp.mean(jnp.argmax(student, -1) == jnp.argmax(target, -1))
    return state, {"distill_loss": value, "train_agreement": agreement}


def _label_free_step(ensemble, loss, combine, steps_per_epoch, features, teacher_variables,
                     state, images, rng):
    return _soft_step(ensemble, loss, 1.0, combine, steps_per_epoch, features,
                      teacher_variables, state, images, None, rng)


def make_distill_step(teachers: Ensemble, loss: DistillLoss, alpha: float = 1.0,
                      combine: str = "probs", steps_per_epoch: int | None = None,
                      features: FeatureLoss | None = None) -> StepFn:
    """The student's step, closing over the frozen teachers.

    The teachers run in inference mode on exactly the augmented batch the student sees, and
    only the student is differentiated; their target is the ensemble's (see
    :mod:`kd_jax.core.teachers`). With ``alpha == 1`` and a loss that needs no labels the
    step is ``step(state, images, rng)``: it has no way to receive labels; otherwise
    ``step(state, images, labels, rng)``. A loss with a warm-up (DKD) needs
    ``steps_per_epoch``: its weight follows the epoch ``state.step // steps_per_epoch``, so
    a resumed run continues the ramp where it stopped. ``features`` adds a feature method's
    term (:mod:`kd_jax.core.features`) between the student's stage outputs and its one
    teacher's; the student's params must then hold the method's adapters.

    The closure is a ``jax.tree_util.Partial``: a pytree whose leaves are the teachers'
    arrays, so when the step is handed to a jitted program they enter it as arguments. A plain
    Python closure would bake ~45 MB per ResNet-18 into the compiled program as constants.
    Nothing ever updates them: the teachers stay bit-identical.
    """
    if loss.warmup_epochs and not steps_per_epoch:
        raise ValueError(f"loss {loss.name} warms up over epochs: pass steps_per_epoch")
    if features is not None and teachers.size != 1:
        raise KdError(f"feature loss {features.name} distills from one teacher, "
                      f"got {teachers.size}")
    static = (teachers.apply_fns, teachers.sizes)
    if alpha == 1.0 and not loss.needs_labels:
        step = partial(_label_free_step, static, loss, combine, steps_per_epoch, features)
    else:
        step = partial(_soft_step, static, loss, alpha, combine, steps_per_epoch, features)
    return jax.tree_util.Partial(step, teachers.stacked)


def hinton_step(teacher_apply: Callable, teacher_variables: dict, temperature: float,
                alpha: float = 1.0) -> StepFn:
    """:func:`make_distill_step` for one teacher and Hinton's loss at ``temperature``."""
    return make_distill_step(make_ensemble([Teacher(teacher_apply, teacher_variables)]),
                             make_loss("kd", temperature), alpha)


def make_teacher_step(label_smoothing: float = 0.0) -> StepFn:
    """``teacher_step`` as a pytree callable, like :func:`make_distill_step`."""
    return jax.tree_util.Partial(partial(teacher_step, label_smoothing=label_smoothing))


# --------------------------------------------------------------------------- the hot loop
_IMAGE_COINS = 2**31 - 1
@partial(jax.jit, static_argnames=("length", "augmentation", "mesh"), donate_argnames=("state",))
def run_steps(step: StepFn, state: TrainState, arrays: tuple[jax.Array, ...], order: jax.Array,
              num_steps: jax.Array, first: jax.Array, key: jax.Array, *, length: int,
              augmentation: Augmentation, mesh: Mesh) -> tuple[TrainState, Metrics]:
    """``length`` train steps in one dispatch: rows ``first ..`` of the epoch's index table.

    Each step gathers its batch from the device-resident ``arrays`` by a row of ``order`` (the
    epoch's [steps, batch] index table), shards it over the mesh's ``data`` axis, and augments
    the images with a key derived from the global step number alone, so a resumed run sees
    the same batches. Metrics come back stacked, one entry per step.

    With ``length > 1`` the steps run in a ``lax.scan``; ``order`` is then padded to whole
    dispatches and rows at or past ``num_steps`` leave the state untouched (one compilation
    for every dispatch). With ``length == 1`` there is no control flow at all: XLA:CPU runs
    convolutions inside loops and conditionals ~15x slower than at the top level (measured
    on this project's 2-core CPU), so CPUs take one step per dispatch.
    """
    batch_sharding = NamedSharding(mesh, P("data"))
    # Alternating flips' per-image coins: from a fold of the run's key that no step number
    # reaches, so they stay fixed for the whole run.
    image_key = jax.random.fold_in(key, _IMAGE_COINS)

    def train(state, row):
        aug_key, step_key = jax.random.split(jax.random.fold_in(key, state.step))
        indices = order[row]
        batch = [jax.lax.with_sharding_constraint(a[indices], batch_sharding) for a in arrays]
        batch[0] = augmentation.apply(aug_key, batch[0], indices, state.step // num_steps,
                                      image_key)
        return step(state, *batch, step_key)

    if length == 1:
        state, metrics = train(state, first)
        return state, jax.tree.map(lambda m: m[None], metrics)

    def skip(state, row):
        metrics = jax.eval_shape(train, state, row)[1]
        return state, jax.tree.map(lambda m: jnp.full(m.shape, jnp.nan, m.dtype), metrics)

    def guarded(state, row):
        return jax.lax.cond(row < num_steps, train, skip, state, row)

    return jax.lax.scan(guarded, state, first + jnp.arange(length))


def epoch_order(key: jax.Array, epoch: int, num_examples: int, batch_size: int,
                padded_steps: int) -> jax.Array:
    """The epoch's shuffled [padded_steps, batch_size] index table (a partial batch is dropped).

    Depends on the seed's key and the epoch number only.
    """
    steps = num_examples // batch_size
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
    order = perm[: steps * batch_size].reshape(steps, batch_size)
    return jnp.pad(order, ((0, padded_steps - steps), (0, 0)))


