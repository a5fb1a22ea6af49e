"""The train state, the jitted steps and the epoch loop shared by teacher and student.

A step is a pure function ``step(state, *batch, rng) -> (state, metrics)`` where ``batch`` is
whatever the job trains on: ``(images, labels)`` for the teacher, ``(images,)`` alone for a
label-free student. :func:`fit` runs any such step over device-resident arrays, several steps
per dispatch (a ``lax.scan``), with augmentation inside the same jitted program.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from kd_jax import data, faults
from kd_jax.checkpoint import RunCheckpoints
from kd_jax.config import RunConfig
from kd_jax.errors import Interrupted, KdError
from kd_jax.losses import cross_entropy, distillation_loss
from kd_jax.rundir import RunDir, format_row

Metrics = dict[str, jax.Array]
StepFn = Callable[..., tuple["TrainState", Metrics]]


class TrainState(train_state.TrainState):
    """Flax's TrainState plus BatchNorm running statistics and, optionally, their average.

    With ``ema_decay > 0`` every step also updates an exponential moving average of the
    parameters and BatchNorm statistics (``ema_params``, ``ema_batch_stats``); evaluation,
    checkpoints' frozen restore and export then use the average (Polyak averaging; airbench
    and Page's ResNet-9 gain 0.2-0.3 points from it in short runs). The decay ramps up as
    ``min(decay, (1 + step) / (10 + step))``, so the first steps' weights do not dominate.
    """

    batch_stats: Any = None
    ema_params: Any = None
    ema_batch_stats: Any = None
    ema_decay: float = struct.field(pytree_node=False, default=0.0)

    def apply_gradients(self, *, grads: Any, **kwargs: Any) -> TrainState:
        new = super().apply_gradients(grads=grads, **kwargs)
        if not self.ema_decay:
            return new
        decay = jnp.minimum(self.ema_decay, (1.0 + self.step) / (10.0 + self.step))
        average = lambda old, now: old + (1.0 - decay) * (now - old)
        return new.replace(ema_params=jax.tree.map(average, self.ema_params, new.params),
                           ema_batch_stats=jax.tree.map(average, self.ema_batch_stats,
                                                        new.batch_stats))

    def inference_variables(self) -> dict:
        """The variables to evaluate and ship: the average when one is kept."""
        if self.ema_decay:
            return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}
        return {"params": self.params, "batch_stats": self.batch_stats}


def compute_dtype(name: str) -> jnp.dtype:
    """``auto`` is bfloat16 on accelerators and float32 on CPU: a CPU run keeps full precision
    unless asked (``--dtype bfloat16`` trains faster on CPUs with bf16 matrix units, see
    benchmarks/README.md)."""
    if name == "auto":
        name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return jnp.dtype(name)


def make_mesh() -> Mesh:
    """A 1-D mesh over every device; batches are split along its ``data`` axis."""
    return Mesh(np.array(jax.devices()), ("data",))


def check_divisible(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    if batch_size % mesh.size:
        raise KdError(f"{what} {batch_size} is not divisible by the {mesh.size} devices in use")


def check_batch_size(batch_size: int, num_examples: int, mesh: Mesh) -> None:
    """Refuse a batch size that yields no step or cannot be split over the devices."""
    if batch_size > num_examples:
        raise KdError(f"batch_size {batch_size} exceeds the {num_examples} training images")
    check_divisible(batch_size, mesh)


def max_norm(limit: float) -> optax.GradientTransformation:
    """Keep every unit's incoming weight vector within an L2 ball of radius ``limit``.

    Hinton et al. (2012)'s constraint for dropout nets: instead of penalising big weights,
    project each column of a kernel (all axes but the last: the weights into one unit) back
    onto the ball after every update, so that weights cannot grow without bound even at the
    large learning rates Hinton et al. used.
    Written as the last transformation of a chain: it returns the update that lands the
    parameters on the projection. Biases (ndim < 2) are left free.
    """
    def project(param: jax.Array, update: jax.Array) -> jax.Array:
        if param.ndim < 2:
            return update
        new = param + update
        norms = jnp.sqrt(jnp.sum(jnp.square(new), axis=tuple(range(new.ndim - 1)),
                                 keepdims=True))
        return new * jnp.minimum(1.0, limit / jnp.maximum(norms, 1e-12)) - param

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("max_norm needs the parameters: pass params to tx.update")
        return jax.tree.map(project, params, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


@dataclass(frozen=True)
class OptimizerSpec:
    """SGD with Nesterov momentum on a warmup + linear-decay schedule, by parameter group.

    The learning rate rises linearly over the first ``warmup_fraction`` of the steps to
    ``learning_rate``, then falls linearly to ``final_lr_factor * learning_rate`` at the last
    step; a fraction rather than a number of epochs keeps a 2-epoch smoke run's schedule the
    shape of a 10-epoch run's. Parameters fall into the groups of :func:`param_group`, each
    with its own learning-rate factor: BatchNorm needs its scales and biases driven
    differently from the kernels it makes scale-invariant (airbench drives BN biases 64x).
    Weight decay applies to kernels (the head's included) and, with ``bn_weight_decay``, to
    BatchNorm parameters; never to other biases.
    """

    learning_rate: float = 1.6
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.2
    final_lr_factor: float = 0.0
    bn_lr_factor: float = 1.0
    head_lr_factor: float = 1.0
    bias_lr_factor: float = 1.0
    bn_weight_decay: float = 0.0
    max_norm: float = 0.0  # > 0: cap each unit's incoming weight norm after every update


def make_schedule(spec: OptimizerSpec, total_steps: int) -> optax.Schedule:
    """The learning rate of step ``t`` (0-based): see :class:`OptimizerSpec`."""
    warmup_steps = min(round(spec.warmup_fraction * total_steps), total_steps - 1)
    peak = spec.learning_rate
    return optax.join_schedules(
        [optax.linear_schedule(peak / max(warmup_steps, 1), peak, warmup_steps),
         optax.linear_schedule(peak, peak * spec.final_lr_factor, total_steps - warmup_steps)],
        [warmup_steps])


def param_group(path: tuple[str, ...], param: jax.Array, head: str | None) -> str:
    """The optimizer group of one parameter, from its path in the params tree.

    ``frozen`` for the data-set :class:`kd_jax.models.Whitening` layer, ``bn`` for BatchNorm
    scales and biases, ``head`` for the output layer ``head`` (the last top-level Dense),
    ``bias`` for other biases and ``kernel`` for everything else.
    """
    if "Whitening" in path:
        return "frozen"
    if any(name.startswith("BatchNorm") for name in path[:-1]):
        return "bn"
    if head is not None and path[0] == head:
        return "head"
    return "kernel" if param.ndim > 1 else "bias"


def head_module(params: dict) -> str | None:
    """The name of the last top-level Dense module (the logits' layer of every kd-jax model)."""
    dense = [k for k in params if k.startswith("Dense_") and k[len("Dense_"):].isdigit()]
    return max(dense, key=lambda k: int(k[len("Dense_"):]), default=None)


def param_groups(params: dict) -> dict:
    """:func:`param_group` of every leaf, as a tree shaped like ``params``."""
    head = head_module(params)
    names = lambda path: tuple(str(getattr(k, "key", k)) for k in path)
    return jax.tree_util.tree_map_with_path(lambda path, p: param_group(names(path), p, head),
                                            params)


def make_optimizer(spec: OptimizerSpec, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                    optax.Schedule]:
    """The optimizer :class:`OptimizerSpec` describes, and its schedule.

    ``max_norm > 0`` adds :func:`max_norm` after each trainable group's step.
    """
    schedule = make_schedule(spec, total_steps)

    kernels_only = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)

    def group(lr_factor: float, weight_decay: float,
              decays: Callable | None = None) -> optax.GradientTransformation:
        rate = schedule if lr_factor == 1 else (lambda t: lr_factor * schedule(t))
        chain = [optax.sgd(rate, momentum=spec.momentum, nesterov=True)]
        if weight_decay:
            chain.insert(0, optax.add_decayed_weights(weight_decay, mask=decays))
        if spec.max_norm > 0:
            chain.append(max_norm(spec.max_norm))
        return optax.chain(*chain)

    transforms = {"kernel": group(1.0, spec.weight_decay),
                  "head": group(spec.head_lr_factor, spec.weight_decay, kernels_only),
                  "bias": group(spec.bias_lr_factor, 0.0),
                  "bn": group(spec.bn_lr_factor, spec.bn_weight_decay),
                  "frozen": optax.set_to_zero()}
    return optax.multi_transform(transforms, param_groups), schedule


def create_state(model: nn.Module, variables: dict, tx: optax.GradientTransformation,
                 ema_decay: float = 0.0) -> TrainState:
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    average = lambda tree: jax.tree.map(jnp.copy, tree) if ema_decay else {}
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, batch_stats=batch_stats,
                             ema_params=average(params), ema_batch_stats=average(batch_stats),
                             ema_decay=ema_decay)


def _apply_train(state: TrainState, params: Any, images: jax.Array, rng: jax.Array):
    """Forward in training mode: logits and the updated BatchNorm statistics."""
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                     images, train=True, mutable=["batch_stats"],
                                     rngs={"dropout": rng})
    return logits, updates["batch_stats"]


def _descend(state: TrainState, images: jax.Array, rng: jax.Array,
             loss_of: Callable[[jax.Array], jax.Array]) -> tuple[TrainState, jax.Array, jax.Array]:
    """One gradient step on ``loss_of(logits)``: the new state (BatchNorm statistics
    included), the loss and the logits, which both steps reuse for their metrics."""
    def objective(params):
        logits, batch_stats = _apply_train(state, params, images, rng)
        return loss_of(logits), (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss, logits


def teacher_step(state: TrainState, images: jax.Array, labels: jax.Array, rng: jax.Array,
                 label_smoothing: float = 0.0) -> tuple[TrainState, Metrics]:
    """One cross-entropy step on labelled images."""
    state, loss, logits = _descend(state, images, rng,
                                   lambda logits: cross_entropy(logits, labels, label_smoothing))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return state, {"train_loss": loss, "train_accuracy": accuracy}


def _soft_step(teacher_apply: Callable, temperature: float, alpha: float, teacher_variables: dict,
               state: TrainState, images: jax.Array, labels: jax.Array | None,
               rng: jax.Array) -> tuple[TrainState, Metrics]:
    teacher_logits = jax.lax.stop_gradient(teacher_apply(teacher_variables, images, train=False))
    state, loss, logits = _descend(
        state, images, rng,
        lambda logits: distillation_loss(logits, teacher_logits, temperature, alpha, labels))
    agreement = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1))
    return state, {"distill_loss": loss, "train_agreement": agreement}


def _label_free_step(teacher_apply, temperature, teacher_variables, state, images, rng):
    return _soft_step(teacher_apply, temperature, 1.0, teacher_variables, state, images, None, rng)


def make_distill_step(teacher_apply: Callable, teacher_variables: dict, temperature: float,
                      alpha: float = 1.0) -> StepFn:
    """The student's step, closing over the frozen teacher.

    The teacher runs in inference mode on exactly the augmented batch the student sees, and
    only the student is differentiated. With ``alpha == 1`` the step is
    ``step(state, images, rng)``: it has no way to receive labels; otherwise
    ``step(state, images, labels, rng)``.

    The closure is a ``jax.tree_util.Partial``: a pytree whose leaves are the teacher's
    arrays, so when the step is handed to a jitted program they enter it as arguments. A plain
    Python closure would bake ~45 MB of ResNet-18 weights into the compiled program as
    constants. Nothing ever updates them: the teacher stays bit-identical.
    """
    if alpha == 1.0:
        step = partial(_label_free_step, teacher_apply, temperature)
    else:
        step = partial(_soft_step, teacher_apply, temperature, alpha)
    return jax.tree_util.Partial(step, teacher_variables)


def make_teacher_step(label_smoothing: float = 0.0) -> StepFn:
    """``teacher_step`` as a pytree callable, like :func:`make_distill_step`."""
    return jax.tree_util.Partial(partial(teacher_step, label_smoothing=label_smoothing))


# --------------------------------------------------------------------------- the hot loop
_IMAGE_COINS = 2**31 - 1
@partial(jax.jit, static_argnames=("length", "augmentation", "mesh"), donate_argnames=("state",))
def run_steps(step: StepFn, state: TrainState, arrays: tuple[jax.Array, ...], order: jax.Array,
              num_steps: jax.Array, first: jax.Array, key: jax.Array, *, length: int,
              augmentation: data.Augmentation, mesh: Mesh) -> tuple[TrainState, Metrics]:
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


def default_steps_per_dispatch() -> int:
    """One step per dispatch on CPU (see :func:`run_steps`), ten under a scan elsewhere."""
    return 1 if jax.default_backend() == "cpu" else 10


def epoch_order(key: jax.Array, epoch: int, num_examples: int, batch_size: int,
                padded_steps: int) -> jax.Array:
    """The epoch's shuffled [padded_steps, batch_size] index table (a partial batch is dropped).

    Depends on the seed's key and the epoch number only.
    """
    steps = num_examples // batch_size
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
    order = perm[: steps * batch_size].reshape(steps, batch_size)
    return jnp.pad(order, ((0, padded_steps - steps), (0, 0)))


def make_predict(model: nn.Module, augmentation: data.Augmentation, batch_size: int,
                 mesh: Mesh, tta: str = "none") -> Callable[[dict, jax.Array], jax.Array]:
    """``predict(variables, uint8_images) -> float32 logits`` in inference mode, batched on device.

    Images are padded to whole batches and mapped over in one dispatch; each batch is sharded
    over the mesh. With ``tta`` other than ``none`` the logits are the mean over the views of
    :func:`kd_jax.data.tta_views` (test-time augmentation).
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
            views = data.tta_views(batch, tta)
            return sum(model.apply(variables, augmentation.normalize(view), train=False)
                       for view in views) / len(views)

        logits = jax.lax.map(one, images.reshape(-1, batch_size, *images.shape[1:]))
        return logits.reshape(padded, -1)[:n]

    return predict


def fit(config: RunConfig, step: StepFn, state: TrainState, train_arrays: Sequence[np.ndarray],
        evaluate: Callable[[TrainState], dict], schedule: optax.Schedule, run: RunDir,
        augmentation: data.Augmentation, mesh: Mesh) -> tuple[TrainState, list[dict], dict]:
    """The epoch loop shared by teacher and student.

    Trains ``step`` over ``train_arrays`` (images first) for ``config.epochs``, evaluates and
    checkpoints after every epoch, and appends a metrics row per epoch. Returns the final
    state, every epoch's metrics, and timing figures (compile time kept apart).

    Dispatches are asynchronous; metrics are fetched (and checked for NaN) about ten times an
    epoch, so the host never makes the device wait in between.

    Crash safety: data order depends on (seed, epoch) and augmentation on (seed, step) only,
    and a checkpoint carries the epoch's partial metric sums, so ``--resume`` from any
    checkpoint ends bit-identical to a run never stopped. At an epoch's end the metrics row is
    written *before* the checkpoint; a resumed run drops rows newer than its checkpoint, so a
    kill between the two loses nothing. Checkpoints are also written every
    ``config.checkpoint_every_steps`` steps, and when SIGTERM or SIGINT asks the run to stop.
    A step's metrics are checked for NaN before any checkpoint of its state is written.
    """
    num_examples = len(train_arrays[0])
    check_batch_size(config.batch_size, num_examples, mesh)
    steps_per_epoch = num_examples // config.batch_size
    per_dispatch = min(config.steps_per_dispatch or default_steps_per_dispatch(), steps_per_epoch)
    padded_steps = math.ceil(steps_per_epoch / per_dispatch) * per_dispatch
    fetch_every = max(per_dispatch, steps_per_epoch // 10)

    replicated = NamedSharding(mesh, P())
    arrays = tuple(jax.device_put(a, replicated) for a in train_arrays)
    state = jax.device_put(state, replicated)
    checkpoints = RunCheckpoints(run.path)
    history: list[dict] = []
    partial: dict = {}  # the resumed epoch's metric sums up to the checkpoint
    if config.resume:
        restored = checkpoints.restore_latest(state)
        if restored is not None:
            state, partial = restored
            history = run.read_metrics(up_to_epoch=int(state.step) // steps_per_epoch)
            print(f"resuming from step {int(state.step)} ({checkpoints.latest_path()})",
                  flush=True)
            _restore_best(checkpoints, state, history)
    run.write_metrics(history)
    order_key, step_key = jax.random.split(jax.random.key(config.seed))
    num_steps = np.int32(steps_per_epoch)

    start = time.perf_counter()
    order = epoch_order(order_key, 0, num_examples, config.batch_size, padded_steps)
    compiled = run_steps.lower(step, state, arrays, order, num_steps, np.int32(0), step_key,
                               length=per_dispatch, augmentation=augmentation,
                               mesh=mesh).compile()
    timing = {"compile_seconds": time.perf_counter() - start, "train_seconds": 0.0}

    start_step = int(state.step)
    best = max((row["test_accuracy"] for row in history), default=-1.0)
    every = config.checkpoint_every_steps
    try:
        with StopOnSignal() as stop:
            for epoch in range(start_step // steps_per_epoch, config.epochs):
                order = epoch_order(order_key, epoch, num_examples, config.batch_size,
                                    padded_steps)
                first_row = max(start_step - epoch * steps_per_epoch, 0)
                meter = _EpochMeter(steps_per_epoch, first_row, config.batch_size, epoch,
                                    f"epoch {epoch + 1}/{config.epochs}", config.progress,
                                    partial if first_row else {})
                pending = []
                for first in range(first_row, steps_per_epoch, per_dispatch):
                    state, metrics = compiled(step, state, arrays, order, num_steps,
                                              np.int32(first), step_key)
                    state = faults.reach("step", state)
                    pending.append(metrics)
                    last = min(first + per_dispatch, steps_per_epoch)
                    begun = epoch * steps_per_epoch
                    crossed = every and (begun + last) // every > (begun + first) // every
                    if last < steps_per_epoch and (crossed or stop.received):
                        meter.add(pending, run)
                        pending = []
                        check_finite(state, run)
                        checkpoints.save(state, meter.snapshot())
                        faults.reach("checkpoint")
                        stop.raise_if_stopping(state, checkpoints)
                    elif last >= min(steps_per_epoch, meter.done + fetch_every):
                        meter.add(pending, run)
                        pending = []
                epoch_seconds = meter.close()
                check_finite(state, run)
                start = time.perf_counter()
                row = {"epoch": epoch + 1, "step": int(state.step), **meter.means(),
                       **evaluate(state), "learning_rate": float(schedule(int(state.step) - 1)),
                       "images_per_second": meter.images / epoch_seconds,
                       "epoch_seconds": epoch_seconds,
                       "eval_seconds": time.perf_counter() - start}
                faults.reach("eval")
                timing["train_seconds"] += epoch_seconds
                history.append(row)
                run.write_metrics(history)
                faults.reach("metrics")
                checkpoints.save(state, {}, is_best=row["test_accuracy"] > best)
                faults.reach("checkpoint")
                best = max(best, row["test_accuracy"])
                if config.progress:
                    print(format_row(row), flush=True)
                stop.raise_if_stopping(state, checkpoints)
    finally:
        checkpoints.close()
    timing["checkpoint"] = str(checkpoints.latest_path())
    return state, history, timing


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    return jax.tree.reduce(jnp.logical_and, jax.tree.map(lambda a: jnp.all(jnp.isfinite(a)), tree))


def check_finite(state: TrainState, run: RunDir) -> None:
    """Refuse to evaluate or checkpoint non-finite weights.

    The loss check sees a step's loss, computed before its update: a finite loss with
    non-finite gradients leaves NaN weights that only the next step's loss would reveal, too
    late if a checkpoint is written in between.
    """
    if not bool(_all_finite((state.params, state.batch_stats))):
        raise KdError(f"non-finite weights after step {int(state.step)}; stopped, the last good "
                      f"checkpoint is kept in {run.path / 'checkpoints'}")


def _restore_best(checkpoints: RunCheckpoints, state: TrainState, history: list[dict]) -> None:
    """Save the resumed state as the best if its epoch is the best and a kill cut that save."""
    best_row = max(history, key=lambda row: row["test_accuracy"], default=None)
    if best_row is not None and best_row["step"] == int(state.step):
        checkpoints.save_best(state)


class StopOnSignal:
    """SIGTERM and SIGINT (preemption, Ctrl-C) as a request to stop at the next step boundary.

    The loop then writes a checkpoint and :meth:`raise_if_stopping` ends the run with
    :class:`Interrupted`, which says how to resume. A second signal stops at once, without a
    checkpoint. Handlers are installed only in the main thread (Python allows no other) and
    the previous ones come back on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self) -> StopOnSignal:
        self.received: int | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        print(f"\n{signal.Signals(signum).name} received: stopping after this step to write a "
              "checkpoint (send it again to stop at once, without one)", file=sys.stderr,
              flush=True)

    def raise_if_stopping(self, state: TrainState, checkpoints: RunCheckpoints) -> None:
        if self.received is not None:
            raise Interrupted(f"stopped by {signal.Signals(self.received).name} at step "
                              f"{int(state.step)}; checkpoint saved in "
                              f"{checkpoints.latest_path()}; rerun the same command with "
                              "--resume to continue", self.received)


class _EpochMeter:
    """Per-epoch bookkeeping: fetched metrics, the NaN check, the progress bar, the clock.

    Metric sums are accumulated one step at a time in float64, in step order, so they do not
    depend on how steps were grouped into fetches, nor on where a resumed run restarted.
    """

    def __init__(self, steps: int, first: int, batch_size: int, epoch: int, desc: str,
                 show: bool, partial: dict):
        self.steps, self.done, self.batch_size, self.epoch = steps, first, batch_size, epoch
        self.first = first
        self.sums: dict[str, float] = dict(partial.get("sums", {}))
        self.counted = partial.get("steps", 0)
        self.bar = tqdm(total=steps, initial=first, disable=not show, desc=desc, unit="step",
                        leave=False)
        self.start = time.perf_counter()

    @property
    def images(self) -> int:
        return (self.done - self.first) * self.batch_size

    def add(self, pending: list[Metrics], run: RunDir) -> None:
        """Fetch the metrics of finished dispatches; stop on a non-finite loss."""
        fetched = {k: np.concatenate([np.asarray(m[k]) for m in pending]) for k in pending[0]}
        fetched = {k: v[: self.steps - self.done] for k, v in fetched.items()}  # drop padding
        loss_name = next(k for k in fetched if k.endswith("loss"))
        losses = fetched[loss_name]
        if not np.all(np.isfinite(losses)):
            bad = self.epoch * self.steps + self.done + int(np.argmin(np.isfinite(losses))) + 1
            raise KdError(f"non-finite {loss_name} at step {bad}; stopped, the last good "
                          f"checkpoint is kept in {run.path / 'checkpoints'}")
        for k, v in fetched.items():
            for x in v.tolist():
                self.sums[k] = self.sums.get(k, 0.0) + x
        self.counted += len(losses)
        self.done += len(losses)
        self.bar.update(len(losses))
        elapsed = time.perf_counter() - self.start
        self.bar.set_postfix({loss_name: f"{losses[-1]:.3f}",
                              "img/s": f"{self.images / elapsed:.0f}"})

    def snapshot(self) -> dict:
        """The sums so far, for a mid-epoch checkpoint (JSON keeps floats exactly)."""
        return {"sums": self.sums, "steps": self.counted}

    def means(self) -> dict[str, float]:
        return {k: v / self.counted for k, v in self.sums.items()}

    def close(self) -> float:
        """Seconds since the epoch began (all its metrics were fetched: the device is done)."""
        self.bar.close()
        return time.perf_counter() - self.start
