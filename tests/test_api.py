"""The public API with the user's own modules and arrays: kd_jax.train / distill / evaluate."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
from _helpers import CrashAfterCheckpoint

import kd_jax
from kd_jax.errors import KdError

REPO = Path(__file__).resolve().parents[1]


class Features(nn.Module):
    """A net of the user's own on float feature vectors: no BatchNorm, no convolution."""

    hidden: int = 32

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(4)(nn.relu(nn.Dense(self.hidden)(x)))


class Normed(nn.Module):
    """A net of the user's own with BatchNorm (running statistics) and dropout."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(16)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        return nn.Dense(4)(nn.Dropout(0.5, deterministic=not train)(x))


def blobs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four Gaussian blobs in 8 dimensions, float32: a float dataset of any shape."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    centres = np.eye(4, 8) * 3
    return (centres[labels] + rng.normal(0, 1, (n, 8))).astype(np.float32), labels


QUICK = dict(epochs=3, batch_size=32, recipe=kd_jax.Recipe(learning_rate=0.05), progress=False)


def test_float_features_train_and_distill_without_augmentation():
    images, labels = blobs(512)
    test = blobs(256, seed=1)
    teacher_state, history = kd_jax.train(Features(), images, labels, eval_sets={"test": test},
                                          **QUICK)
    assert history[-1]["test_accuracy"] > 0.9  # chance is 0.25
    assert teacher_state.batch_stats == {}
    teacher = kd_jax.Teacher(Features().apply, teacher_state.inference_variables())
    _, history = kd_jax.distill(Features(8), teacher, images, temperature=2.0,
                                eval_sets={"test": test}, **QUICK)
    assert history[-1]["agreement"] > 0.9 and history[-1]["test_accuracy"] > 0.85
    assert [row["epoch"] for row in history] == [1, 2, 3]


def test_batchnorm_statistics_and_dropout_of_a_users_module_are_trained():
    images, labels = blobs(256)
    state, history = kd_jax.train(Normed(), images, labels, eval_sets={"val": blobs(64, 2)},
                                  **QUICK)
    means = jax.tree.leaves(state.batch_stats)
    assert means and any(np.abs(np.asarray(m)).sum() > 0 for m in means)
    assert history[-1]["val_accuracy"] > 0.8
    # Dropout is on in training only: inference is deterministic.
    variables = state.inference_variables()
    first, second = (Normed().apply(variables, images[:8]) for _ in range(2))
    np.testing.assert_array_equal(first, second)


def test_in_memory_runs_write_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images, labels = blobs(128)
    state, _ = kd_jax.train(Features(), images, labels, **QUICK)
    teacher = kd_jax.Teacher(Features().apply, state.inference_variables())
    kd_jax.distill(Features(), teacher, images, **QUICK)
    assert list(tmp_path.iterdir()) == []


def test_a_workdir_gets_the_run_files_and_a_finished_run_resumes_to_itself(tmp_path):
    images, labels = blobs(128)
    workdir = tmp_path / "run"
    state, history = kd_jax.train(Features(), images, labels, workdir=workdir,
                                  eval_sets={"test": blobs(64, 1)}, **QUICK)
    names = {"config.json", "metrics.jsonl", "summary.json", "curves.png", "checkpoints"}
    assert names <= {p.name for p in workdir.iterdir()}
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["test_accuracy"] == history[-1]["test_accuracy"]
    assert summary["environment"]["jax"] == jax.__version__
    metrics = (workdir / "metrics.jsonl").read_bytes()
    again, rows = kd_jax.train(Features(), images, labels, workdir=workdir, resume=True,
                               eval_sets={"test": blobs(64, 1)}, **QUICK)
    assert rows == history and (workdir / "metrics.jsonl").read_bytes() == metrics
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_array_equal(a, b)
    restored = kd_jax.Teacher.from_workdir(workdir, model=Features())
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored.variables["params"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_evaluate_reports_named_metrics():
    images, labels = blobs(256)
    state, _ = kd_jax.train(Features(), images, labels, **QUICK)
    scores = kd_jax.evaluate(Features(), state.inference_variables(), images, labels,
                             name="train")
    assert set(scores) == {"train_loss", "train_accuracy"} and scores["train_accuracy"] > 0.9


@pytest.mark.parametrize(("call", "message"), [
    (lambda x, y, t: kd_jax.distill(Features(), t, x, labels=y, **QUICK),
     "alpha == 1 trains from the teacher alone: pass no labels"),
    (lambda x, y, t: kd_jax.distill(Features(), t, x, alpha=0.5, **QUICK),
     "alpha = 0.5 < 1 mixes in a hard-label term: pass labels"),
    (lambda x, y, t: kd_jax.train(Features(), x, y[:10], **QUICK),
     "labels: expected 128 integer labels (one per image), got shape (10,) of int64"),
    (lambda x, y, t: kd_jax.distill(Features(), "nowhere", x, **QUICK),
     "not a kd-jax run (no config.json)"),
    (lambda x, y, t: kd_jax.distill(Features(), 3, x, **QUICK),
     "a teacher is a kd_jax.Teacher, an (apply_fn, variables) pair or a workdir, got int"),
])
def test_wrong_calls_are_one_line_errors(call, message):
    images, labels = blobs(128)
    teacher = kd_jax.Teacher(Features().apply, Features().init(jax.random.key(0), images[:1]))
    with pytest.raises(KdError) as error:
        call(images, labels, teacher)
    assert str(error.value).endswith(message)


@pytest.mark.parametrize(("settings", "message"), [
    (dict(lookahead_ramp=True), "lookahead_ramp needs lookahead_steps > 0"),
    (dict(lookahead_steps=5, lookahead_alpha=0), "lookahead_alpha must be in (0, 1], got 0"),
    (dict(ema_decay=1.0), "ema_decay must be in [0, 1), got 1.0"),
    (dict(learning_rate=0), "learning_rate must be > 0, got 0"),
    (dict(lr_decay_epochs=(5,)), "lr_decay_epochs needs lr_schedule step"),
    (dict(bn_lr_factor=None), "bn_lr_factor must be >= 0, got None"),  # the CLI's "unset"
])
def test_a_bad_recipe_is_a_one_line_error_when_made(settings, message):
    """A library user's recipe is checked as the CLI's flags are (one check_recipe), whether
    made or derived with dataclasses.replace, before anything trains on it."""
    with pytest.raises(KdError) as made:
        kd_jax.Recipe(**settings)
    with pytest.raises(KdError) as derived:
        dataclasses.replace(kd_jax.Recipe(), **settings)
    assert str(made.value) == str(derived.value) == message


def readme_example() -> str:
    """The first python block after the README's library heading, as printed."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Use it as a library"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_example_runs_as_printed(tmp_path):
    (tmp_path / "example.py").write_text(readme_example())
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, text=True,
                         capture_output=True, timeout=600, check=True).stdout
    found = re.fullmatch(r"student: ([\d.]+)% test accuracy, ([\d.]+)% agreement with the "
                         r"teacher \(([\d.]+)%\)\n", out)
    assert found, out
    student, agreement, teacher = map(float, found.groups())
    assert teacher > 80 and student > 50 and agreement > 60  # chance is 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["example.py"]  # in memory


# --------------------------------------------------------------------------- resume, not restart
class Dispatches(kd_jax.Hook):
    """The global step numbers (before, after) of every dispatch the loop runs."""

    def __init__(self):
        self.seen = []

    def after_dispatch(self, trainer, before, after):
        self.seen.append((before, after))


def file_digests(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_continues_from_the_checkpoint_and_a_finished_run_runs_nothing(tmp_path, capsys):
    """Runs are deterministic, so a resume that retrained from step 0 would end in the same
    state: what tells it apart is where the loop restarts. 128 images of batch 32: 4 steps an
    epoch, 3 epochs; the first call fails right after epoch 1's checkpoint (step 4)."""
    images, labels = blobs(128)
    workdir, test = tmp_path / "run", {"test": blobs(64, 1)}
    with pytest.raises(RuntimeError, match="crashed after the checkpoint"):
        kd_jax.train(Features(), images, labels, workdir=workdir, eval_sets=test,
                     hooks=[CrashAfterCheckpoint(4)], **QUICK)
    first_row = (workdir / "metrics.jsonl").read_bytes()
    assert first_row.count(b"\n") == 1
    capsys.readouterr()

    resumed = Dispatches()
    _, history = kd_jax.train(Features(), images, labels, workdir=workdir, resume=True,
                              eval_sets=test, hooks=[resumed], **QUICK)
    assert capsys.readouterr().out.startswith("resuming from step 4 (")
    # Steps 5..12 ran, once each; epoch 1 was not run again, nor its row rewritten (its
    # wall-clock fields would differ).
    assert [after for _, after in resumed.seen] == list(range(5, 13))
    assert resumed.seen[0][0] == 4
    assert [row["epoch"] for row in history] == [1, 2, 3]
    metrics = (workdir / "metrics.jsonl").read_bytes()
    assert metrics.startswith(first_row) and metrics.count(b"\n") == 3

    # A finished run, invoked again: nothing trains and no file changes, byte for byte.
    before = file_digests(workdir)
    again = Dispatches()
    _, rows = kd_jax.train(Features(), images, labels, workdir=workdir, resume=True,
                           eval_sets=test, hooks=[again], **QUICK)
    assert again.seen == [] and rows == history
    assert file_digests(workdir) == before


def test_three_steps_per_dispatch_train_exactly_as_one():
    """The accelerators' scanned dispatches against the CPU's single steps: 4 steps an epoch
    in dispatches of 3 are 3 + 1 and 2 padded rows, which must leave the state alone."""
    images, labels = blobs(128)
    runs = {}
    for per_dispatch in (1, 3):
        seen = Dispatches()
        state, history = kd_jax.train(Features(), images, labels, hooks=[seen],
                                      eval_sets={"test": blobs(64, 1)},
                                      steps_per_dispatch=per_dispatch, **QUICK)
        timing = {"images_per_second", "epoch_seconds", "eval_seconds"}
        runs[per_dispatch] = (jax.tree.leaves(state.params), seen.seen,
                              [{k: v for k, v in row.items() if k not in timing}
                               for row in history])
    assert runs[1][1] == [(step, step + 1) for step in range(12)]
    assert runs[3][1] == [(0, 3), (3, 4), (4, 7), (7, 8), (8, 11), (11, 12)]
    assert runs[3][2] == runs[1][2]
    for a, b in zip(runs[3][0], runs[1][0], strict=True):
        np.testing.assert_array_equal(a, b)
