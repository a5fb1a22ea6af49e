"""Feature distillation: FitNets hints and attention transfer, on the models' stage outputs.

Every zoo model sows the output of each of its stages into the ``features`` collection
(:func:`sow_stages`; a no-op unless a caller makes the collection mutable, so training,
evaluation and export never see it). The points are RepDistiller's, so its methods' settings
carry over: each ResNet stage's output after its last block's ReLU, each wide-ResNet stage's
(the last after the final BN-ReLU), VGG blocks 1-4 (block 0 plays the stem), MLP hidden layers.
A module of your own takes part by calling ``sow_stages(self, x)`` at its stage boundaries.

- **FitNets** (Romero et al. 2015): the student's hint stage, through a learned regressor,
  is regressed onto the teacher's same stage: ``mean((r(v_s) - u_t)^2)``, weighted 100 as
  in RepDistiller (the paper's ``1/2 ||.||^2`` differs by a constant the weight absorbs). The
  regressor is the paper's: a convolution whose kernel ``1 + H_s - H_t`` maps the student's
  spatial size to the teacher's (1x1 when they match), with the teacher's non-linearity (ReLU);
  a dense layer for flat features.
- **Attention transfer** (Zagoruyko & Komodakis 2017, eq. 2 with p = 2): per stage, the
  spatial map ``Q = mean_c |A_c|^p``, L2-normalised over positions; the loss is the sum over
  stages of ``mean((Q_s - Q_t)^2)`` over images and positions, weighted 1000 (RepDistiller's
  form and weight). Teacher and student need as many stages, of equal spatial sizes.

The student's extra parameters (the regressor) live in its params under :data:`ADAPTERS`,
so the optimizer, EMA, checkpoints and resume treat them as any other parameter;
:func:`without_adapters` drops them wherever the model is evaluated, restored or exported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.errors import KdError

FEATURES = "features"  # the variable collection stage outputs are sown into
STAGES = "stages"  # its one entry: the tuple of stage outputs, in order
ADAPTERS = "feature_adapters"  # the student's params entry holding a method's regressors


def sow_stages(module: nn.Module, x: jax.Array) -> jax.Array:
    """Record ``x`` as ``module``'s next stage output; returns ``x`` unchanged. Not while
    initialising: ``init`` makes every collection mutable, and the model's variables must
    not carry a batch of features."""
    if not module.is_initializing():
        module.sow(FEATURES, STAGES, x)
    return x


@dataclass(frozen=True)
class FeatureLoss:
    """A feature-distillation method and its settings: ``name`` (``fitnets`` or ``at``), its
    ``weight`` in the total loss, FitNets' ``hint_stage`` (0-based index into the stages:
    1, RepDistiller's ``hint_layer 2`` counted with the stem) and AT's exponent ``p``."""

    name: str
    weight: float
    hint_stage: int = 1
    p: float = 2.0

    @property
    def needs_adapters(self) -> bool:
        return self.name == "fitnets"


DEFAULT_WEIGHTS = {"fitnets": 100.0, "at": 1000.0}  # RepDistiller's -b for each
FEATURE_LOSSES = tuple(DEFAULT_WEIGHTS)


def make_feature_loss(name: str, weight: float | None = None, hint_stage: int = 1,
                      p: float = 2.0) -> FeatureLoss:
    """The method ``name`` with its paper's weight unless ``weight`` is given."""
    if name not in DEFAULT_WEIGHTS:
        raise KdError(f"unknown feature loss {name!r}; choose one of: "
                      f"{', '.join(FEATURE_LOSSES)}")
    weight = DEFAULT_WEIGHTS[name] if weight is None else weight
    if not weight >= 0:
        raise KdError(f"feature loss {name}: weight must be >= 0, got {weight}")
    if hint_stage < 0:
        raise KdError(f"feature loss {name}: hint stage must be >= 0, got {hint_stage}")
    if not p > 0:
        raise KdError(f"feature loss {name}: p must be > 0, got {p}")
    return FeatureLoss(name, float(weight), hint_stage, float(p))


# --------------------------------------------------------------------------- the losses
def attention_map(features: jax.Array, p: float = 2.0, epsilon: float = 1e-12) -> jax.Array:
    """[batch, positions]: ``mean_c |A_c|^p`` of NHWC ``features``, unit L2 norm per image."""
    energy = jnp.mean(jnp.abs(features.astype(jnp.float32)) ** p, axis=-1)
    flat = energy.reshape(energy.shape[0], -1)
    return flat / jnp.maximum(jnp.linalg.norm(flat, axis=-1, keepdims=True), epsilon)


def attention_loss(student: Sequence[jax.Array], teacher: Sequence[jax.Array],
                   p: float = 2.0) -> jax.Array:
    """Attention transfer: the sum over stages of ``mean((Q_s - Q_t)^2)`` (unweighted)."""
    return sum(jnp.mean((attention_map(s, p) - attention_map(t, p)) ** 2)
               for s, t in zip(student, teacher, strict=True))


def hint_loss(regressed: jax.Array, hint: jax.Array) -> jax.Array:
    """FitNets: the mean squared error between the regressed student stage and the hint."""
    return jnp.mean((regressed.astype(jnp.float32) - hint.astype(jnp.float32)) ** 2)


class Regressor(nn.Module):
    """FitNets' regressor ``r(v; W_r)``: ReLU of a VALID convolution of kernel ``kernel``
    (NHWC inputs) or of a dense layer (flat inputs), to the teacher's ``features``."""

    features: int
    kernel: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim == 2:
            return nn.relu(nn.Dense(self.features)(x))
        return nn.relu(nn.Conv(self.features, (self.kernel, self.kernel), padding="VALID")(x))


# --------------------------------------------------------------------------- wiring
Shapes = tuple[tuple[int, ...], ...]


def stage_shapes(apply_fn: Callable, variables: dict, sample: jax.Array, who: str) -> Shapes:
    """The shapes of the stage outputs ``apply_fn`` sows on ``sample``, without computing
    them; a one-line ``KdError`` naming ``who`` when it sows none."""
    def forward(v, x):
        return apply_fn(v, x, train=False, mutable=[FEATURES])[1]

    sown = jax.eval_shape(forward, variables, sample).get(FEATURES, {}).get(STAGES)
    if not sown:
        raise KdError(f"the {who} sows no stage outputs, which feature distillation needs: call "
                      f"kd_jax.core.features.sow_stages(self, x) after each of its stages")
    return tuple(tuple(s.shape) for s in sown)


def regressor_for(student: tuple[int, ...], teacher: tuple[int, ...]) -> Regressor:
    """The regressor from a student stage of shape ``student`` to a teacher's ``teacher``."""
    if len(student) != len(teacher):
        raise KdError(f"fitnets: the student's hint stage {student[1:]} and the teacher's "
                      f"{teacher[1:]} are not both spatial or both flat")
    if len(student) == 2:
        return Regressor(teacher[-1])
    if student[1] < teacher[1] or student[1] - teacher[1] != student[2] - teacher[2]:
        raise KdError(f"fitnets: no convolution maps the student's {student[1]}x{student[2]} "
                      f"hint stage to the teacher's {teacher[1]}x{teacher[2]}")
    return Regressor(teacher[-1], 1 + student[1] - teacher[1])


def check_stages(loss: FeatureLoss, student: Shapes, teacher: Shapes) -> None:
    """A one-line ``KdError`` where the method cannot pair these stages."""
    if loss.name == "fitnets":
        deepest = min(len(student), len(teacher)) - 1
        if loss.hint_stage > deepest:
            raise KdError(f"fitnets: hint stage {loss.hint_stage} does not exist (the student "
                          f"has {len(student)} stages, the teacher {len(teacher)})")
        regressor_for(student[loss.hint_stage], teacher[loss.hint_stage])
        return
    if len(student) != len(teacher):
        raise KdError(f"at: the student has {len(student)} stages, the teacher {len(teacher)}; "
                      "attention transfer pairs them one to one")
    for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
        if len(s) != 4 or s[1:3] != t[1:3]:
            raise KdError(f"at: stage {i} is {s[1:-1]} in the student and {t[1:-1]} in the "
                          "teacher; attention maps need equal spatial sizes")


def init_adapters(loss: FeatureLoss, student: Shapes, teacher: Shapes, seed: int) -> dict:
    """The method's trainable parameters for the student ({} for attention transfer)."""
    check_stages(loss, student, teacher)
    if not loss.needs_adapters:
        return {}
    regressor = regressor_for(student[loss.hint_stage], teacher[loss.hint_stage])
    dummy = jnp.zeros(student[loss.hint_stage], jnp.float32)
    key = jax.random.fold_in(jax.random.key(seed), 0x4A1D)  # not the student's own init key
    return {"hint": regressor.init(key, dummy)["params"]}


def with_adapters(variables: dict, adapters: dict) -> dict:
    """The student's variables with the method's parameters in its params."""
    if not adapters:
        return variables
    return {**variables, "params": {**variables["params"], ADAPTERS: adapters}}


def split_adapters(params: Any) -> tuple[Any, dict]:
    """(the model's own params, the adapters' params: {} without any)."""
    if not isinstance(params, dict) or ADAPTERS not in params:
        return params, {}
    own = {k: v for k, v in params.items() if k != ADAPTERS}
    return own, params[ADAPTERS]


def without_adapters(params: Any) -> Any:
    """The model's own params: what is evaluated, shipped and counted."""
    return split_adapters(params)[0]


def feature_term(loss: FeatureLoss, adapters: dict, student: Sequence[jax.Array],
                 teacher: Sequence[jax.Array]) -> jax.Array:
    """``weight *`` the method's loss between the student's and the teacher's stages."""
    if loss.name == "at":
        return loss.weight * attention_loss(student, teacher, loss.p)
    stage = loss.hint_stage
    regressor = regressor_for(student[stage].shape, teacher[stage].shape)
    regressed = regressor.apply({"params": adapters["hint"]}, student[stage])
    return loss.weight * hint_loss(regressed, teacher[stage])
