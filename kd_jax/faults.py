"""Test-only fault injection: make a run die, be preempted or go NaN at an exact named point.

Crash-safety tests must SIGKILL a run at a precise moment (mid-step, after evaluation, while a
checkpoint is being written), which no outside timer hits reliably on a loaded machine. The
training loop calls :func:`reach` at named points; with ``$KD_JAX_FAULT`` set to
``<action>@<point>:<n>`` the ``n``-th pass through ``<point>`` (counted from 1 in this process)
does ``<action>``:

- ``kill``: SIGKILL this process (no cleanup of any kind runs);
- ``term``: send this process SIGTERM, as a preemption would;
- ``int``: send this process SIGINT, as Ctrl-C would;
- ``nan``: return the train state with every parameter NaN.

The variable is for tests only; unset, :func:`reach` returns the state untouched.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp

FAULT_ENV = "KD_JAX_FAULT"
_SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}
_passes: Counter[str] = Counter()


def parse(spec: str) -> tuple[str, str, int]:
    """``"kill@step:3"`` -> ``("kill", "step", 3)``."""
    action, _, where = spec.partition("@")
    point, _, count = where.partition(":")
    if action not in (*_SIGNALS, "nan") or not point or not count.isdigit():
        raise ValueError(f"${FAULT_ENV}={spec!r}: expected <kill|term|int|nan>@<point>:<n>")
    return action, point, int(count)


def reach(point: str, state: Any = None) -> Any:
    """Mark a pass through ``point``; returns ``state`` (poisoned by a ``nan`` fault)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return state
    action, target, count = parse(spec)
    if point != target:
        return state
    _passes[point] += 1
    if _passes[point] != count:
        return state
    if action == "nan":
        return state.replace(params=jax.tree.map(lambda p: jnp.full_like(p, jnp.nan),
                                                 state.params))
    os.kill(os.getpid(), _SIGNALS[action])
    return state
