"""orbax checkpoints of a run: the latest (for --resume) and the best, plus frozen restore.

Layout under a workdir: ``checkpoints/latest/<step>`` and ``checkpoints/best/<step>``, each the
whole train state (params, batch_stats, optimizer state, step) in orbax's own format. orbax
writes into a temporary folder and renames it when complete, so a crash mid-write leaves the
previous checkpoint as the latest. A write that fails (a full disk, a quota, a read-only
folder) is a :class:`WriteFailed` naming the checkpoint, wherever orbax lets it surface: its
writes run in the background, so an error can come out of the next save or of ``close``.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from kd_jax.core.features import without_adapters
from kd_jax.core.models import create_model, model_options
from kd_jax.core.rundir import read_json
from kd_jax.errors import KdError, WriteFailed

# How tensorstore's errors (wrapped in orbax's ValueErrors) carry the failed call's errno.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


class RunCheckpoints:
    """The two checkpoint series of one run.

    A ``latest`` checkpoint holds two items: ``default``, the train state, and ``meter``, the
    running sums of the epoch's train metrics up to that step (empty at an epoch boundary), so
    a run resumed mid-epoch reports the same epoch means as one never stopped. Both items are
    committed together: a checkpoint is either whole or ignored.
    """

    def __init__(self, workdir: str | Path, keep_latest: int = 2):
        root = Path(workdir).absolute() / "checkpoints"
        ignore_late_completions()
        # cleanup_tmp_directories: a process killed mid-write leaves a temporary folder behind.
        # A checkpoint's folder is created before save returns, not in the background: when
        # orbax's background creation fails (read-only, full), its writer threads wait 20
        # minutes for the folder, and the process cannot exit until they give up.
        options = lambda keep: ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
        with _writing(root):
            self.latest = ocp.CheckpointManager(root / "latest", options=options(keep_latest),
                                                item_names=("default", "meter"))
            self.best = ocp.CheckpointManager(root / "best", options=options(1))
        self._in_flight: dict[ocp.CheckpointManager, Path] = {}

    def save(self, state: Any, meter: dict, is_best: bool = False) -> None:
        self._start(self.latest, int(state.step), ocp.args.Composite(
            default=ocp.args.StandardSave(state), meter=ocp.args.JsonSave(meter)))
        if is_best:
            # orbax names its multi-process commit barrier after the step alone: two managers
            # committing the same step at once collide ("barrier already ongoing") and hang.
            self._finish(self.latest)
            self.save_best(state)

    def save_best(self, state: Any) -> None:
        """Save ``state`` as the best, unless its step is already there (a resumed run redoes
        the steps a killed one may have saved)."""
        step = int(state.step)
        if step not in self.best.all_steps():
            self._start(self.best, step, ocp.args.StandardSave(state))

    def _start(self, manager: ocp.CheckpointManager, step: int, args: Any) -> None:
        """Begin writing checkpoint ``step`` (orbax finishes it in the background). The write
        in flight is waited for first, so a failure it met is charged to it, not to this one."""
        self._finish(manager)
        path = Path(manager.directory) / str(step)
        with _writing(path):
            manager.save(step, args=args)
        self._in_flight[manager] = path

    def _finish(self, manager: ocp.CheckpointManager) -> None:
        """Wait for ``manager``'s write in flight: where its failure, if any, comes out."""
        path = self._in_flight.pop(manager, None)
        if path is not None:
            with _writing(path):
                manager.wait_until_finished()

    def restore_latest(self, like: Any) -> Restored | None:
        """The newest intact checkpoint, its state shaped and sharded like ``like``; None when
        there is no checkpoint at all.

        One that cannot be restored (a truncated or damaged file) is passed over for the one
        before, and deleted once that one restores: the resumed run redoes its steps and saves
        them again, bit for bit (orbax skips a save at or before its latest step, so one left
        in place would stay, damaged). When none restores, a one-line ``KdError``, and nothing
        is deleted.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        args = ocp.args.Composite(default=ocp.args.StandardRestore(abstract),
                                  meter=ocp.args.JsonRestore())
        damaged: dict[int, str] = {}
        for step in sorted(self.latest.all_steps(), reverse=True):
            try:
                restored = self.latest.restore(step, args=args)
            except Exception as e:  # orbax raises many kinds of errors for damaged files
                damaged[step] = type(e).__name__
                continue
            path = self._step_path(step)
            for bad in damaged:
                self.latest.delete(bad)
            notes = [f"{self._step_path(bad)}: corrupt or unreadable checkpoint ({kind}); "
                     f"deleted, resuming from {path}" for bad, kind in damaged.items()]
            return Restored(restored["default"], restored["meter"], path, notes)
        if damaged:
            found = ", ".join(f"{step}: {kind}" for step, kind in damaged.items())
            raise KdError(f"{self.latest.directory}: every checkpoint is corrupt or unreadable "
                          f"({found}); start the run over (--overwrite, overwrite=True)")
        return None

    def _step_path(self, step: int) -> Path:
        return Path(self.latest.directory) / str(step)

    def latest_path(self) -> Path:
        return self._step_path(self.latest.latest_step())

    def wait(self) -> None:
        """Block until the writes in flight are on disk; raises the failure of one."""
        self._finish(self.latest)
        self._finish(self.best)

    def close(self) -> None:
        """:meth:`wait`, then let orbax go, whether or not a write failed. orbax's own close
        raises a failed write once more: the first report of it is the one raised."""
        failure = None
        try:
            self.wait()
        except WriteFailed as e:
            failure = e
        for manager in (self.latest, self.best):
            try:
                with _writing(Path(manager.directory)):
                    manager.close()
            except WriteFailed as e:
                failure = failure or e
        if failure is not None:
            raise failure


def ignore_late_completions() -> None:
    """Keep the reads and writes a failed restore or save left behind from printing a traceback.

    orbax restores and saves inside ``asyncio.run``: the first damaged file, or the first
    write the disk refuses, ends it and closes its event loop while tensorstore still reads or
    writes the other files. One that completes after that reports to the closed loop, and the
    ``RuntimeError: Event loop is closed`` it meets goes to ``sys.unraisablehook``, which
    prints it to stderr, at any moment, before or after the run's one-line error. Exactly that
    error is dropped; every other one goes to the hook that was there before. Installed once:
    by the first :class:`RunCheckpoints`, before any write (orbax saves in a background
    thread, so a late report can come before the failure reaches the caller), and by
    :func:`load_frozen` when its restore fails.
    """
    if getattr(sys.unraisablehook, "ignores_late_completions", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not _is_late_completion(unraisable):
            previous(unraisable)

    hook.ignores_late_completions = True
    sys.unraisablehook = hook


def _is_late_completion(unraisable: Any) -> bool:
    """Whether ``unraisable`` is a completion reported to an event loop already closed."""
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
        return False
    frames = [frame.f_code.co_name for frame, _ in traceback.walk_tb(unraisable.exc_traceback)]
    return "call_soon_threadsafe" in frames


@dataclass(frozen=True)
class Restored:
    """What :meth:`RunCheckpoints.restore_latest` resumes from: the train state, the epoch's
    partial metric sums, the checkpoint's path, and a line for each newer one found damaged."""

    state: Any
    meter: dict
    path: Path
    damaged: list[str]


def latest_checkpoint(workdir: str | Path) -> Path | None:
    """The newest complete checkpoint of the run in ``workdir`` (orbax moves one into place
    only once it is whole); None when there is none."""
    root = Path(workdir).absolute() / "checkpoints" / "latest"
    steps = ocp.utils.checkpoint_steps(root) if root.is_dir() else []
    return root / str(max(steps)) if steps else None


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """A failed checkpoint write as a :class:`WriteFailed` naming ``path``. orbax raises
    OSErrors, or tensorstore's errors inside ValueErrors that carry the errno
    (``RESOURCE_EXHAUSTED: Error writing ... [os_error_code='28']``); an error with no failed
    system call in it is no write failure and passes unchanged."""
    try:
        yield
    except Exception as e:
        reason = _os_error(e)
        if reason is None:
            raise
        raise WriteFailed(path, reason) from e


def _os_error(error: BaseException | None) -> str | None:
    """The system's words for the first failed call in ``error`` or what it was raised from."""
    while error is not None:
        if isinstance(error, OSError) and error.errno:
            return os.strerror(error.errno)
        code = _OS_ERROR_CODE.search(str(error))
        if code:
            return os.strerror(int(code.group(1)))
        error = error.__cause__ or error.__context__
    return None


@dataclass(frozen=True)
class FrozenModel:
    """A trained model as a fixed function: its config and inference variables."""

    config: dict  # the run's resolved config (model name, width, dataset, ...)
    variables: dict  # {"params": ..., "batch_stats": ...}
    checkpoint: Path

    def build(self, num_classes: int, dtype: Any = jnp.float32,
              conv: nn.Module | None = None) -> nn.Module:
        """The registered model this run trained, with the options its config names."""
        name, width = self.model_spec
        return create_model(name, num_classes, width, dtype, conv=conv,
                            **model_options(self.config))

    @property
    def model_spec(self) -> tuple[str, int | None]:
        """(registered model name, width), whether the run trained a teacher or a student."""
        if "student" in self.config:
            return self.config["student"], self.config.get("student_width")
        if "model" in self.config:
            return self.config["model"], self.config.get("width")
        raise KdError("config.json names no model (neither 'model' nor 'student')")


def _on_one_device(metadata: Any) -> Any:
    """A restore target: every array as saved, but placed on this process's first device.

    Without one, orbax places arrays as they were sharded when saved, which fails wherever
    the devices differ: a teacher trained on a GPU or on several CPU devices, loaded here.
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        metadata)


def load_frozen(workdir: str | Path) -> FrozenModel:
    """Restore the last checkpoint of a finished (or interrupted) run for inference."""
    workdir = Path(workdir).absolute()  # orbax refuses relative paths
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise KdError(f"{workdir}: not a kd-jax run (no config.json)")
    config = read_json(config_path)
    path = latest_checkpoint(workdir)
    root = workdir / "checkpoints" / "latest"
    if path is None:
        raise KdError(f"{workdir}: no checkpoint found under {root}")
    step = int(path.name)
    # Through a manager that knows both items' handlers: restoring the item folder on its own
    # works too, but logs a warning about metadata orbax keeps one level up, on every load.
    handlers = {"default": ocp.StandardCheckpointHandler(), "meter": ocp.JsonCheckpointHandler()}
    try:
        with ocp.CheckpointManager(root, item_handlers=handlers,
                                   options=ocp.CheckpointManagerOptions(create=False)) as manager:
            target = _on_one_device(manager.item_metadata(step)["default"])
            restored = manager.restore(step, args=ocp.args.Composite(
                default=ocp.args.StandardRestore(target)))["default"]
    except Exception as e:  # orbax raises many kinds of errors for damaged files
        ignore_late_completions()
        raise KdError(f"{path}: corrupt or unreadable checkpoint ({type(e).__name__})") from None
    # A run that kept a weight average evaluated it: that is the trained model.
    averaged = bool(restored.get("ema_params"))
    prefix = "ema_" if averaged else ""
    # Models without BatchNorm (MLPs) have no batch_stats collection: leave it out rather
    # than add an empty one, so the tree matches the model's own variables.
    # A feature method's adapters trained with the student; they are no part of the model.
    variables = {"params": without_adapters(restored[f"{prefix}params"])}
    if restored.get(f"{prefix}batch_stats"):
        variables["batch_stats"] = restored[f"{prefix}batch_stats"]
    return FrozenModel(config, variables, path)
