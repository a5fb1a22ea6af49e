"""Test-only fault injection, as a hook: make a run die, be preempted or go NaN at an exact point.

Crash-safety tests must SIGKILL a run at a precise moment (mid-step, after evaluation, while a
checkpoint is being written), which no outside timer hits reliably on a loaded machine.
:class:`FaultHook` counts passes through named points of the training loop and acts on the
``n``-th pass through one of them; a spec ``<action>@<point>:<n>`` names it:

- points: ``step`` (after a dispatch), ``eval`` (a row evaluated, not yet written),
  ``metrics`` (metrics.jsonl written), ``checkpoint`` (a checkpoint write started), ``end``
  (the last epoch done, before summary.json and the plot);
- actions: ``kill`` (SIGKILL: no cleanup of any kind runs), ``term`` (SIGTERM, as a
  preemption), ``int`` (SIGINT, as Ctrl-C), ``stop`` (SIGSTOP: the run freezes, alive and
  holding its workdir, until the test sends SIGCONT), ``nan`` (every parameter becomes NaN),
  ``fill`` (fill the workdir's filesystem, a test's small tmpfs, with ``<workdir>.ballast``
  until it refuses), ``readonly`` (bind-mount the workdir read-only over itself; root only).
  ``fill`` and ``readonly`` first wait for the checkpoint writes in flight, so the write
  they break is the next one, always the same.

``tests/fault_cli.py`` runs a job's command line with the hook from ``$KD_JAX_FAULT``.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess

import jax
import jax.numpy as jnp

from kd_jax import Hook
from kd_jax.core.hooks import Checkpointer

FAULT_ENV = "KD_JAX_FAULT"
_SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT,
            "stop": signal.SIGSTOP}
_DISK = ("fill", "readonly")
POINTS = ("step", "eval", "metrics", "checkpoint", "end")


def parse(spec: str) -> tuple[str, str, int]:
    """``"kill@step:3"`` -> ``("kill", "step", 3)``."""
    action, _, where = spec.partition("@")
    point, _, count = where.partition(":")
    actions = (*_SIGNALS, "nan", *_DISK)
    if action not in actions or point not in POINTS or not count.isdigit():
        raise ValueError(f"fault {spec!r}: expected <{'|'.join(actions)}>@<{'|'.join(POINTS)}>"
                         ":<n>")
    return action, point, int(count)


class FaultHook(Hook):
    """Does the spec's action at the ``n``-th pass through its point (see the module doc)."""

    def __init__(self, spec: str):
        self.action, self.point, self.count = parse(spec)
        self.passes = 0

    def _reach(self, point: str, trainer) -> None:
        if point != self.point:
            return
        self.passes += 1
        if self.passes != self.count:
            return
        if self.action == "nan":
            trainer.state = trainer.state.replace(
                params=jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), trainer.state.params))
        elif self.action in _DISK:
            next(h for h in trainer.hooks if isinstance(h, Checkpointer)).checkpoints.wait()
            workdir = trainer.checkpoint_dir.parent
            if self.action == "fill":
                fill(workdir.with_name(workdir.name + ".ballast"))
            else:
                subprocess.run(["mount", "--bind", "-o", "ro", workdir, workdir], check=True)
        else:
            os.kill(os.getpid(), _SIGNALS[self.action])

    def after_dispatch(self, trainer, before: int, after: int) -> None:
        self._reach("step", trainer)

    def after_evaluate(self, trainer, row: dict) -> None:
        self._reach("eval", trainer)

    def after_save(self, trainer, what: str) -> None:
        self._reach(what, trainer)

    def on_end(self, trainer) -> None:
        self._reach("end", trainer)


def fill(path) -> None:
    """Write ``path`` until its filesystem has no room left (to the last page)."""
    with open(path, "wb", buffering=0) as ballast:
        for chunk in (1 << 20, 4096):
            try:
                while True:
                    ballast.write(b"\0" * chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
