import json
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import cifar_records, relabelled_copy

from kd_jax.cli import jobs
from kd_jax.cli.config import DistillConfig, TeacherConfig
from kd_jax.core.augment import Augmentation
from kd_jax.core.checkpoint import RunCheckpoints, load_frozen
from kd_jax.core.devices import Mesh
from kd_jax.core.losses import make_loss, tempered_kl
from kd_jax.core.models import create_model, init_variables
from kd_jax.core.optim import Recipe, make_optimizer
from kd_jax.core.rundir import RunDir
from kd_jax.core.steps import (
    create_state,
    epoch_order,
    hinton_step,
    make_distill_step,
    make_teacher_step,
    run_steps,
)
from kd_jax.core.teachers import Teacher, make_ensemble
from kd_jax.errors import KdError

AUG = Augmentation(0, False, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
TIMING = {"images_per_second", "epoch_seconds", "eval_seconds"}


def small_state(width: int, seed: int = 0, lr: float = 0.05):
    model = create_model("resnet8", 10, width)
    tx, _ = make_optimizer(Recipe(lr, weight_decay=5e-4, warmup_fraction=0), 100)
    return model, create_state(model, init_variables(model, (32, 32, 3), seed), tx)


def fixed_batch(n=32, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = np.clip(labels[:, None, None, None] * 25 + rng.integers(-20, 21, (n, 32, 32, 3)),
                     0, 255).astype(np.uint8)
    return AUG.normalize(jnp.asarray(images)), jnp.asarray(labels)


def test_teacher_step_lowers_the_loss_on_a_fixed_batch():
    _, state = small_state(8)
    images, labels = fixed_batch()
    step = jax.jit(make_teacher_step())
    losses = []
    for i in range(15):
        state, metrics = step(state, images, labels, jax.random.key(i))
        losses.append(float(metrics["train_loss"]))
    assert losses[-1] < 0.5 * losses[0]


def test_distill_step_drives_kl_down_and_never_touches_the_teacher():
    teacher, teacher_state = small_state(8, seed=1)
    teacher_vars = {"params": teacher_state.params, "batch_stats": teacher_state.batch_stats}
    before = jax.tree.map(np.array, teacher_vars)
    _, state = small_state(4, seed=2)
    images, _ = fixed_batch()
    step = hinton_step(teacher.apply, teacher_vars, 4.0)
    run = jax.jit(lambda step, state, images, rng: step(state, images, rng))
    teacher_logits = teacher.apply(teacher_vars, images)

    def kl(state):
        logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, images)
        return float(tempered_kl(logits, teacher_logits, 1.0))

    start = kl(state)
    for i in range(30):
        state, _ = run(step, state, images, jax.random.key(i))
    assert kl(state) < 0.5 * start
    after = jax.tree.map(np.array, teacher_vars)
    assert all(np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True))


def test_label_free_step_cannot_receive_labels():
    teacher, state = small_state(4)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    step = hinton_step(teacher.apply, variables, 4.0)
    images, labels = fixed_batch(8)
    # The label-free step has no parameter for labels: one argument more than it takes.
    with pytest.raises(TypeError, match=r"_label_free_step\(\) takes \d+ positional "
                                        r"arguments but \d+ were given") as refused:
        step(state, images, labels, jax.random.key(0))
    takes, given = map(int, re.findall(r"\d+", str(refused.value)))
    assert given == takes + 1
    mixed = hinton_step(teacher.apply, variables, 4.0, alpha=0.5)
    mixed(state, images, labels, jax.random.key(0))  # the hard-label variant takes them


def test_omit_class_removes_every_image_of_that_class():
    labels = np.arange(1000) % 10
    transfer, held_out = jobs.split_transfer_set(labels, 3, 100)
    assert not np.any(labels[transfer] == 3)
    assert len(transfer) == 900 - 90 and held_out.tolist() == list(range(900, 1000))
    everything, none = jobs.split_transfer_set(labels, None, 100)
    assert len(everything) == 1000 and len(none) == 0


def test_frozen_restore_is_exact_and_quiet(tmp_path, caplog):
    """No orbax warning on every distillation run's teacher load (an earlier one logged one)."""
    _, state = small_state(4)
    checkpoints = RunCheckpoints(tmp_path)
    checkpoints.save(state.replace(step=3), {"train_loss": 1.5})
    checkpoints.close()
    (tmp_path / "config.json").write_text(json.dumps({"model": "resnet8", "width": 4}))
    with caplog.at_level(logging.WARNING):
        frozen = load_frozen(tmp_path)
    assert [record.getMessage() for record in caplog.records] == []
    assert frozen.checkpoint == tmp_path / "checkpoints" / "latest" / "3"
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(frozen.variables["params"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_round_trip(tmp_path):
    _, state = small_state(4)
    checkpoints = RunCheckpoints(tmp_path)
    checkpoints.save(state.replace(step=7), {"train_loss": 1.5}, is_best=True)
    checkpoints.close()
    restored = RunCheckpoints(tmp_path).restore_latest(state)
    assert int(restored.state.step) == 7 and restored.meter == {"train_loss": 1.5}
    assert (restored.path, restored.damaged) == (tmp_path / "checkpoints" / "latest" / "7", [])
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored.state.params),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_best_checkpoint_waits_for_the_latest_of_the_same_step(tmp_path, monkeypatch):
    """orbax's multi-process commit barrier is named after the step: two managers committing
    one step at once hung a two-process run. The best save starts once the latest is done."""
    _, state = small_state(4)
    checkpoints = RunCheckpoints(tmp_path)
    latest_busy = []
    best_save = checkpoints.best.save

    def save_best(*args, **kwargs):
        latest_busy.append(checkpoints.latest.is_saving_in_progress())
        return best_save(*args, **kwargs)

    monkeypatch.setattr(checkpoints.best, "save", save_best)
    checkpoints.save(state.replace(step=7), {}, is_best=True)
    checkpoints.close()
    assert latest_busy == [False]
    assert not checkpoints.best.is_saving_in_progress()
    assert [p.name for p in (tmp_path / "checkpoints" / "best").iterdir()] == ["7"]


def teacher_config(data_dir, workdir, **overrides):
    base = dict(data_dir=str(data_dir), workdir=str(workdir), epochs=2, batch_size=40,
                eval_batch_size=40, model="resnet8", width=4, progress=False)
    return TeacherConfig(**{**base, **overrides})


def metrics_without_timing(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def params_of(workdir):
    return jax.tree.leaves(load_frozen(workdir).variables)


# Lookahead's slow weights and the EMA are state of their own, which a checkpoint must carry:
# 3 does not divide an epoch's steps, so the crash falls between two syncs; the ramp makes
# the sync depend on the step count too.
@pytest.mark.parametrize("averaging", [{}, {"lookahead_steps": 3, "lookahead_ramp": True,
                                            "ema_decay": 0.9}])
def test_resumed_run_equals_uninterrupted_run(tiny_cifar, tmp_path, monkeypatch, averaging):
    jobs.train_teacher(teacher_config(tiny_cifar, tmp_path / "straight", **averaging))

    calls = {"n": 0}
    original = RunDir.write_metrics

    def crash_after_first_epoch(self, rows):
        original(self, rows)
        calls["n"] += 1
        if calls["n"] == 2:  # once at start, once after epoch 1 (its checkpoint is saved)
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(RunDir, "write_metrics", crash_after_first_epoch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        jobs.train_teacher(teacher_config(tiny_cifar, tmp_path / "resumed", **averaging))
    monkeypatch.setattr(RunDir, "write_metrics", original)
    jobs.train_teacher(teacher_config(tiny_cifar, tmp_path / "resumed", resume=True, **averaging))

    assert metrics_without_timing(tmp_path / "resumed") == metrics_without_timing(
        tmp_path / "straight")
    for a, b in zip(params_of(tmp_path / "resumed"), params_of(tmp_path / "straight"),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_student_never_sees_training_labels(tiny_cifar, tmp_path):
    """Permuting every training label leaves the distilled student bit-identical."""
    teacher_dir = tmp_path / "teacher"
    jobs.train_teacher(teacher_config(tiny_cifar, teacher_dir, epochs=1))
    shuffled = relabelled_copy(tiny_cifar, tmp_path / "shuffled", 3)

    def student(data_dir, name):
        jobs.distill(DistillConfig(data_dir=str(data_dir), workdir=str(tmp_path / name),
                                   teachers=[str(teacher_dir)], epochs=1, batch_size=40,
                                   eval_batch_size=40, student="resnet8", student_width=4,
                                   progress=False))
        return params_of(tmp_path / name)

    for a, b in zip(student(tiny_cifar, "true"), student(shuffled, "permuted"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_records_helper_labels_survive(tmp_path):
    raw = np.frombuffer(cifar_records(np.array([7, 2]), 0), np.uint8).reshape(2, 3073)
    assert raw[:, 0].tolist() == [7, 2]


@pytest.mark.parametrize(("content", "message"), [
    (b"[1, 2]", "expected a JSON object, found list"),
    (b"\xff\xfe", "unreadable ("),
])
def test_frozen_model_config_must_be_a_json_object(tmp_path, content, message):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(KdError) as error:
        load_frozen(tmp_path)
    assert str(error.value).startswith(f"{tmp_path / 'config.json'}: {message}")


def test_teacher_sees_the_students_augmented_batch_in_inference_mode():
    """Inside one real dispatch: the teacher's input is the student's input, which is the
    gathered batch augmented with the step's own key; its logits are the inference-mode
    forward (running BatchNorm statistics) of that batch, computed here independently."""
    seen = {}
    record = lambda name: lambda value: seen.__setitem__(name, np.asarray(value))
    teacher, teacher_state = small_state(8, seed=1)
    # BN scales of 1 (not the zero-initialised last ones): logits of order 1; running
    # statistics unlike any batch's, so a training-mode forward would show.
    ones = jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.ones_like(p) if path[-1].key == "scale" else p, teacher_state.params)
    teacher_vars = {"params": ones, "batch_stats": jax.tree.map(lambda s: s + 0.5,
                                                                teacher_state.batch_stats)}
    student, student_state = small_state(4, seed=2)

    def teacher_apply(variables, x, train):
        assert train is False
        jax.debug.callback(record("teacher_input"), x)
        logits = teacher.apply(variables, x, train=train)
        jax.debug.callback(record("teacher_logits"), logits)
        return logits

    def student_apply(variables, x, **kwargs):
        jax.debug.callback(record("student_input"), x)
        return student.apply(variables, x, **kwargs)

    state = student_state.replace(apply_fn=student_apply)
    step = make_distill_step(make_ensemble([Teacher(teacher_apply, teacher_vars)]),
                             make_loss("kd", 4.0))
    augmentation = Augmentation(4, True, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), np.uint8)
    key, mesh = jax.random.key(3), Mesh(np.array(jax.devices()[:1]), ("data",))
    order = epoch_order(key, 0, 64, 16, 4)
    run_steps(step, state, (jnp.asarray(images),), order, np.int32(4), np.int32(2), key,
              length=1, augmentation=augmentation, mesh=mesh)
    jax.effects_barrier()

    aug_key = jax.random.split(jax.random.fold_in(key, 0))[0]  # the state's step is 0
    expected = np.asarray(augmentation.apply(aug_key, jnp.asarray(images[np.asarray(order[2])])))
    np.testing.assert_array_equal(seen["teacher_input"], seen["student_input"])
    np.testing.assert_allclose(seen["teacher_input"], expected, rtol=0, atol=1e-6)  # fused
    np.testing.assert_allclose(seen["teacher_logits"],
                               teacher.apply(teacher_vars, expected, train=False), rtol=1e-5,
                               atol=1e-6)
    assert not np.allclose(seen["teacher_logits"], teacher.apply(
        teacher_vars, expected, train=True, mutable=["batch_stats"])[0], rtol=1e-3)


def with_labels(folder, out, name, change):
    """A copy of the CIFAR folder ``folder`` with the labels of file ``name`` changed."""
    out.mkdir()
    for path in folder.iterdir():
        records = np.frombuffer(path.read_bytes(), np.uint8).reshape(-1, 3073).copy()
        if path.name == name:
            records[:, 0] = change(records[:, 0])
        (out / path.name).write_bytes(records.tobytes())
    return out


def test_validation_split_is_the_last_training_images_and_never_the_test_set(tiny_cifar,
                                                                             tmp_path):
    """--validation 40 holds out the last 40 training images (data_batch_5): changing the test
    labels leaves every val_ figure as it was, changing those 40 labels moves them and leaves
    the rest of the run (trained on the first 160 only) bit-identical."""
    shift = lambda labels: (labels + 1) % 10
    folders = {"base": tiny_cifar,
               "test": with_labels(tiny_cifar, tmp_path / "t", "test_batch.bin", shift),
               "val": with_labels(tiny_cifar, tmp_path / "v", "data_batch_5.bin", shift)}

    def rows(name):
        jobs.train_teacher(teacher_config(folders[name], tmp_path / f"run-{name}", epochs=1,
                                          model="mlp1", width=8, learning_rate=0.01,
                                          validation=40))
        (row,) = metrics_without_timing(tmp_path / f"run-{name}")
        return ({k: v for k, v in row.items() if k.startswith("val_")},
                {k: v for k, v in row.items() if not k.startswith("val_")})

    (base_val, base_rest), (test_val, test_rest), (val_val, val_rest) = map(
        rows, ("base", "test", "val"))
    assert set(base_val) == {"val_loss", "val_accuracy"}
    assert test_val == base_val and test_rest["test_loss"] != base_rest["test_loss"]
    assert val_val["val_loss"] != base_val["val_loss"] and val_rest == base_rest
