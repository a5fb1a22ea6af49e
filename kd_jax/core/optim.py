"""The optimization recipe: SGD by parameter group, its schedule, max-norm, EMA."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kd_jax.errors import KdError


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
class Recipe:
    """SGD with (by default Nesterov) momentum on a warmup + decay schedule, by parameter group.

    The learning rate rises linearly over the first ``warmup_fraction`` of the steps to
    ``learning_rate``; then, with ``lr_schedule="linear"``, it falls linearly to
    ``final_lr_factor * learning_rate`` at the last step: a fraction rather than a number of
    epochs keeps a 2-epoch smoke run's schedule the shape of a 10-epoch run's. With
    ``lr_schedule="step"`` it is multiplied by ``lr_decay_factor`` from each of the
    (0-based) epochs ``lr_decay_epochs`` on: the step decay of the CIFAR-100 distillation
    benchmarks (RepDistiller, mdistiller: x0.1 at epochs 150, 180, 210 of 240, which they
    count from 1 and apply once an epoch exceeds the milestone: the same epochs).
    ``nesterov=False`` is their (PyTorch's default) momentum.

    Parameters fall into the groups of :func:`param_group`, each with its own learning-rate
    factor: BatchNorm needs its scales and biases driven differently from the kernels it
    makes scale-invariant (airbench drives BN biases 64x). Weight decay applies to kernels
    (the head's included) and, with ``bn_weight_decay``, to BatchNorm parameters; never to
    other biases.

    The defaults drive every group alike, because they must suit any model a user brings. The
    CLI jobs' CIFAR recipe drives BN biases at 16x instead, but only because it also freezes
    the ResNets' BN scales (``with_model_recipe`` in kd_jax.cli.config; docs/RECIPE.md).
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
    ema_decay: float = 0.0  # > 0: evaluate and ship an average of the weights (TrainState)
    lookahead_steps: int = 0  # > 0: lookahead's slow weights sync every N steps (TrainState)
    lookahead_alpha: float = 0.5  # how far the slow weights move towards the fast ones then
    lookahead_ramp: bool = False  # ramp that fraction from 1 down to lookahead_alpha (airbench94)
    lr_schedule: str = "linear"  # after the warmup: "linear" decay or "step" decay
    lr_decay_epochs: tuple[int, ...] = ()  # "step": the epochs the rate drops at
    lr_decay_factor: float = 0.1  # "step": what it is multiplied by at each
    nesterov: bool = True  # False: PyTorch's default (heavy-ball) momentum

    def __post_init__(self) -> None:
        check_recipe(self)


LR_SCHEDULES = ("linear", "step")


def check_recipe(settings: Any, unset: tuple[str, ...] = ()) -> None:
    """Raise ``KdError`` for the first of :class:`Recipe`'s settings that cannot work.

    ``settings`` is anything with Recipe's fields as attributes: a Recipe, which checks itself
    when made (a library user's bad value is one line, not a silent or a deep failure), or the
    CLI's config, which checks them before it opens a workdir. ``unset`` names the fields that
    may still be None there because the caller fills them in later (the CLI, per model); a
    Recipe names none, so every field of a Recipe holds a value.
    """
    s = settings

    def non_negative(name: str) -> bool:
        value = getattr(s, name)
        return name in unset if value is None else value >= 0

    checks = [
        (s.learning_rate > 0, f"learning_rate must be > 0, got {s.learning_rate}"),
        (0 <= s.warmup_fraction < 1,
         f"warmup_fraction must be in [0, 1), got {s.warmup_fraction}"),
        (s.final_lr_factor >= 0, f"final_lr_factor must be >= 0, got {s.final_lr_factor}"),
        *((non_negative(name), f"{name} must be >= 0, got {getattr(s, name)}")
          for name in ("bn_lr_factor", "head_lr_factor", "bias_lr_factor", "bn_weight_decay")),
        (0 <= s.ema_decay < 1, f"ema_decay must be in [0, 1), got {s.ema_decay}"),
        (s.lookahead_steps >= 0, f"lookahead_steps must be >= 0, got {s.lookahead_steps}"),
        (0 < s.lookahead_alpha <= 1,
         f"lookahead_alpha must be in (0, 1], got {s.lookahead_alpha}"),
        (s.lookahead_steps > 0 or not s.lookahead_ramp,
         "lookahead_ramp needs lookahead_steps > 0"),
        (s.weight_decay >= 0, f"weight_decay must be >= 0, got {s.weight_decay}"),
        (0 <= s.momentum < 1, f"momentum must be in [0, 1), got {s.momentum}"),
        (s.max_norm >= 0, f"max_norm must be >= 0, got {s.max_norm}"),
        (s.lr_schedule in LR_SCHEDULES,
         f"lr_schedule must be {' or '.join(LR_SCHEDULES)}, got {s.lr_schedule!r}"),
        (s.lr_schedule == "step" or not s.lr_decay_epochs,
         "lr_decay_epochs needs lr_schedule step"),
        (s.lr_schedule == "linear" or not s.final_lr_factor,
         "final_lr_factor needs lr_schedule linear"),
        (0 < s.lr_decay_factor <= 1,
         f"lr_decay_factor must be in (0, 1], got {s.lr_decay_factor}"),
    ]
    for ok, message in checks:
        if not ok:
            raise KdError(message)


def step_decay(peak: float, boundaries: Sequence[int], factor: float) -> optax.Schedule:
    """``peak * factor ** (number of boundaries <= t)``: piecewise constant in step ``t``."""
    boundaries = jnp.asarray(boundaries, jnp.int32)
    return lambda t: peak * factor ** jnp.sum(t >= boundaries)


def make_schedule(recipe: Recipe, total_steps: int,
                  steps_per_epoch: int | None = None) -> optax.Schedule:
    """The learning rate of step ``t`` (0-based): see :class:`Recipe`. A step schedule needs
    ``steps_per_epoch`` to place its epochs."""
    warmup_steps = min(round(recipe.warmup_fraction * total_steps), total_steps - 1)
    peak = recipe.learning_rate
    warmup = optax.linear_schedule(peak / max(warmup_steps, 1), peak, warmup_steps)
    if recipe.lr_schedule == "linear":
        decay = optax.linear_schedule(peak, peak * recipe.final_lr_factor,
                                      total_steps - warmup_steps)
    else:  # "step": a Recipe holds one of LR_SCHEDULES (check_recipe)
        if not steps_per_epoch:
            raise ValueError("a step schedule needs steps_per_epoch")
        # join_schedules hands the second schedule the steps since the warmup ended.
        decay = step_decay(peak, [e * steps_per_epoch - warmup_steps
                                  for e in recipe.lr_decay_epochs], recipe.lr_decay_factor)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def param_group(path: tuple[str, ...], param: jax.Array, head: str | None) -> str:
    """The optimizer group of one parameter, from its path in the params tree.

    ``frozen`` for the data-set :class:`kd_jax.core.models.Whitening` layer, ``bn`` for BatchNorm
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


def make_optimizer(recipe: Recipe, total_steps: int, steps_per_epoch: int | None = None,
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer :class:`Recipe` describes, and its schedule (:func:`make_schedule`).

    ``max_norm > 0`` adds :func:`max_norm` after each trainable group's step.
    """
    schedule = make_schedule(recipe, total_steps, steps_per_epoch)

    kernels_only = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)

    def group(lr_factor: float, weight_decay: float,
              decays: Callable | None = None) -> optax.GradientTransformation:
        rate = schedule if lr_factor == 1 else (lambda t: lr_factor * schedule(t))
        chain = [optax.sgd(rate, momentum=recipe.momentum, nesterov=recipe.nesterov)]
        if weight_decay:
            chain.insert(0, optax.add_decayed_weights(weight_decay, mask=decays))
        if recipe.max_norm > 0:
            chain.append(max_norm(recipe.max_norm))
        return optax.chain(*chain)

    transforms = {"kernel": group(1.0, recipe.weight_decay),
                  "head": group(recipe.head_lr_factor, recipe.weight_decay, kernels_only),
                  "bias": group(recipe.bias_lr_factor, 0.0),
                  "bn": group(recipe.bn_lr_factor, recipe.bn_weight_decay),
                  "frozen": optax.set_to_zero()}
    return optax.multi_transform(transforms, param_groups), schedule
