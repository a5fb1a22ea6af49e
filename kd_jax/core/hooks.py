"""The loop's hooks: checkpoints (and resume), the metrics file, progress, stopping on a signal.

Crash safety comes from the order of events at an epoch's end: :class:`MetricsWriter` writes
the row when it is evaluated, *before* :class:`Checkpointer` saves the state at the epoch's
end, and a resumed run drops rows newer than its checkpoint (the checkpointer, listed first,
restores before the writer rewrites the file), so a kill between the two loses nothing;
a step's metrics and the weights are checked for non-finite values (``trainer.sync``) before
any checkpoint of that state is written.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from kd_jax.core.checkpoint import RunCheckpoints
from kd_jax.core.rundir import RunDir, format_row
from kd_jax.core.trainer import Hook, Trainer
from kd_jax.errors import Interrupted


class MetricsWriter(Hook):
    """Rewrites ``metrics.jsonl`` (atomically) with every row: at the start (a resumed run's
    rows, as far as its checkpoint) and as soon as each epoch's row is evaluated."""

    def __init__(self, run: RunDir):
        self.run = run

    def on_start(self, trainer: Trainer) -> None:
        self.run.write_metrics(trainer.history)

    def after_evaluate(self, trainer: Trainer, row: dict) -> None:
        self.run.write_metrics(trainer.history)
        trainer.emit("after_save", "metrics")


class Checkpointer(Hook):
    """orbax checkpoints of the run: after every epoch, every ``every_steps`` steps, and when a
    signal asks the run to stop; with ``resume``, the run continues from the latest one.

    A mid-epoch checkpoint carries the epoch's partial metric sums, so the resumed epoch
    reports the same means. ``read_history(epoch)`` gives the rows of the epochs up to the
    restored one. With ``best_metric`` (a validation figure, never a test one), the epoch
    with its highest value is also kept under ``checkpoints/best``.
    """

    def __init__(self, workdir: Path, *, every_steps: int = 0, resume: bool = False,
                 read_history: Callable[[int], list[dict]] | None = None,
                 best_metric: str | None = None):
        self.workdir, self.every, self.resume = workdir, every_steps, resume
        self.read_history, self.best_metric = read_history, best_metric

    def on_start(self, trainer: Trainer) -> None:
        self.checkpoints = RunCheckpoints(self.workdir)
        trainer.checkpoint_dir = self.workdir / "checkpoints"
        restored = self.checkpoints.restore_latest(trainer.state) if self.resume else None
        if restored is None:
            return
        for note in restored.damaged:
            print(note, file=sys.stderr, flush=True)
        trainer.state, trainer.resumed_sums = restored.state, restored.meter
        step = int(trainer.state.step)
        if self.read_history is not None:
            trainer.history = self.read_history(step // trainer.steps_per_epoch)
        print(f"resuming from step {step} ({restored.path})", flush=True)
        if self.best_metric and self._is_best(trainer, trainer.history):
            self.checkpoints.save_best(trainer.state)  # a kill may have cut that save

    def after_dispatch(self, trainer: Trainer, before: int, after: int) -> None:
        mid_epoch = after % trainer.steps_per_epoch != 0
        crossed = self.every and after // self.every > before // self.every
        if mid_epoch and (crossed or trainer.stop_requested is not None):
            trainer.sync()
            self._save(trainer, trainer.meter.snapshot())

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        is_best = bool(self.best_metric) and self._is_best(trainer, trainer.history)
        self._save(trainer, {}, is_best)

    def _is_best(self, trainer: Trainer, history: list[dict]) -> bool:
        """Whether the state's epoch (the last row) has the best ``best_metric`` so far."""
        if not history or history[-1]["step"] != int(trainer.state.step):
            return False
        earlier = (row[self.best_metric] for row in history[:-1])
        return history[-1][self.best_metric] > max(earlier, default=float("-inf"))

    def _save(self, trainer: Trainer, sums: dict, is_best: bool = False) -> None:
        self.checkpoints.save(trainer.state, sums, is_best)
        trainer.timing["checkpoint"] = str(self.checkpoints.latest_path())
        trainer.emit("after_save", "checkpoint")

    def close(self, trainer: Trainer) -> None:
        if hasattr(self, "checkpoints"):
            self.checkpoints.close()


class Progress(Hook):
    """A progress bar per epoch (loss, images/s) and one printed line of metrics after it."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.meter = None

    def after_dispatch(self, trainer: Trainer, before: int, after: int) -> None:
        meter = trainer.meter
        if meter is not self.meter:
            self._close()
            self.meter = meter
            self.bar = tqdm(total=meter.steps, initial=meter.first, unit="step", leave=False,
                            desc=f"epoch {meter.epoch + 1}/{trainer.epochs}")
        if meter.done > self.bar.n:
            self.bar.update(meter.done - self.bar.n)
            loss = next((k for k in meter.last if k.endswith("loss")), None)
            rate = meter.images / max(meter.seconds(), 1e-9)
            self.bar.set_postfix({**({loss: f"{meter.last[loss]:.3f}"} if loss else {}),
                                  "img/s": f"{rate:.0f}"})

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        self._close()
        print(format_row(row), flush=True)

    def close(self, trainer: Trainer) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StopOnSignal(Hook):
    """SIGTERM and SIGINT (preemption, Ctrl-C) as a request to stop at the next step boundary.

    The request is ``trainer.stop_requested``; a :class:`Checkpointer` earlier in the list
    then saves, and this hook ends the run with :class:`Interrupted`, naming the checkpoint.
    A second signal stops at once, without a checkpoint. Handlers are installed only in the
    main thread (Python allows no other) and the previous ones come back on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def on_start(self, trainer: Trainer) -> None:
        self.trainer, self.previous = trainer, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, frame: object) -> None:
        if self.trainer.stop_requested is not None:
            raise KeyboardInterrupt
        self.trainer.stop_requested = signum
        print(f"\n{signal.Signals(signum).name} received: stopping after this step to write a "
              "checkpoint (send it again to stop at once, without one)", file=sys.stderr,
              flush=True)

    def after_dispatch(self, trainer: Trainer, before: int, after: int) -> None:
        if after % trainer.steps_per_epoch:  # at an epoch's end, after its checkpoint
            self._raise_if_stopping(trainer)

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        self._raise_if_stopping(trainer)

    def _raise_if_stopping(self, trainer: Trainer) -> None:
        signum = trainer.stop_requested
        if signum is None:
            return
        saved = trainer.timing.get("checkpoint")
        where = f"checkpoint saved in {saved}" if saved else "nothing saved (no workdir)"
        raise Interrupted(f"stopped by {signal.Signals(signum).name} at step "
                          f"{int(trainer.state.step)}; {where}", signum)

    def close(self, trainer: Trainer) -> None:
        for s, handler in getattr(self, "previous", {}).items():
            signal.signal(s, handler)
