"""The two jobs: train a teacher on labels, and distill a student from a frozen teacher.

Both share everything but the step and what the loop is fed: the teacher's loop gets
``(images, labels)``; a label-free student's loop gets ``(images,)`` and a step that cannot
take labels. Labels reach the student job's evaluation only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax import distributed, metrics
from kd_jax.checkpoint import load_frozen
from kd_jax.config import DistillConfig, RunConfig, TeacherConfig
from kd_jax.data import Augmentation, Dataset, load_dataset
from kd_jax.errors import KdError
from kd_jax.models import (
    count_params,
    create_model,
    init_variables,
    model_options,
    model_width,
    with_whitening,
)
from kd_jax.plots import plot_history
from kd_jax.rundir import RunDir, format_table, latest_run
from kd_jax.train import (
    OptimizerSpec,
    TrainState,
    check_batch_size,
    compute_dtype,
    create_state,
    fit,
    make_distill_step,
    make_mesh,
    make_optimizer,
    make_predict,
    make_teacher_step,
)

# Images whose patches set a whitening layer (airbench uses 5,000).
WHITENING_IMAGES = 5000


class _ReaderRunDir(RunDir):
    """The run directory as processes other than 0 see it: they read, process 0 writes."""

    def write_metrics(self, rows: list[dict]) -> None:
        pass

    def write_summary(self, summary: dict) -> None:
        pass


def _run_dir(config: RunConfig, name: str) -> RunDir:
    """Process 0 prepares the workdir, the others wait for it (multi-host: a shared folder).

    Process 0 tells the others whether it could: had it simply exited (the workdir already
    holds another run, say), they would wait for it at the next collective forever.
    """
    if jax.process_count() == 1:
        return RunDir.prepare(config, name)
    if not config.workdir:
        raise KdError("a multi-process run needs --workdir, a folder every process can reach")
    if not distributed.is_writer():
        if not distributed.writer_succeeded(True):
            raise KdError(f"process 0 could not prepare the workdir {config.workdir}; "
                          "its output says why")
        return _ReaderRunDir(Path(config.workdir))
    try:
        run = RunDir.prepare(config, name)
    except Exception:  # any failure, KdError or not: the others must not wait for it
        distributed.writer_succeeded(False)
        raise
    distributed.writer_succeeded(True)
    return run


class _Job:
    """What both jobs set up the same way: data, mesh, the student/teacher model, evaluation.

    The workdir is created (or reopened) by :meth:`open_run` only after every input has been
    checked, so a bad teacher or flag never leaves a half-made run behind.
    """

    def __init__(self, config: RunConfig, name: str, model: str, width: int | None):
        if not distributed.is_writer():
            config = dataclasses.replace(config, progress=False)
        self.config, self.name = config, name
        self.dataset = load_dataset(config.dataset, config.data_dir).take_train(config.train_subset)
        self.mesh: Mesh = make_mesh()
        self.dtype = compute_dtype(config.dtype)
        self.model = create_model(model, self.dataset.num_classes, width, self.dtype,
                                  **model_options(dataclasses.asdict(config)))
        self.augmentation = Augmentation(config.crop_pad, config.flip, self.dataset.mean,
                                         self.dataset.std, config.pad_mode,
                                         config.alternating_flip, config.cutout)
        self.predict = make_predict(self.model, self.augmentation, config.eval_batch_size,
                                    self.mesh)
        self.test_images = self.to_device(self.dataset.test_images)

    def to_device(self, array: np.ndarray) -> jax.Array:
        return jax.device_put(array, NamedSharding(self.mesh, P()))

    def initial_state(self, train_images: np.ndarray) -> TrainState:
        """The model initialised from the seed (its whitening layer from ``train_images``),
        with the optimizer the config describes."""
        c = self.config
        steps_per_epoch = max(len(train_images) // c.batch_size, 1)
        spec = OptimizerSpec(**{f.name: getattr(c, f.name)
                                for f in dataclasses.fields(OptimizerSpec)})
        tx, self.schedule = make_optimizer(spec, c.epochs * steps_per_epoch)
        variables = init_variables(self.model, self.dataset.image_shape, c.seed)
        if c.whiten_patch:
            sample = self.augmentation.normalize(train_images[:WHITENING_IMAGES])
            variables = with_whitening(variables, np.asarray(sample), c.whiten_patch)
        return create_state(self.model, variables, tx, c.ema_decay)

    def test_logits(self, state: TrainState) -> np.ndarray:
        return np.asarray(self.predict(state.inference_variables(), self.test_images))

    def tta_scores(self, state: TrainState) -> dict:
        """Test (and validation) figures with test-time augmentation; {} without it. Reported
        beside the plain ones, which stay the headline figures."""
        if self.config.tta == "none":
            return {}
        predict = make_predict(self.model, self.augmentation, self.config.eval_batch_size,
                               self.mesh, self.config.tta)
        variables = state.inference_variables()
        scores = metrics.classification_metrics(
            np.asarray(predict(variables, self.test_images)), self.dataset.test_labels,
            prefix="test")
        if self.config.validation:
            scores |= metrics.classification_metrics(
                np.asarray(predict(variables, self.val_images)), self.val_labels, prefix="val")
        return {f"{k}_tta": v for k, v in scores.items()}

    @property
    def num_train(self) -> int:
        """Training images left once the ``--validation`` ones are held out."""
        return len(self.dataset.train_labels) - self.config.validation

    def hold_out_validation(self) -> int:
        """Keep the last ``--validation`` training images out of training, so settings (a
        learning rate, a temperature) can be chosen without looking at the test set; returns
        how many images are left to train on."""
        num_train = self.num_train
        if num_train < 1:
            raise KdError(f"validation {self.config.validation} leaves no training images")
        self.val_images = self.to_device(self.dataset.train_images[num_train:])
        self.val_labels = self.dataset.train_labels[num_train:]
        return num_train

    def validation_scores(self, state: TrainState) -> dict:
        """``val_loss`` and ``val_accuracy`` on the held-out images; {} when none are held out."""
        if not self.config.validation:
            return {}
        logits = np.asarray(self.predict(state.inference_variables(), self.val_images))
        return metrics.classification_metrics(logits, self.val_labels, prefix="val")

    def open_run(self, num_train: int) -> None:
        """Create or reopen the workdir, once every input has been checked."""
        check_batch_size(self.config.batch_size, num_train, self.mesh)
        self.run = _run_dir(self.config, self.name)

    def fit(self, step, state: TrainState, train_arrays: tuple, evaluate):
        return fit(self.config, step, state, train_arrays, evaluate, self.schedule, self.run,
                   self.augmentation, self.mesh)

    def finish(self, summary: dict, history: list[dict], columns: list[str],
               reference_accuracy: float | None = None) -> dict:
        """Write summary.json and the plot, print the final table; returns the summary."""
        if not distributed.is_writer():
            return summary
        self.run.write_summary(summary)
        plot_history(history, self.run.plot_path, f"{summary['job']}: {summary['model']}",
                     reference_accuracy)
        print(format_table(history, ["epoch", *columns]))
        print(f"final test accuracy {100 * summary['test_accuracy']:.2f}% "
              f"(last epoch); outputs in {self.run.path}")
        return summary

    def describe(self, model_name: str, state: TrainState) -> dict:
        return {"model": model_name, "params": count_params(state.params),
                "dtype": self.dtype.name, "devices": self.mesh.size,
                "train_images": self.num_train, "validation_images": self.config.validation,
                "workdir": str(self.run.path)}


def train_teacher(config: TeacherConfig) -> dict:
    """Train a model on labels with cross-entropy; returns (and writes) the summary."""
    job = _Job(config, "teacher", config.model, config.width)
    labels = job.dataset.test_labels
    images, train_labels = job.dataset.train_images, job.dataset.train_labels
    num_train = job.hold_out_validation()

    def evaluate(state: TrainState) -> dict:
        return (metrics.classification_metrics(job.test_logits(state), labels)
                | job.validation_scores(state))

    job.open_run(num_train)
    state = job.initial_state(images[:num_train])
    state, history, timing = job.fit(make_teacher_step(config.label_smoothing), state,
                                     (images[:num_train], train_labels[:num_train]), evaluate)
    logits = job.test_logits(state)
    summary = {"job": "teacher", **job.describe(config.model, state), **history[-1],
               **job.tta_scores(state), **timing,
               "per_class_accuracy": metrics.per_class_accuracy(logits, labels,
                                                                job.dataset.class_names)}
    return job.finish(summary, history, ["train_loss", "train_accuracy", "test_loss",
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


def restore_teacher(workdir, job: _Job):
    """The frozen teacher (model, device variables), checked against this run's data."""
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
    model = frozen.build(job.dataset.num_classes, job.dtype)
    expected = jax.eval_shape(lambda: init_variables(model, job.dataset.image_shape, 0))
    shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)
    if shapes(expected) != shapes(frozen.variables):
        head = [a.shape[-1] for a in jax.tree.leaves(frozen.variables["params"]) if a.ndim == 2]
        if head and head[-1] != job.dataset.num_classes:
            raise KdError(f"{workdir}: the teacher has {head[-1]} classes, "
                          f"the data has {job.dataset.num_classes}")
        raise KdError(f"{frozen.checkpoint}: checkpoint does not match the teacher model "
                      f"{name} (width {width}) named in its config.json")
    return name, model, jax.tree.map(job.to_device, frozen.variables)


def distill(config: DistillConfig) -> dict:
    """Train a student on a frozen teacher's softened outputs; returns (and writes) the summary."""
    if config.teacher_dir is None:
        # Record which teacher "the latest" was: a --resume must not pick up a newer one.
        config = dataclasses.replace(config, teacher_dir=str(latest_run("teacher")))
    teacher_dir = config.teacher_dir
    job = _Job(config, "distill", config.student, config.student_width)
    dataset, labels = job.dataset, job.dataset.test_labels
    omit = left_out_classes(dataset, config)
    teacher_name, teacher_model, teacher_variables = restore_teacher(teacher_dir, job)
    teacher_logits = np.asarray(make_predict(teacher_model, job.augmentation,
                                             config.eval_batch_size, job.mesh)(
        teacher_variables, job.test_images))
    teacher_accuracy = metrics.classification_metrics(teacher_logits, labels)["test_accuracy"]
    num_train = job.hold_out_validation()
    transfer, held_out = split_transfer_set(dataset.train_labels[:num_train], omit,
                                            config.holdout)

    # The student's loop is handed images alone unless a hard-label term is asked for.
    images = dataset.train_images[transfer]
    train_arrays = (images,) if config.alpha == 1 else (images, dataset.train_labels[transfer])

    def evaluate(state: TrainState) -> dict:
        logits = job.test_logits(state)
        return {**metrics.classification_metrics(logits, labels),
                "agreement": metrics.agreement(logits, teacher_logits),
                "test_kl": metrics.mean_kl(logits, teacher_logits),
                "teacher_test_accuracy": teacher_accuracy, **job.validation_scores(state)}

    step = make_distill_step(teacher_model.apply, teacher_variables, config.temperature,
                             config.alpha)
    job.open_run(len(transfer))
    state = job.initial_state(images)
    state, history, timing = job.fit(step, state, train_arrays, evaluate)

    logits = job.test_logits(state)
    summary = {"job": "distill", **job.describe(config.student, state),
               "transfer_images": len(transfer),
               "teacher_dir": str(teacher_dir), "teacher_model": teacher_name,
               "temperature": config.temperature, "alpha": config.alpha, **history[-1],
               **job.tta_scores(state), **timing,
               "per_class_accuracy": metrics.per_class_accuracy(logits, labels,
                                                                dataset.class_names),
               "teacher_per_class_accuracy": metrics.per_class_accuracy(
                   teacher_logits, labels, dataset.class_names)}
    if omit:
        held_logits = np.asarray(job.predict(state.inference_variables(),
                                             job.to_device(dataset.train_images[held_out])))
        summary["omitted_class"] = omitted_class_report(
            logits, labels, held_logits, dataset.train_labels[held_out], omit,
            ",".join(dataset.class_names[c] for c in omit), config.bias_offset)
    return job.finish(summary, history, ["distill_loss", "test_accuracy", "agreement",
                                         "test_kl", "epoch_seconds"], teacher_accuracy)


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
