"""Crash safety: a run killed anywhere and resumed ends bit-identical to one never stopped.

Each case runs the real CLI in a subprocess with ``$KD_JAX_FAULT`` (tests/faults.py: a hook
installed by tests/fault_cli.py) set to SIGKILL it at an exact point, resumes it with
``--resume``, and compares the final params (bytes) and metrics.jsonl (minus wall-clock
fields) with an uninterrupted run of the same seed.
A 320-image synthetic CIFAR folder, resnet8 at width 4, batch 32: 10 steps an epoch, 2 epochs.
"""

from __future__ import annotations

import shutil
import signal

import pytest
from _reliability_util import (
    cache_env,
    metrics_rows,
    params_bytes,
    run_cli,
    snapshot,
    write_cifar_binary,
)

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 10


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cache_env(tmp_path_factory.getbasetemp() / "xla-cache")  # shared by test modules


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_cifar_binary(tmp_path_factory.mktemp("cifar"))


def teacher_args(data_dir, workdir, *extra):
    return ["--data-dir", str(data_dir), "--workdir", str(workdir), "--model", "resnet8",
            "--width", "4", "--batch-size", "32", "--eval-batch-size", "64", "--epochs", "2",
            "--no-progress", *extra]


def ok(result):
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, data_dir, env):
    """The uninterrupted run every interrupted one must reproduce."""
    workdir = tmp_path_factory.mktemp("baseline") / "run"
    ok(run_cli("train_teacher.py", *teacher_args(data_dir, workdir), env=env))
    return workdir


def assert_same_run(workdir, reference):
    assert metrics_rows(workdir) == metrics_rows(reference)
    assert params_bytes(workdir) == params_bytes(reference)
    assert sorted(p.name for p in (workdir / "checkpoints" / "best").iterdir()) == \
        sorted(p.name for p in (reference / "checkpoints" / "best").iterdir())


# (fault, --checkpoint-every-steps): checkpoints land at steps 4, 8, 10 (epoch), 12, 16, 20.
# Async writes finish a few steps after they start, so where a write "in flight" is resumed
# from varies; the result must not.
KILLS = [
    ("kill@step:13", 0),  # mid-epoch 2: from the epoch-1 checkpoint
    ("kill@step:17", 4),  # mid-epoch 2: from a mid-epoch checkpoint and its partial sums
    ("kill@metrics:1", 0),  # row 1 written, its checkpoint not yet: the row must be redone once
    ("kill@checkpoint:1", 4),  # the first (mid-epoch) write in flight: likely from scratch
    ("kill@checkpoint:3", 4),  # the epoch-1 write in flight
    ("kill@checkpoint:2", 0),  # the last write in flight (the run's final state)
]


@pytest.mark.parametrize(("fault", "every"), KILLS)
def test_kill_then_resume_is_bit_identical(tmp_path, data_dir, env, baseline, fault, every):
    workdir = tmp_path / "run"
    args = teacher_args(data_dir, workdir, "--checkpoint-every-steps", str(every))
    killed = run_cli("train_teacher.py", *args, env={**env, "KD_JAX_FAULT": fault})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ok(run_cli("train_teacher.py", *args, "--resume", env=env))
    assert_same_run(workdir, baseline)


def test_killed_twice_then_resumed_is_bit_identical(tmp_path, data_dir, env, baseline):
    workdir = tmp_path / "run"
    args = teacher_args(data_dir, workdir, "--checkpoint-every-steps", "3")
    # Killed mid-epoch 1, then (resumed) after evaluating epoch 1, before its row is written.
    for fault in ("kill@step:8", "kill@eval:1"):
        killed = run_cli("train_teacher.py", *args, "--resume", env={**env, "KD_JAX_FAULT": fault})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
    ok(run_cli("train_teacher.py", *args, "--resume", env=env))
    assert_same_run(workdir, baseline)


@pytest.mark.parametrize(("action", "signum"), [("term", signal.SIGTERM),
                                               ("int", signal.SIGINT)])
def test_signal_checkpoints_mid_epoch_and_resume_is_bit_identical(tmp_path, data_dir, env,
                                                                  baseline, action, signum):
    """Preemption (SIGTERM) and Ctrl-C (SIGINT): stop after the step, checkpoint, say how to
    resume, exit 128 + signal."""
    workdir = tmp_path / "run"
    args = teacher_args(data_dir, workdir)
    stopped = run_cli("train_teacher.py", *args, env={**env, "KD_JAX_FAULT": f"{action}@step:6"})
    assert stopped.returncode == 128 + signum
    name = signal.Signals(signum).name
    assert stopped.stderr.strip().splitlines()[-2:] == [
        f"{name} received: stopping after this step to write a checkpoint (send it again to "
        "stop at once, without one)",
        f"error: stopped by {name} at step 6; checkpoint saved in "
        f"{workdir / 'checkpoints' / 'latest' / '6'}; rerun the same command with --resume to "
        "continue"]
    assert sorted(p.name for p in (workdir / "checkpoints" / "latest").iterdir()) == ["6"]
    resumed = ok(run_cli("train_teacher.py", *args, "--resume", env=env))
    assert resumed.stdout.startswith("resuming from step 6 ")
    assert_same_run(workdir, baseline)


def test_injected_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, env):
    workdir = tmp_path / "run"
    # Params poisoned after step 13: step 14's loss is the first non-finite one.
    result = run_cli("train_teacher.py", *teacher_args(data_dir, workdir),
                     env={**env, "KD_JAX_FAULT": "nan@step:13"})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: non-finite train_loss at step 14; stopped, the last good checkpoint is kept "
        f"in {workdir / 'checkpoints'}")
    assert [p.name for p in (workdir / "checkpoints" / "latest").iterdir()] == ["10"]
    assert [row["epoch"] for row in metrics_rows(workdir)] == [1]
    assert not (workdir / "summary.json").exists()


@pytest.mark.parametrize(("fault", "every"), [("nan@step:4", 4), ("nan@step:10", 0)])
def test_nan_weights_are_never_checkpointed(tmp_path, data_dir, env, fault, every):
    """Weights gone NaN at a step whose own loss was finite, right before a checkpoint (mid-epoch
    or at the epoch's end): the run stops before writing it, or a metrics row."""
    workdir = tmp_path / "run"
    step = fault.rsplit(":", 1)[1]
    result = run_cli("train_teacher.py",
                     *teacher_args(data_dir, workdir, "--checkpoint-every-steps", str(every)),
                     env={**env, "KD_JAX_FAULT": fault})
    assert (result.returncode, result.stderr.strip()) == (2, (
        f"error: non-finite weights after step {step}; stopped, the last good checkpoint is "
        f"kept in {workdir / 'checkpoints'}"))
    assert not list((workdir / "checkpoints" / "latest").iterdir())
    assert metrics_rows(workdir) == []


def test_distill_kill_then_resume_is_bit_identical(tmp_path, data_dir, env, baseline):
    teacher = tmp_path / "teacher"
    shutil.copytree(baseline, teacher)
    before = snapshot(teacher)
    runs = {name: tmp_path / name for name in ("straight", "killed")}
    args = lambda workdir: ["--data-dir", str(data_dir), "--teacher-dir", str(teacher),
                            "--workdir", str(workdir), "--student", "resnet8",
                            "--student-width", "4", "--batch-size", "32",
                            "--eval-batch-size", "64", "--epochs", "2", "--no-progress",
                            "--checkpoint-every-steps", "5"]
    ok(run_cli("distill.py", *args(runs["straight"]), env=env))
    killed = run_cli("distill.py", *args(runs["killed"]),
                     env={**env, "KD_JAX_FAULT": "kill@step:14"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ok(run_cli("distill.py", *args(runs["killed"]), "--resume", env=env))
    assert_same_run(runs["killed"], runs["straight"])
    assert snapshot(teacher) == before


def test_scanned_dispatches_sigterm_then_resume_is_bit_identical(tmp_path, data_dir, env):
    """The accelerators' path: 3 steps per dispatch in a scan (10 = 3 + 3 + 3 + 1 padded)."""
    args = lambda workdir: teacher_args(data_dir, workdir, "--steps-per-dispatch", "3",
                                        "--checkpoint-every-steps", "4")
    ok(run_cli("train_teacher.py", *args(tmp_path / "straight"), env=env))
    stopped = run_cli("train_teacher.py", *args(tmp_path / "stopped"),
                      env={**env, "KD_JAX_FAULT": "term@step:2"})
    assert stopped.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at step 6;" in stopped.stderr
    ok(run_cli("train_teacher.py", *args(tmp_path / "stopped"), "--resume", env=env))
    assert_same_run(tmp_path / "stopped", tmp_path / "straight")
