"""The two command-line jobs: a flag config -> data, registered models, the teacher -> the API.

:func:`train_teacher` and :func:`distill` are the glue between a config and
:func:`kd_jax.train` / :func:`kd_jax.distill`: they load the dataset, hold out the validation
split, build registered models (with the CPU convolution on CPUs), restore and check the
teacher, prepare the run directory (multi-process runs included) and add the job's own figures
(per-class accuracy, test-time augmentation, an omitted class) to summary.json. A label-free
student's API call is handed images alone; labels reach its evaluation only.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax import api
from kd_jax.cli import distributed
from kd_jax.cli.config import (
    DistillConfig,
    RunConfig,
    TeacherConfig,
    decay_epochs,
    to_json,
    with_model_recipe,
)
from kd_jax.core import metrics
from kd_jax.core.augment import Augmentation
from kd_jax.core.checkpoint import load_frozen
from kd_jax.core.conv import CpuConv
from kd_jax.core.data import Dataset, load_dataset
from kd_jax.core.devices import check_batch_size, compute_dtype, make_mesh
from kd_jax.core.evaluation import make_predict
from kd_jax.core.models import (
    create_model,
    init_variables,
    model_options,
    model_width,
    with_whitening,
)
from kd_jax.core.optim import Recipe
from kd_jax.core.rundir import ReaderRunDir, RunDir, format_table
from kd_jax.core.steps import TrainState
from kd_jax.core.trainer import Hook
from kd_jax.errors import KdError

RUNS_ROOT = Path("runs")
# Images whose patches set a whitening layer (airbench uses 5,000).
WHITENING_IMAGES = 5000


def latest_run(job: str, root: Path = RUNS_ROOT) -> Path:
    """The newest ``runs/<job>-*`` folder that holds a checkpoint."""
    runs = sorted(p for p in root.glob(f"{job}-*") if (p / "checkpoints" / "latest").is_dir())
    if not runs:
        raise KdError(f"no {job} run found under {root}/; train one first or pass --teacher-dir")
    return runs[-1]


def open_run_dir(config: RunConfig, job: str) -> RunDir:
    """Process 0 prepares (and locks) the workdir, the others wait for it (multi-host: a shared
    folder) and never write it.

    Process 0 tells the others whether it could: had it simply exited (the workdir already
    holds another run, say), they would wait for it at the next collective forever.
    """
    path = Path(config.workdir or RUNS_ROOT / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}")
    described = json.loads(to_json(dataclasses.replace(config, workdir=str(path))))
    prepare = lambda: RunDir.prepare(path, described, resume=config.resume,
                                     overwrite=config.overwrite, resumable=api.RESUMABLE)
    if jax.process_count() == 1:
        return prepare()
    if not config.workdir:
        raise KdError("a multi-process run needs --workdir, a folder every process can reach")
    if not distributed.is_writer():
        if not distributed.writer_succeeded(True):
            raise KdError(f"process 0 could not prepare the workdir {config.workdir}; "
                          "its output says why")
        return ReaderRunDir(path)
    try:
        run = prepare()
    except Exception:  # any failure, KdError or not: the others must not wait for it
        distributed.writer_succeeded(False)
        raise
    distributed.writer_succeeded(True)
    return run


class _Job:
    """What both jobs set up the same way: data, the validation split, models, the recipe.

    The workdir is created (or reopened) by :meth:`open_run` only after every input has been
    checked, so a bad teacher or flag never leaves a half-made run behind.
    """

    def __init__(self, config: RunConfig, name: str):
        if not distributed.is_writer():
            config = dataclasses.replace(config, progress=False)
        self.config, self.name = config, name
        self.dataset = load_dataset(config.dataset, config.data_dir).take_train(config.train_subset)
        self.dtype = compute_dtype(config.dtype)
        # The matrix-product convolution is faster on CPUs only (kd_jax.core.conv).
        self.conv = CpuConv if jax.default_backend() == "cpu" else None
        self.augmentation = Augmentation(config.crop_pad, config.flip, self.dataset.mean,
                                         self.dataset.std, config.pad_mode,
                                         config.alternating_flip, config.cutout)
        recipe = {f.name: getattr(config, f.name) for f in dataclasses.fields(Recipe)}
        self.recipe = Recipe(**{**recipe, "lr_decay_epochs": decay_epochs(config.lr_decay_epochs)})
        (self.train_images, self.train_labels), held_out = self.dataset.hold_out(
            config.validation)
        self.eval_sets = {"test": (self.dataset.test_images, self.dataset.test_labels)}
        if config.validation:  # the last N training images: settings are chosen on them
            self.eval_sets["val"] = held_out

    def model(self, name: str, width: int | None):
        options = model_options(dataclasses.asdict(self.config))
        return create_model(name, self.dataset.num_classes, width, self.dtype, conv=self.conv,
                            **options)

    def initial_variables(self, model, images: np.ndarray) -> dict:
        """The model initialised from the seed; its whitening layer set from ``images``."""
        variables = init_variables(model, self.dataset.image_shape, self.config.seed)
        if self.config.whiten_patch:
            sample = self.augmentation.normalize(images[:WHITENING_IMAGES])
            variables = with_whitening(variables, np.asarray(sample), self.config.whiten_patch)
        return variables

    def open_run(self, num_train: int) -> RunDir:
        """Create or reopen the workdir, once every input has been checked; it stays locked
        until the run is closed (use it in a ``with`` block)."""
        check_batch_size(self.config.batch_size, num_train, make_mesh())
        self.run = open_run_dir(self.config, self.name)
        return self.run

    def settings(self, model, images: np.ndarray, hooks: Sequence[Hook],
                 summary: Callable[[TrainState], dict]) -> dict:
        """The keyword arguments both API calls take, from the config."""
        c = self.config
        return dict(eval_sets=self.eval_sets, recipe=self.recipe, epochs=c.epochs,
                    batch_size=c.batch_size, augmentation=self.augmentation, seed=c.seed,
                    variables=self.initial_variables(model, images), workdir=self.run,
                    resume=c.resume, checkpoint_every_steps=c.checkpoint_every_steps,
                    hooks=hooks, progress=c.progress, eval_batch_size=c.eval_batch_size,
                    steps_per_dispatch=c.steps_per_dispatch,
                    config=json.loads(to_json(c)), summary=summary)

    def logits(self, apply_fn: Callable, variables: dict, images: np.ndarray) -> np.ndarray:
        """A model's logits on ``images`` (stored form), in inference mode."""
        mesh = make_mesh()
        predict = make_predict(api.Applied(apply_fn), self.augmentation,
                               self.config.eval_batch_size, mesh)
        on_mesh = lambda tree: jax.device_put(tree, NamedSharding(mesh, P()))
        return np.asarray(predict(on_mesh(variables), on_mesh(images)))

    def per_class(self, apply_fn: Callable, variables: dict) -> dict[str, float]:
        images, labels = self.eval_sets["test"]
        return metrics.per_class_accuracy(self.logits(apply_fn, variables, images), labels,
                                          self.dataset.class_names)

    def figures(self, model, state: TrainState, model_name: str) -> dict:
        """The summary fields every job adds: what ran, per-class and TTA accuracy."""
        c = self.config
        variables = state.inference_variables()
        figures = {"job": self.name, "model": model_name, "dtype": self.dtype.name,
                   "validation_images": c.validation,
                   "test_images": len(self.eval_sets["test"][1]), "workdir": str(self.run.path),
                   "per_class_accuracy": self.per_class(model.apply, variables)}
        if c.tta != "none":
            for name, (x, y) in self.eval_sets.items():
                scores = api.evaluate(model, variables, x, y, augmentation=self.augmentation,
                                      tta=c.tta, batch_size=c.eval_batch_size, name=name)
                figures |= {f"{k}_tta": v for k, v in scores.items()}
        return figures

    def teacher_figures(self, student, state: TrainState, workdirs: Sequence[str],
                        named: Sequence[tuple[str, api.Teacher]]) -> list[dict]:
        """Each teacher's test accuracy and per-class accuracy, and the student's agreement
        with it (the ensemble's figures are the rows' ``teacher_test_accuracy`` and
        ``agreement``)."""
        test_images, test_labels = self.eval_sets["test"]
        ours = self.logits(student.apply, state.inference_variables(), test_images)
        found = []
        for workdir, (name, teacher) in zip(workdirs, named, strict=True):
            theirs = self.logits(teacher.apply_fn, teacher.variables, test_images)
            found.append({
                "workdir": str(workdir), "model": name,
                "test_accuracy": metrics.classification_metrics(theirs, test_labels)[
                    "test_accuracy"],
                "agreement": metrics.agreement(ours, theirs),
                "per_class_accuracy": metrics.per_class_accuracy(theirs, test_labels,
                                                                 self.dataset.class_names)})
        return found

    def omitted_class(self, student, state: TrainState, held_out: np.ndarray,
                      omit: list[int]) -> dict:
        """:func:`omitted_class_report` of the student: its offset chosen on ``held_out``."""
        variables = state.inference_variables()
        test_images, test_labels = self.eval_sets["test"]
        held_logits = self.logits(student.apply, variables, self.train_images[held_out])
        return omitted_class_report(
            self.logits(student.apply, variables, test_images), test_labels, held_logits,
            self.train_labels[held_out], omit,
            ",".join(self.dataset.class_names[c] for c in omit), self.config.bias_offset)

    def finish(self, history: list[dict], columns: list[str]) -> dict:
        """Print the final table; returns the summary the API wrote."""
        if not distributed.is_writer():
            return {}
        print(format_table(history, ["epoch", *columns]))
        print(f"final test accuracy {100 * history[-1]['test_accuracy']:.2f}% "
              f"(last epoch); outputs in {self.run.path}")
        return json.loads(self.run.summary_path.read_text())


def train_teacher(config: TeacherConfig, hooks: Sequence[Hook] = ()) -> dict:
    """Train a model on labels with cross-entropy; returns (and writes) the summary."""
    job = _Job(with_model_recipe(config), "teacher")
    model = job.model(config.model, config.width)
    with job.open_run(len(job.train_labels)):
        _, history = api.train(
            model, job.train_images, job.train_labels, label_smoothing=config.label_smoothing,
            **job.settings(model, job.train_images, hooks,
                           lambda state: job.figures(model, state, config.model)))
        return job.finish(history, ["train_loss", "train_accuracy", "test_loss",
                                    "test_accuracy", "epoch_seconds"])


def class_id(dataset: Dataset, name: str) -> int:
    if name not in dataset.class_names:
        raise KdError(f"unknown class {name!r}; choose one of: {', '.join(dataset.class_names)}")
    return dataset.class_names.index(name)


def left_out_classes(dataset: Dataset, config: DistillConfig) -> list[int]:
    """The classes the transfer set lacks: ``--omit-class``, or all but ``--transfer-classes``."""
    if config.omit_class:
        return [class_id(dataset, config.omit_class)]
    if config.transfer_classes:
        kept = {class_id(dataset, name.strip()) for name in config.transfer_classes.split(",")}
        return [c for c in range(dataset.num_classes) if c not in kept]
    return []


def split_transfer_set(labels: np.ndarray, omit: int | Sequence[int] | None,
                       holdout: int) -> tuple[np.ndarray, np.ndarray]:
    """(transfer-set indices, held-out indices) into the training set.

    Without an omitted class the student learns from every training image. With one (or
    several), the last ``holdout`` images are kept aside (to choose the omitted classes' logit
    offset, so the test set never picks it) and every image of an omitted class is dropped
    from the rest.
    """
    n = len(labels)
    omit = [] if omit is None else list(np.atleast_1d(omit))
    if not omit:
        return np.arange(n), np.arange(0)
    if not holdout < n:
        raise KdError(f"holdout {holdout} leaves no training images out of {n}")
    kept = np.arange(n - holdout)
    return kept[~np.isin(labels[kept], omit)], np.arange(n - holdout, n)


def restore_teacher(workdir: str | Path, job: _Job) -> tuple[str, api.Teacher]:
    """The frozen teacher (its name, and as a :class:`kd_jax.Teacher`), checked against this
    run's data and the expectations the config states."""
    frozen = load_frozen(workdir)
    trained_on = frozen.config.get("dataset", "cifar10")
    if trained_on != job.config.dataset:
        raise KdError(f"{workdir}: the teacher was trained on {trained_on}, "
                      f"this run uses {job.config.dataset}")
    name, width = frozen.model_spec
    expected_model = job.config.teacher_model
    if expected_model is not None and name != expected_model:
        raise KdError(f"{workdir}: the teacher is a {name}, --teacher-model says {expected_model}")
    expected_width = job.config.teacher_width
    width = model_width(name, width)
    if expected_width is not None and width != expected_width:
        raise KdError(f"{workdir}: the teacher has width {width}, "
                      f"--teacher-width says {expected_width}")
    model = frozen.build(job.dataset.num_classes, job.dtype, conv=job.conv)
    expected = jax.eval_shape(lambda: init_variables(model, job.dataset.image_shape, 0))
    shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)
    if shapes(expected) != shapes(frozen.variables):
        head = [a.shape[-1] for a in jax.tree.leaves(frozen.variables["params"]) if a.ndim == 2]
        if head and head[-1] != job.dataset.num_classes:
            raise KdError(f"{workdir}: the teacher has {head[-1]} classes, "
                          f"the data has {job.dataset.num_classes}")
        raise KdError(f"{frozen.checkpoint}: checkpoint does not match the teacher model "
                      f"{name} (width {width}) named in its config.json")
    return name, api.Teacher(model.apply, frozen.variables)


def distill(config: DistillConfig, hooks: Sequence[Hook] = ()) -> dict:
    """Train a student on frozen teachers' softened outputs; returns (and writes) the summary."""
    if not config.teachers:
        # Record which teacher "the latest" was: a --resume must not pick up a newer one.
        config = dataclasses.replace(config, teachers=[str(latest_run("teacher"))])
    job = _Job(with_model_recipe(config), "distill")
    student = job.model(config.student, config.student_width)
    loss = config.distill_loss()
    omit = left_out_classes(job.dataset, config)
    named = [restore_teacher(workdir, job) for workdir in config.teachers]
    teachers = [teacher for _, teacher in named]
    transfer, held_out = split_transfer_set(job.train_labels, omit, config.holdout)
    images = job.train_images[transfer]
    # Labels are handed over only with a hard-label term (and a loss that needs them, DKD,
    # needs one: DistillConfig.validate).
    labels = job.train_labels[transfer] if config.alpha != 1 else None

    def figures(state: TrainState) -> dict:
        found = {**job.figures(student, state, config.student), "transfer_images": len(transfer),
                 "teachers": job.teacher_figures(student, state, config.teachers, named),
                 "temperature": config.temperature, "alpha": config.alpha, "loss": loss.name,
                 "combine": config.combine}
        if omit:
            found["omitted_class"] = job.omitted_class(student, state, held_out, omit)
        return found

    with job.open_run(len(transfer)):
        _, history = api.distill(student, teachers, images, labels=labels, loss=loss,
                                 alpha=config.alpha, combine=config.combine,
                                 ensemble_layout=config.ensemble_layout,
                                 features=config.feature_method(),
                                 **job.settings(student, images, hooks, figures))
        return job.finish(history, ["distill_loss", "test_accuracy", "agreement", "test_kl",
                                    "epoch_seconds"])


def omitted_class_report(test_logits: np.ndarray, test_labels: np.ndarray,
                         held_logits: np.ndarray, held_labels: np.ndarray,
                         omit: int | Sequence[int], name: str,
                         fixed_offset: float | None = None) -> dict:
    """Accuracy on the classes the student never saw, before and after the logit offset
    chosen on held-out training images (Hinton et al. 2015, sec. 3), and after
    ``fixed_offset`` when one is given. Error counts are out of the whole test set.

    Raising the left-out classes' logits by ``b`` changes no prediction that lowering every
    other class's by ``b`` would not, so one rule covers both of the paper's cases: +3.5 to an
    omitted 3, and -7.6 to 7 and 8 when only they were seen (= +7.6 to the other eight).
    """
    classes = list(np.atleast_1d(omit))
    of_class = np.isin(test_labels, classes)

    def figures(logits: np.ndarray, suffix: str) -> dict:
        right = logits.argmax(-1) == test_labels
        return {f"class_accuracy{suffix}": float(np.mean(right[of_class])),
                f"class_errors{suffix}": int(np.sum(~right[of_class])),
                f"test_accuracy{suffix}": float(np.mean(right)),
                f"test_errors{suffix}": int(np.sum(~right))}

    offset = metrics.best_logit_offset(held_logits, held_labels, classes)
    report = {"class": name, "holdout_images": len(held_labels),
              "class_images": int(np.sum(of_class)), **figures(test_logits, ""),
              "offset": offset,
              **figures(metrics.shift_logits(test_logits, classes, offset), "_after_offset")}
    if fixed_offset is not None:
        report["fixed_offset"] = fixed_offset
        report.update(figures(metrics.shift_logits(test_logits, classes, fixed_offset),
                              "_after_fixed_offset"))
    return report
