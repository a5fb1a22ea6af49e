"""kd-jax's public API: train a model on labels, distill a student from frozen teachers.

Bring any Flax linen module called as ``model.apply(variables, x, train=...)`` (with or
without BatchNorm or dropout) and numpy arrays::

    import kd_jax
    state, history = kd_jax.train(teacher_model, images, labels, epochs=5, batch_size=256,
                                  eval_sets={"test": (test_images, test_labels)})
    teacher = kd_jax.Teacher(teacher_model.apply, state.inference_variables())
    student, history = kd_jax.distill(student_model, teacher, images, temperature=4.0,
                                      epochs=5, batch_size=256,
                                      eval_sets={"test": (test_images, test_labels)})

Images are uint8 NHWC (augmented and standardised on the device by ``augmentation``, an
:class:`kd_jax.Augmentation`; by default only standardised with their own statistics) or
float arrays of any shape, used as they are. Without ``workdir`` a run stays in memory and
writes nothing; with one it writes what the command-line jobs write (config.json,
metrics.jsonl, summary.json, curves.png, orbax checkpoints) and ``resume=True`` continues it.
The workdir is locked for as long as the call runs: a second run of it is refused. A file that
cannot be written (a full disk, say) ends the call with one ``KdError`` naming the file, the
system's reason and the latest intact checkpoint.
An eval set named ``val`` is the validation split: the best checkpoint is chosen on it, never
on the test set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax.core.augment import Passthrough, standardizing
from kd_jax.core.checkpoint import latest_checkpoint
from kd_jax.core.devices import make_mesh
from kd_jax.core.evaluation import ClassificationEval, DistillationEval, make_predict
from kd_jax.core.features import (
    FeatureLoss,
    init_adapters,
    make_feature_loss,
    split_adapters,
    stage_shapes,
    with_adapters,
)
from kd_jax.core.hooks import Checkpointer, MetricsWriter, Progress, StopOnSignal
from kd_jax.core.losses import DistillLoss, make_loss
from kd_jax.core.models import count_params
from kd_jax.core.optim import Recipe, make_optimizer
from kd_jax.core.rundir import RunDir, environment
from kd_jax.core.steps import TrainState, create_state, make_distill_step, make_teacher_step
from kd_jax.core.teachers import (
    COMBINE,
    Ensemble,
    Teacher,
    ensemble_eval_logits,
    make_ensemble,
    per_teacher,
)
from kd_jax.core.trainer import Hook, Trainer
from kd_jax.errors import KdError, WriteFailed

History = list[dict]
DEFAULT_RECIPE = Recipe()
EvalSets = Mapping[str, tuple[np.ndarray, np.ndarray]]
# Settings that may differ between an interrupted run and its resumption.
RESUMABLE = frozenset({"resume", "overwrite", "progress", "workdir", "data_dir",
                       "checkpoint_every_steps"})


def as_teachers(teachers: Any) -> list[Teacher]:
    """A list of :class:`Teacher` from one or a list of: a Teacher, an ``(apply_fn,
    variables)`` pair, or a run's workdir."""
    many = teachers if isinstance(teachers, list) else [teachers]
    if not many:
        raise KdError("distill needs at least one teacher")
    return [_as_teacher(t) for t in many]


def _as_teacher(teacher: Any) -> Teacher:
    if isinstance(teacher, Teacher):
        return teacher
    if isinstance(teacher, str | Path):
        return Teacher.from_workdir(teacher)
    if isinstance(teacher, tuple) and len(teacher) == 2 and callable(teacher[0]):
        return Teacher(*teacher)
    raise KdError(f"a teacher is a kd_jax.Teacher, an (apply_fn, variables) pair or a workdir, "
                  f"got {type(teacher).__name__}")


def train(model: nn.Module, images: np.ndarray, labels: np.ndarray, *,
          eval_sets: EvalSets | None = None, recipe: Recipe = DEFAULT_RECIPE, epochs: int = 10,
          batch_size: int = 512, augmentation: Any = None, label_smoothing: float = 0.0,
          seed: int = 0, variables: dict | None = None, workdir: str | Path | RunDir | None = None,
          resume: bool = False, overwrite: bool = False, checkpoint_every_steps: int = 0,
          hooks: Sequence[Hook] = (), progress: bool = True, eval_batch_size: int = 1000,
          steps_per_dispatch: int = 0, config: dict | None = None,
          summary: Callable[[TrainState], dict] | None = None) -> tuple[TrainState, History]:
    """Train ``model`` on ``(images, labels)`` with cross-entropy; returns the trained state
    and one row of metrics per epoch.

    ``variables`` start from given weights instead of ``model.init`` with ``seed``;
    ``config`` is what config.json records (default: this call's settings); ``summary``
    adds fields, computed from the final state, to summary.json.
    """
    labels = _checked_labels(labels, images, "labels")
    run = _Run(model, images, eval_sets, recipe, epochs, batch_size, augmentation, seed,
               variables, eval_batch_size)
    evaluators = [ClassificationEval(name, x, y, run.predict) for name, x, y in run.eval_sets]
    config = config or run.describe("train", label_smoothing=label_smoothing)
    return run.fit(make_teacher_step(label_smoothing), (images, labels), evaluators, workdir,
                   config, resume, overwrite, checkpoint_every_steps, hooks, progress,
                   steps_per_dispatch, summary)


def distill(student: nn.Module, teachers: Any, images: np.ndarray, *,
            labels: np.ndarray | None = None, temperature: float = 4.0, alpha: float = 1.0,
            loss: str | DistillLoss = "kd", combine: str = "probs", ensemble_layout: str = "auto",
            features: str | FeatureLoss | None = None, eval_sets: EvalSets | None = None,
            recipe: Recipe = DEFAULT_RECIPE, epochs: int = 10, batch_size: int = 512,
            augmentation: Any = None, seed: int = 0, variables: dict | None = None,
            workdir: str | Path | RunDir | None = None,
            resume: bool = False, overwrite: bool = False, checkpoint_every_steps: int = 0,
            hooks: Sequence[Hook] = (), progress: bool = True, eval_batch_size: int = 1000,
            steps_per_dispatch: int = 0, config: dict | None = None,
            summary: Callable[[TrainState], dict] | None = None) -> tuple[TrainState, History]:
    """Train ``student`` on frozen teachers' softened outputs, by default Hinton et al.'s
    ``T^2 * KL(p_t^T || p_s^T)``, every teacher seeing exactly the augmented batch the
    student sees.

    ``teachers``: one or a list of :class:`Teacher`, ``(apply_fn, variables)`` pairs or
    workdirs. Several are an ensemble whose target is the mean of their softened
    probabilities (``combine="probs"``, the paper's) or of their logits (``"logits"``),
    run in ``ensemble_layout`` (:data:`kd_jax.core.teachers.LAYOUTS`; ``auto``: a loop on
    CPUs, one stacked forward per architecture elsewhere).
    ``loss``: a name in :data:`kd_jax.core.losses.LOSSES` (built at ``temperature`` with its
    paper's defaults) or a :class:`DistillLoss` from :func:`kd_jax.core.losses.make_loss`.
    With ``alpha == 1`` (the default) the run is label-free: no label is ever read, passing
    ``labels`` is an error, and the step cannot take them. With ``alpha < 1``,
    ``(1 - alpha) * CE`` on ``labels`` at T = 1 is added. A loss that needs each image's true
    class (DKD) is given the same labels, so it needs ``alpha < 1``: one rule, label-free
    exactly when ``alpha == 1``. ``features``: a feature method added to the loss, ``"fitnets"``
    or ``"at"`` at its paper's weight or a :class:`kd_jax.core.features.FeatureLoss`, between
    the stage outputs student and (one) teacher sow; its regressor trains with the student,
    is checkpointed with it and is left out of the returned state's
    ``inference_variables()``. Every eval set also reports the student's agreement with
    the (ensemble) teacher. Other arguments as :func:`train`.
    """
    loss = make_loss(loss, temperature) if isinstance(loss, str) else loss
    features = make_feature_loss(features) if isinstance(features, str) else features
    _check_distill_labels(loss, alpha, labels)
    if combine not in COMBINE:
        raise KdError(f"combine must be {' or '.join(COMBINE)}, got {combine!r}")
    arrays = (images,) if labels is None else (images, _checked_labels(labels, images, "labels"))
    run = _Run(student, images, eval_sets, recipe, epochs, batch_size, augmentation, seed,
               variables, eval_batch_size)
    ensemble = make_ensemble([Teacher(t.apply_fn, jax.tree.map(run.replicate, t.variables))
                              for t in as_teachers(teachers)], ensemble_layout)
    if ensemble.size > 1:
        run.reference = f"ensemble of {ensemble.size}"
        run.notes["ensemble_layout"] = ensemble.layout
    evaluators = [DistillationEval(ClassificationEval(name, x, y, run.predict),
                                   run.ensemble_logits(ensemble, x, combine))
                  for name, x, y in run.eval_sets]
    step = make_distill_step(ensemble, loss, alpha, combine, run.steps_per_epoch, features)
    if features is not None:
        run.add_adapters(features, ensemble.apply_fns[0], ensemble.stacked[0])
    config = config or run.describe("distill", temperature=temperature, alpha=alpha,
                                    loss=loss.name, loss_params=loss.params,
                                    standardize_logits=loss.standardize, combine=combine,
                                    teachers=ensemble.size,
                                    features=features and dataclasses.asdict(features))
    return run.fit(step, arrays, evaluators, workdir, config, resume, overwrite,
                   checkpoint_every_steps, hooks, progress, steps_per_dispatch, summary)


def _check_distill_labels(loss: DistillLoss, alpha: float, labels: np.ndarray | None) -> None:
    if not 0 <= alpha <= 1:
        raise KdError(f"alpha must be in [0, 1], got {alpha}")
    if loss.needs_labels and alpha == 1:
        raise KdError(f"loss {loss.name} needs the true class, so it cannot run label-free "
                      "(alpha == 1): pass alpha < 1 and labels")
    if alpha == 1 and labels is not None:
        raise KdError("alpha == 1 trains from the teacher alone: pass no labels")
    if alpha != 1 and labels is None:
        raise KdError(f"alpha = {alpha} < 1 mixes in a hard-label term: pass labels")


def evaluate(model: nn.Module | Callable, variables: dict, images: np.ndarray,
             labels: np.ndarray, *, augmentation: Any = None, tta: str = "none",
             batch_size: int = 1000, name: str = "test") -> dict[str, float]:
    """``{name}_loss`` and ``{name}_accuracy`` of a model in inference mode, optionally with
    test-time augmentation (``flip``, ``flip_translate``: see
    :func:`kd_jax.core.augment.tta_views`). ``augmentation`` supplies the normalisation the
    model was trained with."""
    mesh = make_mesh()
    preprocess = augmentation or _default_preprocessing(images)
    module = model if isinstance(model, nn.Module) else Applied(model)
    predict = make_predict(module, preprocess, batch_size, mesh, tta)
    placed = jax.device_put(images, NamedSharding(mesh, P()))
    return ClassificationEval(name, placed, _checked_labels(labels, images, name), predict)(
        jax.device_put(variables, NamedSharding(mesh, P())))


@dataclass(frozen=True)
class Applied:
    """An ``apply_fn`` in the shape :func:`make_predict` calls (``.apply``), hashable for jit."""

    apply: Callable[..., jax.Array]


class _Run:
    """What :func:`train` and :func:`distill` set up alike: the mesh, the preprocessing, the
    eval sets on the device, the initial variables and the optimizer; :meth:`fit` builds the
    train state from them, once every trainable parameter (adapters included) is known."""

    def __init__(self, model: nn.Module, images: np.ndarray, eval_sets: EvalSets | None,
                 recipe: Recipe, epochs: int, batch_size: int, augmentation: Any, seed: int,
                 variables: dict | None, eval_batch_size: int):
        if epochs < 1 or batch_size < 1:
            raise KdError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
        self.model, self.recipe, self.epochs, self.batch_size = model, recipe, epochs, batch_size
        self.seed, self.num_train, self.eval_batch_size = seed, len(images), eval_batch_size
        self.reference = "teacher"  # what the plot's reference line is
        self.notes: dict[str, Any] = {}  # what summary.json records of how the run ran
        self.mesh = make_mesh()
        self.preprocess = augmentation or _default_preprocessing(images)
        self.predict = make_predict(model, self.preprocess, eval_batch_size, self.mesh)
        self.eval_sets = [(name, self.replicate(np.asarray(x)), _checked_labels(y, x, name))
                          for name, (x, y) in (eval_sets or {}).items()]
        self.steps_per_epoch = max(len(images) // batch_size, 1)
        self.tx, self.schedule = make_optimizer(recipe, epochs * self.steps_per_epoch,
                                                self.steps_per_epoch)
        self.sample = self.preprocess.normalize(jax.numpy.asarray(images[:1]))
        if variables is None:
            variables = jax.jit(lambda key: model.init(key, self.sample, train=False))(
                jax.random.key(seed))
        self.variables = variables

    def add_adapters(self, features: FeatureLoss, teacher_apply: Callable,
                     teacher_variables: dict) -> None:
        """Give the student the feature method's trainable parameters (its optimizer state
        and weight average with them), once both models' stages are known to pair."""
        student = stage_shapes(self.model.apply, self.variables, self.sample, "student")
        teacher = stage_shapes(teacher_apply, teacher_variables, self.sample, "teacher")
        adapters = init_adapters(features, student, teacher, self.seed)
        self.variables = with_adapters(self.variables, adapters)

    def replicate(self, array: Any) -> jax.Array:
        return jax.device_put(array, NamedSharding(self.mesh, P()))

    def ensemble_logits(self, ensemble: Ensemble, images: jax.Array,
                        combine: str) -> np.ndarray:
        """The (ensemble) teacher's logits on stored ``images``, for evaluation."""
        per_group = []
        for apply_fn, size, variables in zip(ensemble.apply_fns, ensemble.sizes,
                                             ensemble.stacked, strict=True):
            predict = make_predict(Applied(apply_fn), self.preprocess, self.eval_batch_size,
                                   self.mesh)
            unstack = lambda k, v=variables: jax.tree.map(lambda a: a[k], v)
            per_group.append([np.asarray(predict(variables if size == 1 else unstack(k),
                                                 images)) for k in range(size)])
        return ensemble_eval_logits(per_teacher(ensemble, per_group), combine)

    def describe(self, job: str, **settings: Any) -> dict:
        """config.json of a run started from the API: its settings, not its arrays."""
        return {"job": job, "model": type(self.model).__name__, "epochs": self.epochs,
                "batch_size": self.batch_size, "seed": self.seed,
                **dataclasses.asdict(self.recipe), **settings}

    def fit(self, step: Any, arrays: tuple, evaluators: list, workdir: Any, config: dict,
            resume: bool, overwrite: bool, every: int, hooks: Sequence[Hook], progress: bool,
            steps_per_dispatch: int, summary: Callable | None) -> tuple[TrainState, History]:
        recipe = self.recipe
        ramp_steps = self.epochs * self.steps_per_epoch if recipe.lookahead_ramp else 0
        initial = create_state(self.model, self.variables, self.tx, recipe.ema_decay,
                               recipe.lookahead_steps, recipe.lookahead_alpha, ramp_steps)
        with _opened(workdir, config, resume, overwrite) as run:
            best = "val_accuracy" if any(name == "val" for name, _, _ in self.eval_sets) else None
            all_hooks = [*hooks]
            if run is not None:
                all_hooks += [Checkpointer(run.path, every_steps=every, resume=resume,
                                           read_history=run.read_metrics, best_metric=best),
                              MetricsWriter(run)]
            all_hooks += [Progress()] if progress else []
            trainer = Trainer(step, initial, arrays, epochs=self.epochs,
                              batch_size=self.batch_size, seed=self.seed,
                              preprocess=self.preprocess, mesh=self.mesh, evaluators=evaluators,
                              hooks=[*all_hooks, StopOnSignal()], schedule=self.schedule,
                              steps_per_dispatch=steps_per_dispatch)
            try:
                state, history = trainer.fit()
                if run is not None and not _finished_before(run, trainer, state):
                    self._report(run, state, history, trainer.timing, summary, config)
            except WriteFailed as failed:
                if run is not None:  # (without a workdir, only a caller's hook writes)
                    failed.args = (f"{failed}; {_intact(run.path)}",)
                raise
        return state, history

    def _report(self, run: RunDir, state: TrainState, history: History, timing: dict,
                summary: Callable | None, config: dict) -> None:
        """summary.json (the last epoch, the caller's fields, timing, what made the run) and
        the plot, the teacher's test accuracy as its reference line."""
        own, adapters = split_adapters(state.params)
        report = {"params": count_params(own), "devices": self.mesh.size,
                  **({"adapter_params": count_params(adapters)} if adapters else {}),
                  "train_images": self.num_train, **history[-1],
                  **(summary(state) if summary else {}), **self.notes, **timing,
                  "environment": environment()}
        run.write_summary(report)
        job, model = report.get("job", config.get("job")), report.get("model", config.get("model"))
        title = f"{job}: {model}"
        run.write_plot(history, title, history[-1].get("teacher_test_accuracy"),
                       self.reference)


@contextmanager
def _opened(workdir: str | Path | RunDir | None, config: dict, resume: bool,
            overwrite: bool) -> Iterator[RunDir | None]:
    """The run's directory for the length of a call: a path is prepared and locked, and let go
    at the end however the call ends; a :class:`RunDir` (prepared by the caller, who holds
    its lock) or None is used as it is."""
    if workdir is None or isinstance(workdir, RunDir):
        yield workdir
        return
    with RunDir.prepare(workdir, config, resume=resume, overwrite=overwrite,
                        resumable=RESUMABLE) as run:
        yield run


def _finished_before(run: RunDir, trainer: Trainer, state: TrainState) -> bool:
    """Whether this call resumed a run that had already finished and reported: it ran no
    step, so summary.json and the plot stay as they are, byte for byte (rewritten, they would
    change the timing the first call measured)."""
    ran = int(state.step) > trainer.start_step
    return not ran and run.summary_path.is_file() and run.plot_path.is_file()


def _intact(workdir: Path) -> str:
    """Which checkpoint a run stopped by a failed write can be resumed from."""
    path = latest_checkpoint(workdir)
    if path is None:
        return "no checkpoint is intact"
    return f"the latest intact checkpoint is {path}; resume from it (--resume, resume=True)"


def _default_preprocessing(images: np.ndarray) -> Any:
    """uint8 images are standardised by their own statistics; other arrays pass through."""
    return standardizing(images) if images.dtype == np.uint8 else Passthrough()


def _checked_labels(labels: Any, images: np.ndarray, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise KdError(f"{what}: expected {len(images)} integer labels (one per image), got "
                      f"shape {labels.shape} of {labels.dtype}")
    if len(labels) and labels.min() < 0:
        raise KdError(f"{what}: labels must be >= 0, found {labels.min()}")
    return labels.astype(np.int32)
