"""A catalogue of bad inputs: each gets a one-line error and exit 2, and loses nothing saved.

Every case runs the CLI in-process with ``--workdir`` pointing at a copy of an existing run
and (where the flags allow) ``--overwrite``, then checks the message word for word and that the
existing run's files are byte-identical: inputs must be refused before anything is replaced.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from _helpers import (
    Exploit,
    random_cifar_records,
    run_cli,
    snapshot,
    write_cifar100_binary,
    write_cifar_binary,
)

from kd_jax.cli.config import DistillConfig, TeacherConfig, to_json, with_model_recipe
from kd_jax.cli.jobs import distill, train_teacher
from kd_jax.cli.main import main
from kd_jax.core import data
from kd_jax.core.checkpoint import RunCheckpoints
from kd_jax.core.models import create_model, init_variables, model_options
from kd_jax.core.optim import Recipe, make_optimizer
from kd_jax.core.rundir import RunDir
from kd_jax.core.steps import create_state
from kd_jax.errors import KdError


def _state_like(num_classes, model="resnet8", width=4, **options):
    """A train state of zeros, shaped by tracing alone: no compilation (values play no part)."""
    model = create_model(model, num_classes, width, **options)
    tx, _ = make_optimizer(Recipe(0.1, weight_decay=0.0, warmup_fraction=0), 10)
    shapes = jax.eval_shape(lambda: init_variables(model, (32, 32, 3), 0))
    return create_state(model, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes), tx)


def make_run(path, num_classes=10, **config):
    """A finished-looking teacher run (config, metrics, an untrained checkpoint), no training;
    its config.json holds the resolved model options, as a real run's does."""
    config = TeacherConfig(**{"model": "resnet8", "width": 4, "workdir": str(path), **config})
    config = with_model_recipe(config)
    with RunDir.prepare(path, json.loads(to_json(config))) as run:
        state = _state_like(num_classes, config.model, config.width,
                            **model_options(dataclasses.asdict(config)))
        checkpoints = RunCheckpoints(path)
        checkpoints.save(state, {}, is_best=True)
        checkpoints.close()
        run.write_metrics([{"epoch": 1, "step": 0, "test_accuracy": 0.1}])
    return path


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("saved") / "run")


@pytest.fixture
def existing(tmp_path, saved_run):
    """A copy of a saved run, and its bytes before the test."""
    path = shutil.copytree(saved_run, tmp_path / "existing")
    return path, snapshot(path)


@pytest.fixture
def data_dir(tmp_path):
    return write_cifar_binary(tmp_path / "cifar", per_batch=16, test=16,
                              records=random_cifar_records)


def error_of(job, config_class, argv, capsys) -> str:
    """Run the CLI; assert exit 2 and a single ``error:`` line on stderr; return the message."""
    code = main(config_class, job, "", [str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0][len("error: "):]


def teacher_error(capsys, existing, *argv, overwrite=True):
    path, before = existing
    flags = ["--workdir", path, "--no-progress", "--model", "resnet8", "--width", "4",
             "--batch-size", "16", "--eval-batch-size", "16", "--epochs", "1"]
    message = error_of(train_teacher, TeacherConfig,
                       [*flags, *(["--overwrite"] if overwrite else []), *argv], capsys)
    assert snapshot(path) == before
    return message


# --------------------------------------------------------------------------- data
def test_missing_data_dir(capsys, existing, tmp_path):
    assert teacher_error(capsys, existing, "--data-dir", tmp_path / "nope") == \
        f"{tmp_path / 'nope'}: data directory not found"


def test_missing_data_file(capsys, existing, data_dir):
    (data_dir / "data_batch_3.bin").unlink()
    assert teacher_error(capsys, existing, "--data-dir", data_dir) == \
        f"{data_dir / 'data_batch_3.bin'}: file not found"


@pytest.mark.parametrize(("size", "what"), [(0, "empty"), (3073 * 5 - 7, "truncated"),
                                            (3073 * 5 + 1, "one byte too many")])
def test_bad_data_file_size(capsys, existing, data_dir, size, what):
    path = data_dir / "data_batch_2.bin"
    path.write_bytes(path.read_bytes()[:size].ljust(size, b"\0"))
    assert teacher_error(capsys, existing, "--data-dir", data_dir) == (
        f"{path}: size {size} bytes is not a positive multiple of 3073 (truncated or not a "
        "CIFAR-10 binary batch)")


def test_oversized_data_file_is_refused_before_reading(capsys, existing, data_dir):
    path = data_dir / "test_batch.bin"
    with open(path, "r+b") as f:
        f.truncate(3073 * 10_001)  # sparse: no need to write 30 MB
    assert teacher_error(capsys, existing, "--data-dir", data_dir) == (
        f"{path}: 30733073 bytes is more than a CIFAR-10 batch file holds (at most 30730000); "
        "not a CIFAR-10 batch")


def test_label_out_of_range(capsys, existing, data_dir):
    path = data_dir / "data_batch_5.bin"
    raw = bytearray(path.read_bytes())
    raw[3073 * 2] = 11
    path.write_bytes(bytes(raw))
    assert teacher_error(capsys, existing, "--data-dir", data_dir) == \
        f"{path}: label 11 at record 2 is outside 0..9"


def test_data_folder_of_another_dataset(capsys, existing, tmp_path):
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (mnist / name).write_bytes(b"\0\0\x08\x03")
    assert teacher_error(capsys, existing, "--data-dir", mnist) == (
        f"{mnist}: no CIFAR-10 here (expected data_batch_1.bin .. test_batch.bin, or the "
        "cifar-10-batches-py files)")


def test_unknown_dataset(capsys, existing, data_dir):
    assert teacher_error(capsys, existing, "--data-dir", data_dir, "--dataset", "imagenet") == \
        "unknown dataset 'imagenet'; choose one of: cifar10, cifar100, mnist"


def test_cifar10_folder_given_as_cifar100(capsys, existing, data_dir):
    assert teacher_error(capsys, existing, "--data-dir", data_dir, "--dataset", "cifar100") == (
        f"{data_dir}: no CIFAR-100 here (expected train.bin and test.bin, or the "
        "cifar-100-python files)")


def test_malformed_cifar100_file(capsys, existing, tmp_path):
    folder = write_cifar100_binary(tmp_path / "cifar-100-binary", train=16, test=16)
    raw = bytearray((folder / "train.bin").read_bytes())
    raw[3074 * 3 + 1] = 100
    (folder / "train.bin").write_bytes(bytes(raw))
    assert teacher_error(capsys, existing, "--data-dir", tmp_path, "--dataset", "cifar100") == \
        f"{folder / 'train.bin'}: fine label 100 at record 3 is outside 0..99"


# --------------------------------------------------------------------------- safe loading
def test_malicious_pickle_is_refused_and_never_run(capsys, existing, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    target = tmp_path / "pwned"
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Exploit(target)}))
    with pytest.raises(KdError, match=r"refusing to load global posix\.system"):
        data.read_python_batch(folder / "data_batch_1")
    message = teacher_error(capsys, existing, "--data-dir", tmp_path)
    assert message == (f"{folder / 'data_batch_1'}: not a safe CIFAR-10 python batch "
                       "(UnpicklingError: refusing to load global posix.system)")
    assert not target.exists()


def test_python_layout_admits_real_batches(tmp_path):
    """The restriction must not refuse what CIFAR's own pickles hold (dict, arrays, lists)."""
    images = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    path = tmp_path / "batch"
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        path.write_bytes(pickle.dumps({b"data": images, b"labels": [3, 9]}, protocol=protocol))
        loaded, labels = data.read_python_batch(path)
        assert loaded.shape == (2, 32, 32, 3) and labels.tolist() == [3, 9]
        assert loaded.transpose(0, 3, 1, 2).reshape(2, 3072).tobytes() == images.tobytes()


# --------------------------------------------------------------------------- workdir
def test_unwritable_workdir(capsys, data_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    message = error_of(train_teacher, TeacherConfig,
                       ["--workdir", blocker / "run", "--data-dir", data_dir, "--model",
                        "resnet8", "--width", "4", "--batch-size", "16", "--epochs", "1"], capsys)
    assert message == f"{blocker / 'run'}: cannot write the workdir (Not a directory)"
    assert blocker.read_text() == "not a folder"


def test_workdir_holding_a_run_is_refused(capsys, existing, data_dir):
    assert teacher_error(capsys, existing, "--data-dir", data_dir, overwrite=False) == (
        f"{existing[0]} already holds a run; resume it (--resume, resume=True) or replace it "
        "(--overwrite, overwrite=True)")


def test_resume_with_other_settings_is_refused(capsys, existing, data_dir):
    assert teacher_error(capsys, existing, "--data-dir", data_dir, "--resume",
                         "--learning-rate", "0.3", overwrite=False) == (
        # The saved run's batch of 512 split into ghost batches of 32; a batch of 16 does not.
        f"{existing[0]} holds a run with different settings (batch_size, epochs, "
        "eval_batch_size, ghost_batch_size, learning_rate); resume with the same settings or "
        "use another workdir")


def test_resume_and_overwrite_together(capsys, existing, data_dir):
    assert teacher_error(capsys, existing, "--data-dir", data_dir, "--resume") == \
        "--resume and --overwrite exclude each other"


def test_corrupt_config_json_on_resume(capsys, existing, data_dir):
    path, _ = existing
    (path / "config.json").write_text("{not json")
    existing = (path, snapshot(path))
    message = teacher_error(capsys, existing, "--data-dir", data_dir, "--resume", overwrite=False)
    assert message.startswith(f"{path / 'config.json'}: unreadable (Expecting property name")


# --------------------------------------------------------------------------- config values
@pytest.mark.parametrize(("flags", "message"), [
    (["--epochs", "0"], "epochs must be >= 1, got 0"),
    (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["--batch-size", "-3"], "batch_size must be >= 1, got -3"),
    (["--model", "resnet7"],
     "unknown model 'resnet7'; choose one of: mlp1, mlp2, mlp3, resnet10, resnet110, resnet18, "
     "resnet20, resnet32, resnet32x4, resnet34, resnet56, resnet8, resnet8x4, vgg13, vgg8, "
     "wrn_16_2, wrn_40_1, wrn_40_2"),
    (["--lr-schedule", "cosine"], "lr_schedule must be linear or step, got 'cosine'"),
    (["--lr-decay-epochs", "5"], "lr_decay_epochs needs lr_schedule step"),
    (["--lr-schedule", "step", "--lr-decay-epochs", "5,3"],
     "lr_decay_epochs must be increasing epochs >= 1, got '5,3'"),
    (["--lr-schedule", "step", "--lr-decay-epochs", "150;180"],
     "lr_decay_epochs must be a comma list of epochs, got '150;180'"),
    (["--lr-schedule", "step", "--final-lr-factor", "0.1"],
     "final_lr_factor needs lr_schedule linear"),
    (["--lr-schedule", "step", "--lr-decay-factor", "0"],
     "lr_decay_factor must be in (0, 1], got 0.0"),
    (["--model", "wrn_40_2", "--whiten-patch", "2"],
     "wrn_40_2 does not take whiten_patch (set to 2)"),
    (["--logit-scale", "0"], "logit_scale must be > 0, got 0.0"),
    (["--model", "vgg8", "--logit-scale", "0.5"], "vgg8 does not take logit_scale (set to 0.5)"),
    (["--activation", "tanh"], "unknown activation 'tanh'; choose one of: relu, gelu, silu"),
    (["--lookahead-steps", "-1"], "lookahead_steps must be >= 0, got -1"),
    (["--lookahead-steps", "5", "--lookahead-alpha", "0"],
     "lookahead_alpha must be in (0, 1], got 0.0"),
    (["--lookahead-ramp"], "lookahead_ramp needs lookahead_steps > 0"),
    (["--ghost-batch-size", "-1"], "ghost_batch_size must be >= 0, got -1"),
    (["--batch-size", "48", "--ghost-batch-size", "32"],
     "ghost_batch_size 32 must divide batch_size 48"),
    (["--checkpoint-every-steps", "-1"], "checkpoint_every_steps must be >= 0, got -1"),
    (["--train-subset", "81"], "--train-subset must be in [1, 80], got 81"),
    (["--batch-size", "96"], "batch_size 96 exceeds the 80 training images"),
    (["--validation", "-1"], "validation must be >= 0, got -1"),
    (["--validation", "80"], "validation 80 leaves no training images"),
    (["--validation", "40", "--batch-size", "48"], "batch_size 48 exceeds the 40 training images"),
])
def test_bad_teacher_settings(capsys, existing, data_dir, flags, message):
    assert teacher_error(capsys, existing, "--data-dir", data_dir, *flags) == message


def test_batch_size_not_divisible_by_devices(tmp_path, data_dir):
    result = run_cli("train_teacher.py", "--data-dir", str(data_dir), "--workdir",
                     str(tmp_path / "run"), "--model", "resnet8", "--width", "4",
                     "--batch-size", "15", "--epochs", "1",
                     env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert (result.returncode, result.stderr) == (
        2, "error: batch_size 15 is not divisible by the 2 devices in use\n")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- YAML
@pytest.mark.parametrize(("text", "message"), [
    ("epochs: 2\nepoch: 3\n", "{path}: unknown config key 'epoch'"),
    ("- epochs\n- 2\n", "{path}: a config must be a mapping of keys to values, found list"),
    ("just a string\n", "{path}: a config must be a mapping of keys to values, found str"),
    ("epochs: two\n", "{path}: epochs must be int, got 'two'"),
    ("epochs: [1\n", "{path}: not readable YAML (while parsing a flow sequence)"),
    ("epochs: " + "[" * 5000 + "]" * 5000,
     "{path}: not readable YAML (maximum recursion depth exceeded while calling a Python object)"),
], ids=["unknown-key", "list", "string", "wrong-type", "not-yaml", "nested-5000-deep"])
def test_bad_yaml(capsys, existing, data_dir, tmp_path, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert teacher_error(capsys, existing, "--data-dir", data_dir, "--config", path) == \
        message.format(path=path)


def test_missing_yaml(capsys, existing, data_dir, tmp_path):
    path = tmp_path / "none.yaml"
    assert teacher_error(capsys, existing, "--data-dir", data_dir, "--config", path) == \
        f"{path}: config file not found"


def test_debug_shows_the_traceback(existing, data_dir):
    with pytest.raises(KdError, match="epochs must be >= 1"):
        main(TeacherConfig, train_teacher, "", ["--epochs", "0", "--debug"])


# --------------------------------------------------------------------------- teacher
def distill_error(capsys, existing, data_dir, teacher, *argv):
    path, before = existing
    flags = ["--workdir", path, "--overwrite", "--no-progress", "--data-dir", data_dir,
             "--teacher-dir", teacher, "--student", "resnet8", "--student-width", "4",
             "--batch-size", "16", "--eval-batch-size", "16", "--epochs", "1"]
    message = error_of(distill, DistillConfig, [*flags, *argv], capsys)
    assert snapshot(path) == before
    return message


@pytest.fixture
def teacher(tmp_path, saved_run):
    path = shutil.copytree(saved_run, tmp_path / "teacher")
    return path, snapshot(path)


def assert_unchanged(teacher):
    assert snapshot(teacher[0]) == teacher[1]


def test_missing_teacher(capsys, existing, data_dir, tmp_path):
    assert distill_error(capsys, existing, data_dir, tmp_path / "none") == \
        f"{tmp_path / 'none'}: not a kd-jax run (no config.json)"


def test_teacher_without_checkpoint(capsys, existing, data_dir, teacher):
    shutil.rmtree(teacher[0] / "checkpoints")
    assert distill_error(capsys, existing, data_dir, teacher[0]) == (
        f"{teacher[0]}: no checkpoint found under {teacher[0] / 'checkpoints' / 'latest'}")


def test_corrupt_teacher_checkpoint(capsys, existing, data_dir, teacher):
    default = teacher[0] / "checkpoints" / "latest" / "0" / "default"
    for path in default.rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    assert distill_error(capsys, existing, data_dir, teacher[0]) == (
        f"{default.parent}: corrupt or unreadable checkpoint (JSONDecodeError)")


def test_corrupt_teacher_config(capsys, existing, data_dir, teacher):
    (teacher[0] / "config.json").write_text("[1, 2")
    message = distill_error(capsys, existing, data_dir, teacher[0])
    assert message.startswith(f"{teacher[0] / 'config.json'}: unreadable (")


@pytest.mark.parametrize(("flags", "message"), [
    (["--teacher-model", "resnet18"],
     "{t}: the teacher is a resnet8, --teacher-model says resnet18"),
    (["--teacher-width", "8"], "{t}: the teacher has width 4, --teacher-width says 8"),
])
def test_teacher_of_another_architecture(capsys, existing, data_dir, teacher, flags, message):
    assert distill_error(capsys, existing, data_dir, teacher[0], *flags) == \
        message.format(t=teacher[0])
    assert_unchanged(teacher)


def test_teacher_config_naming_another_architecture(capsys, existing, data_dir, teacher):
    config = json.loads((teacher[0] / "config.json").read_text())
    (teacher[0] / "config.json").write_text(json.dumps({**config, "width": 8}))
    checkpoint = teacher[0] / "checkpoints" / "latest" / "0"
    assert distill_error(capsys, existing, data_dir, teacher[0]) == (
        f"{checkpoint}: checkpoint does not match the teacher model resnet8 (width 8) named in "
        "its config.json")


def test_teacher_with_another_class_count(capsys, existing, data_dir, tmp_path):
    five = make_run(tmp_path / "five-classes", num_classes=5)
    assert distill_error(capsys, existing, data_dir, five) == \
        f"{five}: the teacher has 5 classes, the data has 10"


def test_teacher_of_another_dataset(capsys, existing, data_dir, teacher):
    config = json.loads((teacher[0] / "config.json").read_text())
    (teacher[0] / "config.json").write_text(json.dumps({**config, "dataset": "mnist"}))
    assert distill_error(capsys, existing, data_dir, teacher[0]) == \
        f"{teacher[0]}: the teacher was trained on mnist, this run uses cifar10"


@pytest.mark.parametrize(("flags", "message"), [
    (["--temperature", "0"], "temperature must be > 0, got 0.0"),
    (["--temperature", "-2"], "temperature must be > 0, got -2.0"),
    (["--alpha", "-0.1"], "alpha must be in [0, 1], got -0.1"),
    (["--alpha", "1.5"], "alpha must be in [0, 1], got 1.5"),
    (["--student", "vgg"], "unknown model 'vgg'; choose one of: mlp1, mlp2, mlp3, resnet10, "
                           "resnet110, resnet18, resnet20, resnet32, resnet32x4, resnet34, "
                           "resnet56, resnet8, resnet8x4, vgg13, vgg8, wrn_16_2, wrn_40_1, "
                           "wrn_40_2"),
    (["--loss", "dkd"], "loss dkd needs each image's true class, so it cannot run label-free "
                        "(alpha 1): pass --alpha below 1 to train on labels too"),
    (["--loss", "dkd", "--alpha", "1"], "loss dkd needs each image's true class, so it cannot "
                                        "run label-free (alpha 1): pass --alpha below 1 to train "
                                        "on labels too"),
    (["--loss", "fitnet"], "unknown loss 'fitnet'; choose one of: dist, dkd, kd"),
    (["--dkd-beta", "2"], "dkd_beta is a setting of loss dkd, not of kd"),
    (["--loss", "dkd", "--alpha", "0.5", "--dist-gamma", "2"],
     "dist_gamma is a setting of loss dist, not of dkd"),
    (["--loss", "dkd", "--alpha", "0.5", "--dkd-beta", "-1"],
     "loss dkd: beta must be >= 0, got -1.0"),
    (["--loss", "dist", "--dist-beta", "-0.5"], "loss dist: beta must be >= 0, got -0.5"),
    (["--omit-class", "unicorn"], "unknown class 'unicorn'; choose one of: airplane, automobile, "
                                  "bird, cat, deer, dog, frog, horse, ship, truck"),
])
def test_bad_distill_settings(capsys, existing, data_dir, teacher, flags, message):
    assert distill_error(capsys, existing, data_dir, teacher[0], *flags) == message
    assert_unchanged(teacher)


# --------------------------------------------------------------------------- resuming
def test_corrupt_only_checkpoint_on_resume(existing):
    """No intact checkpoint to fall back to (tests/test_reliability.py falls back to one): one
    line, and the damaged checkpoint is kept for a look."""
    path, _ = existing
    latest = path / "checkpoints" / "latest" / "0"
    for file in (latest / "default").rglob("*"):
        if file.is_file():
            file.write_bytes(b"garbage")
    checkpoints = RunCheckpoints(path)
    with pytest.raises(KdError) as error:
        checkpoints.restore_latest(_state_like(num_classes=10))
    checkpoints.close()
    assert str(error.value) == (
        f"{latest.parent}: every checkpoint is corrupt or unreadable (0: JSONDecodeError); "
        "start the run over (--overwrite, overwrite=True)")
    assert latest.is_dir()


def test_corrupt_metrics_on_resume(existing):
    path, _ = existing
    (path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epo')
    with pytest.raises(KdError, match=r"metrics\.jsonl: unreadable \(Unterminated string"):
        RunDir(path).read_metrics()


def test_resume_does_not_switch_to_a_newer_default_teacher(capsys, tmp_path, saved_run, data_dir,
                                                           monkeypatch):
    """Without --teacher-dir the latest runs/teacher-* is used; the run records which. (The
    teacher's path is relative here, which orbax alone would refuse.)"""
    monkeypatch.chdir(tmp_path)
    older = Path("runs") / "teacher-20260101-000000"
    shutil.copytree(saved_run, older)
    flags = ["--workdir", tmp_path / "student", "--data-dir", data_dir, "--student", "resnet8",
             "--student-width", "4", "--batch-size", "16", "--eval-batch-size", "16",
             "--epochs", "1", "--no-progress"]
    # An interrupted distillation from the older teacher (its config written, nothing else).
    interrupted = DistillConfig(teachers=[str(older)], student="resnet8", student_width=4,
                                batch_size=16, eval_batch_size=16, epochs=1,
                                workdir=str(tmp_path / "student"))
    interrupted = with_model_recipe(interrupted)
    RunDir.prepare(tmp_path / "student", json.loads(to_json(interrupted))).close()
    shutil.copytree(saved_run, Path("runs") / "teacher-20270101-000000")
    assert error_of(distill, DistillConfig, [*flags, "--resume"], capsys) == (
        f"{tmp_path / 'student'} holds a run with different settings (teachers); resume "
        "with the same settings or use another workdir")
