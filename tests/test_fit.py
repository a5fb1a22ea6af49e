"""benchmarks/fit.py: the inference-mode accuracy of a finished run on its own images."""

from __future__ import annotations

import importlib.util
import json

import pytest
from _helpers import REPO

from kd_jax.cli import jobs
from kd_jax.cli.config import TeacherConfig

spec = importlib.util.spec_from_file_location("fit", REPO / "benchmarks" / "fit.py")
fit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fit)


def test_fit_recomputes_the_runs_own_validation_accuracy(tiny_cifar, tmp_path):
    """The held-out figure, computed again from the checkpoint, equals the run's: so the
    training-image figure beside it uses the run's split and normalisation."""
    workdir = tmp_path / "run"
    jobs.train_teacher(TeacherConfig(data_dir=str(tiny_cifar), workdir=str(workdir), epochs=1,
                                     batch_size=40, eval_batch_size=40, model="resnet8", width=4,
                                     validation=40, progress=False))
    summary = json.loads((workdir / "summary.json").read_text())

    figures = fit.fit(workdir, str(tiny_cifar))

    assert figures["val_accuracy"] == pytest.approx(summary["val_accuracy"], abs=1e-6)
    assert figures["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert 0.0 <= figures["train_accuracy"] <= 1.0
