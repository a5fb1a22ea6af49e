"""The project's own error type, and the guard that turns a user's error into one line.

Every layer raises :class:`KdError` for what a user can cause; the entry points (the two jobs,
``python -m kd_jax.export/predict/report``) run under :func:`run_guarded`, which prints it as
``error: ...`` instead of a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class KdError(Exception):
    """A problem with the user's input (flags, config, data, checkpoints), stated in one line."""


class Interrupted(KdError):
    """The run was asked to stop (SIGTERM, Ctrl-C) and saved a checkpoint to resume from."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for "ended by signal N"


class WriteFailed(KdError):
    """A run's file could not be written: a full disk, a quota, a read-only or forbidden
    folder. ``reason`` is the system's own words ("No space left on device"). Whoever knows
    the run's checkpoints adds which one is intact (:mod:`kd_jax.api` does)."""

    def __init__(self, path: object, reason: str):
        super().__init__(f"{path}: cannot write ({reason})")
        self.path, self.reason = path, reason


def run_guarded(job: Callable[[], object], debug: bool = False) -> int:
    """Run ``job()``; a ``KdError`` (exit 2, an interrupted run 128 + the signal number), an
    ``OSError`` (a file named by the user that cannot be read or written) or a second Ctrl-C
    (exit 130) becomes an ``error: ...`` line."""
    try:
        job()
    except (KdError, OSError, KeyboardInterrupt) as e:
        if debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else getattr(e, "exit_code", 2)
    return 0


def _one_line(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return " ".join(str(error).split()) or type(error).__name__
