"""The training loop: dispatch jitted steps over device-resident data, evaluate, call hooks.

:class:`Trainer` does three things and nothing else: it runs ``step`` over the epochs (several
steps per dispatch, dispatches left asynchronous), it fetches the steps' metrics about ten
times an epoch to check them and sum them, and after every epoch it evaluates and records a
row of metrics. Everything else is a :class:`Hook` (jaxline's periodic actions): resuming and
checkpointing, writing the run's files, the progress bar, stopping on a signal; the tests add
their own (fault injection).

Determinism: data order depends on (seed, epoch) and augmentation on (seed, step) only, and a
run resumed at any step sums the same per-step metrics in the same order, so it ends
bit-identical to a run never stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax.core.devices import check_batch_size, default_steps_per_dispatch
from kd_jax.core.evaluation import Evaluator, evaluate_all
from kd_jax.core.steps import StepFn, TrainState, epoch_order, run_steps
from kd_jax.errors import KdError


class Hook:
    """A periodic action of the loop. Every method is a no-op; a hook overrides what it needs.

    Hooks are called in list order. ``after_dispatch`` runs after every dispatch (of
    ``trainer.per_dispatch`` steps, ``before`` and ``after`` being the global step numbers),
    so it must stay cheap; ``after_evaluate`` sees the epoch's row once it is in
    ``trainer.history``; ``after_save`` is called by whatever hook wrote ``what``
    (``"metrics"`` or ``"checkpoint"``); ``close`` runs whether the run ended or failed, and
    whether or not another hook's ``close`` raised.
    """

    def on_start(self, trainer: Trainer) -> None: ...
    def after_dispatch(self, trainer: Trainer, before: int, after: int) -> None: ...
    def after_evaluate(self, trainer: Trainer, row: dict) -> None: ...
    def on_epoch_end(self, trainer: Trainer, row: dict) -> None: ...
    def after_save(self, trainer: Trainer, what: str) -> None: ...
    def on_end(self, trainer: Trainer) -> None: ...
    def close(self, trainer: Trainer) -> None: ...


class Trainer:
    """Trains ``state`` with ``step`` on ``arrays`` (images first) for ``epochs`` epochs.

    ``preprocess`` turns stored images into model inputs inside the step
    (:mod:`kd_jax.core.augment`); ``evaluators`` give each epoch's eval metrics from the
    state's inference variables; ``schedule``, if known, fills the ``learning_rate`` column.
    After :meth:`fit`, ``history`` holds one row per epoch and ``timing`` the compile and
    training seconds.
    """

    def __init__(self, step: StepFn, state: TrainState, arrays: Sequence[np.ndarray], *,
                 epochs: int, batch_size: int, seed: int, preprocess: Any, mesh: Mesh,
                 evaluators: Sequence[Evaluator] = (), hooks: Sequence[Hook] = (),
                 schedule: optax.Schedule | None = None, steps_per_dispatch: int = 0):
        num_examples = len(arrays[0])
        check_batch_size(batch_size, num_examples, mesh)
        self.step, self.epochs, self.batch_size, self.seed = step, epochs, batch_size, seed
        self.preprocess, self.mesh, self.schedule = preprocess, mesh, schedule
        self.evaluators, self.hooks = list(evaluators), list(hooks)
        self.steps_per_epoch = num_examples // batch_size
        self.per_dispatch = min(steps_per_dispatch or default_steps_per_dispatch(),
                                self.steps_per_epoch)
        self.padded_steps = math.ceil(self.steps_per_epoch / self.per_dispatch) * self.per_dispatch
        replicated = NamedSharding(mesh, P())
        self.arrays = tuple(jax.device_put(a, replicated) for a in arrays)
        self.state = jax.device_put(state, replicated)
        self.num_examples = num_examples
        self.order_key, self.step_key = jax.random.split(jax.random.key(seed))
        self.history: list[dict] = []
        self.resumed_sums: dict = {}  # a mid-epoch checkpoint's metric sums (Checkpointer)
        self.checkpoint_dir: Path | None = None  # where a hook keeps checkpoints, if one does
        self.stop_requested: int | None = None  # a signal number, set by StopOnSignal
        self.timing: dict[str, Any] = {}
        self.meter: EpochMeter | None = None

    # ------------------------------------------------------------------ the loop
    def fit(self) -> tuple[TrainState, list[dict]]:
        """Run every epoch not yet done; returns the final state and every epoch's row."""
        try:
            self.emit("on_start")
            self._compile()
            for epoch in range(int(self.state.step) // self.steps_per_epoch, self.epochs):
                self._run_epoch(epoch)
            self.emit("on_end")
        except BaseException:
            self._close(failing=True)
            raise
        self._close(failing=False)
        return self.state, self.history

    def _close(self, failing: bool) -> None:
        """``close`` every hook, even after one raised (a checkpoint write that failed in the
        background comes out here; the signal handlers must come back all the same). The first
        error is raised, unless the run is already failing: that error is the one to report."""
        errors = []
        for hook in self.hooks:
            try:
                hook.close(self)
            except Exception as e:
                errors.append(e)
        if errors and not failing:
            raise errors[0]

    def _compile(self) -> None:
        start = time.perf_counter()
        self.start_step = int(self.state.step)
        self.compiled = run_steps.lower(
            self.step, self.state, self.arrays, self._order(0), np.int32(self.steps_per_epoch),
            np.int32(0), self.step_key, length=self.per_dispatch, augmentation=self.preprocess,
            mesh=self.mesh).compile()
        self.timing = {"compile_seconds": time.perf_counter() - start, "train_seconds": 0.0}

    def _order(self, epoch: int) -> jax.Array:
        return epoch_order(self.order_key, epoch, self.num_examples, self.batch_size,
                           self.padded_steps)

    def _run_epoch(self, epoch: int) -> None:
        begun = epoch * self.steps_per_epoch
        first_row = max(self.start_step - begun, 0)
        self.meter = EpochMeter(self, epoch, first_row, self.resumed_sums if first_row else {})
        order = self._order(epoch)
        for first in range(first_row, self.steps_per_epoch, self.per_dispatch):
            self.state, metrics = self.compiled(self.step, self.state, self.arrays, order,
                                                np.int32(self.steps_per_epoch), np.int32(first),
                                                self.step_key)
            self.meter.queue(metrics)
            last = min(first + self.per_dispatch, self.steps_per_epoch)
            self.emit("after_dispatch", begun + first, begun + last)
        self.sync()
        epoch_seconds = self.meter.seconds()
        row = self._record(epoch, epoch_seconds)
        self.timing["train_seconds"] += epoch_seconds
        self.emit("on_epoch_end", row)

    def _record(self, epoch: int, epoch_seconds: float) -> dict:
        """Evaluate and append the epoch's row of metrics."""
        start = time.perf_counter()
        row = {"epoch": epoch + 1, "step": int(self.state.step), **self.meter.means(),
               **evaluate_all(self.evaluators, self.state.inference_variables())}
        if self.schedule is not None:
            row["learning_rate"] = float(self.schedule(int(self.state.step) - 1))
        row |= {"images_per_second": self.meter.images / epoch_seconds,
                "epoch_seconds": epoch_seconds, "eval_seconds": time.perf_counter() - start}
        self.history.append(row)
        self.emit("after_evaluate", row)
        return row

    # ------------------------------------------------------------------ for hooks
    def emit(self, event: str, *args: Any) -> None:
        """Call ``event`` on every hook, in order."""
        for hook in self.hooks:
            getattr(hook, event)(self, *args)

    def sync(self) -> None:
        """Fetch every queued metric and check the weights: what a checkpoint needs first."""
        self.meter.fetch()
        if not bool(_all_finite((self.state.params, self.state.batch_stats))):
            self.fail(f"non-finite weights after step {int(self.state.step)}")

    def fail(self, what: str) -> None:
        """Stop the run on a numerical failure, saying which checkpoint is intact."""
        kept = f", the last good checkpoint is kept in {self.checkpoint_dir}" \
            if self.checkpoint_dir else ""
        raise KdError(f"{what}; stopped{kept}")


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    return jax.tree.reduce(jnp.logical_and, jax.tree.map(lambda a: jnp.all(jnp.isfinite(a)), tree))


class EpochMeter:
    """One epoch's train metrics: queued per dispatch, fetched in batches, summed in order.

    Metrics are fetched about ten times an epoch, so the host never makes the device wait in
    between; each fetch checks them for non-finite values (naming the first such metric in
    name order: a NaN loss leaves the accuracy finite). Sums are accumulated one step at a time
    in float64, in step order, so they do not depend on how steps were grouped into fetches,
    nor on where a resumed run restarted (``partial``: the sums a mid-epoch checkpoint saved).
    """

    def __init__(self, trainer: Trainer, epoch: int, first: int, partial: dict):
        self.trainer, self.epoch, self.first = trainer, epoch, first
        self.steps = trainer.steps_per_epoch
        self.done = self.queued_through = first
        self.fetch_every = max(trainer.per_dispatch, self.steps // 10)
        self.pending: list[dict] = []
        self.sums: dict[str, float] = dict(partial.get("sums", {}))
        self.counted = partial.get("steps", 0)
        self.last: dict[str, float] = {}
        self.start = time.perf_counter()

    @property
    def images(self) -> int:
        return (self.done - self.first) * self.trainer.batch_size

    def queue(self, metrics: dict) -> None:
        """Keep a dispatch's (asynchronous) metrics; fetch when enough have piled up."""
        self.pending.append(metrics)
        self.queued_through = min(self.queued_through + self.trainer.per_dispatch, self.steps)
        if self.queued_through >= min(self.steps, self.done + self.fetch_every):
            self.fetch()

    def fetch(self) -> None:
        """Bring the queued metrics to the host; stop on a non-finite one."""
        if not self.pending:
            return
        fetched = {k: np.concatenate([np.asarray(m[k]) for m in self.pending])
                   for k in self.pending[0]}
        self.pending = []
        fetched = {k: v[: self.steps - self.done] for k, v in fetched.items()}  # drop padding
        count = len(next(iter(fetched.values())))
        for name, values in fetched.items():
            if not np.all(np.isfinite(values)):
                bad = self.epoch * self.steps + self.done + int(np.argmin(np.isfinite(values)))
                self.trainer.fail(f"non-finite {name} at step {bad + 1}")
        for k, v in fetched.items():
            for x in v.tolist():
                self.sums[k] = self.sums.get(k, 0.0) + x
            self.last[k] = float(v[-1])
        self.counted += count
        self.done += count

    def snapshot(self) -> dict:
        """The sums so far, for a mid-epoch checkpoint (JSON keeps floats exactly)."""
        return {"sums": self.sums, "steps": self.counted}

    def means(self) -> dict[str, float]:
        return {k: v / self.counted for k, v in self.sums.items()}

    def seconds(self) -> float:
        """Seconds since the epoch began (once fetched, the device is done with it)."""
        return time.perf_counter() - self.start

