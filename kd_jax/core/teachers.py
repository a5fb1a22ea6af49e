"""Frozen teachers, one or several, and the soft target they give a student.

A :class:`Teacher` is an apply function and its variables. Several teachers are an ensemble
(Hinton et al. 2015, sec. 4), run inside the student's one jitted step in one of two layouts:
``stacked``, where teachers of one architecture (same apply function, same variable shapes)
have their variables stacked along a new leading axis and run as one ``vmap``ped forward (the
jaxpr holds one network's operations whatever their number), or ``loop``, every teacher's
forward one after the other. ``auto`` (the default) takes the loop on CPUs, where it measured
5.9x faster than the stacked forward at 8 teachers (docs/ENSEMBLE.md), and the stacked forward
on other backends. Groups of different architectures always run one after the other. Every
teacher sees exactly the student's batch, in inference mode.

The ensemble's prediction is the arithmetic mean of the teachers' temperature-softened
probabilities, as the paper forms it (``combine="probs"``, the default: it is the ensemble
whose accuracy the paper reports, and a confident teacher cannot veto the others' second
choices); ``combine="logits"`` averages the logits instead (a normalised geometric mean of
the probabilities).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.core.checkpoint import load_frozen
from kd_jax.core.features import FEATURES, STAGES
from kd_jax.core.optim import head_module
from kd_jax.errors import KdError

COMBINE = ("probs", "logits")
LAYOUTS = ("auto", "stacked", "loop")


@dataclass(frozen=True)
class Teacher:
    """A frozen model: ``apply_fn(variables, x, train=False) -> logits`` and its variables."""

    apply_fn: Callable[..., jax.Array]
    variables: dict

    @classmethod
    def from_workdir(cls, workdir: str | Path, model: nn.Module | None = None) -> Teacher:
        """The model a kd-jax run trained (its weight average, if it kept one). ``model`` is
        needed for a module of your own; registered models are rebuilt from config.json."""
        frozen = load_frozen(workdir)
        if model is None:
            params = frozen.variables["params"]
            model = frozen.build(params[head_module(params)]["kernel"].shape[-1])
        return cls(model.apply, frozen.variables)


@dataclass(frozen=True)
class Ensemble:
    """Teachers in groups (by architecture when ``stacked``; one teacher each in the ``loop``
    layout): ``apply_fns[g]`` runs every teacher of group ``g``, whose variables are stacked
    in ``stacked[g]`` (leading axis: the group's teachers), except that a group of one keeps
    its variables as they are and runs without ``vmap`` (the single-teacher step is exactly
    the plain forward, in either layout).

    ``stacked`` is what a jitted step receives as arguments (pytree leaves); the apply
    functions are static.
    """

    apply_fns: tuple[Callable[..., jax.Array], ...]
    stacked: tuple[dict, ...]
    sizes: tuple[int, ...]  # teachers per group
    order: tuple[tuple[int, int], ...]  # teacher i -> (group, index in group), input order
    layout: str = "stacked"  # how it was grouped: "stacked" or "loop" (one teacher per group)

    @property
    def size(self) -> int:
        return len(self.order)


def _signature(teacher: Teacher) -> tuple:
    """Teachers with equal signatures run as one stacked forward. A bound ``Module.apply`` is
    keyed by its module, which compares by fields: two restores of one architecture match."""
    fn = teacher.apply_fn
    key = (fn.__func__, fn.__self__) if hasattr(fn, "__self__") else fn
    shapes = jax.tree.map(lambda a: (tuple(np.shape(a)), str(jnp.asarray(a).dtype)),
                          teacher.variables)
    return key, jax.tree.structure(teacher.variables), str(shapes)


def resolve_layout(layout: str, backend: str | None = None) -> str:
    """``stacked`` or ``loop``: ``auto`` is the loop on CPUs, the stacked forward elsewhere."""
    if layout not in LAYOUTS:
        raise KdError(f"ensemble layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout != "auto":
        return layout
    return "loop" if (backend or jax.default_backend()) == "cpu" else "stacked"


def make_ensemble(teachers: Sequence[Teacher], layout: str = "auto") -> Ensemble:
    """Group ``teachers`` for the ``layout`` (see the module doc): by architecture, each
    group's variables stacked, or one teacher per group."""
    layout = resolve_layout(layout)
    groups: dict[tuple, list[int]] = {}
    for i, teacher in enumerate(teachers):
        key = _signature(teacher) if layout == "stacked" else i
        groups.setdefault(key, []).append(i)
    apply_fns, stacked, sizes, order = [], [], [], [None] * len(teachers)
    for g, members in enumerate(groups.values()):
        apply_fns.append(teachers[members[0]].apply_fn)
        if len(members) == 1:
            stacked.append(teachers[members[0]].variables)
        else:
            stacked.append(jax.tree.map(lambda *leaves: jnp.stack(leaves),
                                        *(teachers[i].variables for i in members)))
        sizes.append(len(members))
        for k, i in enumerate(members):
            order[i] = (g, k)
    return Ensemble(tuple(apply_fns), tuple(stacked), tuple(sizes), tuple(order), layout)


def teacher_logits(apply_fns: Sequence[Callable], sizes: Sequence[int],
                   stacked: Sequence[dict], inputs: jax.Array) -> list[jax.Array]:
    """Each group's logits, float32 [teachers in group, batch, classes], gradients stopped."""
    out = []
    for apply_fn, size, variables in zip(apply_fns, sizes, stacked, strict=True):
        forward = lambda v, apply_fn=apply_fn: apply_fn(v, inputs, train=False)
        logits = jax.vmap(forward)(variables) if size > 1 else forward(variables)[None]
        out.append(jax.lax.stop_gradient(logits.astype(jnp.float32)))
    return out


def teacher_stages(apply_fn: Callable, variables: dict,
                   inputs: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """One teacher's float32 logits and the stage outputs it sows
    (:mod:`kd_jax.core.features`), gradients stopped."""
    logits, sown = apply_fn(variables, inputs, train=False, mutable=[FEATURES])
    return jax.lax.stop_gradient((logits.astype(jnp.float32), sown[FEATURES][STAGES]))


def target_log_probs(logits: Sequence[jax.Array], temperature: float, combine: str = "probs",
                     transform: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """The ensemble's log-probabilities at ``temperature`` from the groups' logits.

    ``transform`` (e.g. logit standardisation) is applied to each teacher's logits first. One
    teacher gives ``log_softmax(t / T)`` exactly, whichever ``combine``.
    """
    every = jnp.concatenate(logits)  # [teachers, batch, classes]
    if transform is not None:
        every = transform(every)
    if every.shape[0] == 1:
        return jax.nn.log_softmax(every[0] / temperature)
    if combine == "logits":
        return jax.nn.log_softmax(jnp.mean(every, axis=0) / temperature)
    log_probs = jax.nn.log_softmax(every / temperature)
    return jax.nn.logsumexp(log_probs, axis=0) - jnp.log(every.shape[0])


def ensemble_eval_logits(per_teacher: Sequence[np.ndarray], combine: str = "probs") -> np.ndarray:
    """What evaluation compares the student with: the ensemble's log-probabilities at T = 1
    (one teacher: its logits), as host float64."""
    if len(per_teacher) == 1:
        return np.asarray(per_teacher[0])
    stacked = np.stack([np.asarray(t, np.float64) for t in per_teacher])
    if combine == "logits":
        return stacked.mean(0)
    shifted = stacked - stacked.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    peak = log_probs.max(0)
    return peak + np.log(np.exp(log_probs - peak).mean(0))


def per_teacher(ensemble: Ensemble, group_outputs: Sequence[Any]) -> list[Any]:
    """Group-stacked outputs back in the teachers' input order."""
    return [group_outputs[g][k] for g, k in ensemble.order]
